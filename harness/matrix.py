"""The matrix file (YAML, validated by pydantic) and its expansion into a job DAG.

    prepare[dataset, (model,) attack, seed] -> an attack's generated resources (only attacks that prepare)
    train[dataset, model, attack, seed]     -> attacked model (and a training-controlled attack's state)
    train[dataset, model, clean, seed]      -> clean reference (only if an evaluator or a prepare asks)
    purify[attacked, defense]               -> purified model
    evaluate[purified, evaluator]           -> metrics

A job's key hashes its kind, its config, the keys of its upstream jobs and the
versions of the plugins (and of the core's training semantics) it runs, so a
changed value anywhere re-runs exactly the jobs downstream of it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data import DataSpec
from .errors import HarnessError
from .models import ModelSpec, check_model_name
from .registry import create, format_validation_error, get_class
from .train import Recipe, resolve_recipe

#: Bump when the core changes what a job computes (trainer, data pipeline):
#: it is part of every key, so old results are not reused.
CORE_VERSION = "2"


class PluginRef(BaseModel):
    """A plugin in a matrix: ``name`` or ``{name, config, label, per_attack}``.

    ``label`` names the entry in results and leaderboards (default: ``name``),
    so one plugin can appear with several configs.

    ``per_attack`` (defenses and evaluators only) maps an attack's label in the
    matrix to config values that replace ``config``'s for that attack's cells,
    e.g. paper 000's PAM radius ``{name: pam, config: {rho: 0.5}, per_attack:
    {badnets: {rho: 0.9}}}``. A per-attack setting lives in the matrix file,
    never in code that names attacks. A cell's job key holds only the config
    it runs with, so a cell without an override keeps the key it had.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    config: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None
    per_attack: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @property
    def display(self) -> str:
        return self.label or self.name

    def config_for(self, attack: str | None = None) -> dict[str, Any]:
        """The config of the cells of ``attack`` (an attack label): ``config`` with that
        attack's ``per_attack`` values over it."""
        return {**self.config, **self.per_attack.get(attack, {})} if attack is not None else dict(self.config)

    def payload(self, attack: str | None = None) -> dict[str, Any]:
        """What enters a job key: the plugin's name and the config the cell runs with."""
        return {"name": self.name, "config": self.config_for(attack)}


class MatrixSpec(BaseModel):
    """A benchmark matrix: every data set x model x attack x defense x evaluator x seed.

    Attributes:
        name: the matrix's name (default work directory ``runs/<name>``).
        datasets: data sets (see :class:`DataSpec`).
        models: timm model names or :class:`ModelSpec` mappings.
        attacks: attacks, each ``name`` or ``{name, config, label}``.
        defenses: defenses, same form; ``none`` is the undefended row.
        evaluators: evaluators, same form.
        seeds: one cell per seed.
        recipe: training recipe of attacked and clean models: a name
            (``backdoorbench``, ``cpu-quick``) or a mapping (``base`` + overrides).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "matrix"
    datasets: list[DataSpec] = Field(min_length=1)
    models: list[ModelSpec] = Field(min_length=1)
    attacks: list[PluginRef] = Field(min_length=1)
    defenses: list[PluginRef] = Field(min_length=1)
    evaluators: list[PluginRef] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    recipe: Recipe = Field(default_factory=Recipe)

    @field_validator("recipe", mode="before")
    @classmethod
    def _recipe(cls, value: Any) -> Any:
        try:
            return resolve_recipe(value)
        except HarnessError as err:
            raise ValueError(str(err)) from None


def read_yaml_mapping(path: Path, missing: str, shape: str) -> dict:
    """The YAML mapping in ``path``, or one HarnessError: ``missing`` when there is no such
    file, the line and column of a YAML error, or ``shape`` (what the file should hold)
    when it is not a mapping."""
    if not path.exists():
        raise HarnessError(f"{path}: {missing}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise HarnessError(f"{where}: invalid YAML: {problem} (check indentation and quoting there)") from None
    if not isinstance(raw, dict):
        raise HarnessError(f"{path}: {shape} (got {type(raw).__name__})")
    return raw


def load_matrix(path: str | Path) -> MatrixSpec:
    """Read and validate a matrix file; every problem raises one HarnessError
    naming the file, the key and the fix."""
    path = Path(path)
    raw = read_yaml_mapping(path, "no such matrix file",
                            "a matrix file is a mapping with keys datasets, models, attacks, defenses, evaluators")
    try:
        spec = MatrixSpec.model_validate(raw)
    except ValidationError as err:
        raise HarnessError(format_validation_error(err, str(path))) from None
    validate_plugins(spec, str(path))
    return spec


def validate_plugins(spec: MatrixSpec, where: str = "matrix") -> None:
    """Every plugin exists and its config validates (at load time, not mid-run)."""
    attack_labels = [a.display for a in spec.attacks]
    for kind, refs in (("attack", spec.attacks), ("defense", spec.defenses), ("evaluator", spec.evaluators)):
        labels = [r.display for r in refs]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise HarnessError(f"{where}: {kind}s: {sorted(dup)} appear twice; give each entry its own `label`")
        for i, ref in enumerate(refs):
            if ref.per_attack and kind == "attack":
                raise HarnessError(f"{where}: attacks[{i}] ({ref.display}): `per_attack` is for defenses and "
                                   f"evaluators; give the attack its own entry (with a `label`) instead")
            unknown = sorted(set(ref.per_attack) - set(attack_labels))
            if unknown:
                raise HarnessError(f"{where}: {kind}s[{i}] ({ref.display}): per_attack names {unknown}, not an "
                                   f"attack of this matrix (its attacks: {', '.join(attack_labels)}); use the "
                                   f"attacks' labels")
            for atk in [None, *ref.per_attack]:
                try:
                    create(kind, ref.name, **ref.config_for(atk))
                except HarnessError as err:
                    at = f" (per_attack {atk})" if atk is not None else ""
                    raise HarnessError(f"{where}: {kind}s[{i}]{at}: {err}") from None
    for i, ds in enumerate(spec.datasets):
        try:
            create("dataset", ds.name, **ds.options)
        except HarnessError as err:
            raise HarnessError(f"{where}: datasets[{i}]: {err}") from None
    for i, m in enumerate(spec.models):
        try:
            check_model_name(m.name)
        except HarnessError as err:
            raise HarnessError(f"{where}: models[{i}]: {err}") from None


# --------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------


@dataclass
class Job:
    """One node of the DAG.

    Attributes:
        key: content hash (see module docstring).
        kind: ``prepare`` (an attack's generated resources), ``train``,
            ``purify`` or ``evaluate``.
        label: human-readable ``kind dataset/model/attack/defense/evaluator/seed``.
        deps: upstream job keys, in a fixed order per kind (train, purify, clean).
        attrs: names of the cell, for results and leaderboards.
        payload: everything the job needs to run (JSON-able).
        versions: plugin versions it depends on.
    """

    key: str
    kind: str
    label: str
    deps: list[str]
    attrs: dict[str, Any]
    payload: dict[str, Any]
    versions: dict[str, str] = field(default_factory=dict)


def job_key(kind: str, payload: dict, deps: list[str], versions: dict[str, str]) -> str:
    blob = json.dumps({"kind": kind, "payload": payload, "deps": deps, "versions": versions,
                       "core": CORE_VERSION}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _make(kind: str, label: str, deps: list[str], attrs: dict, payload: dict, versions: dict) -> Job:
    return Job(job_key(kind, payload, deps, versions), kind, label, deps, attrs, payload, versions)


def _version(kind: str, ref: PluginRef) -> str:
    return str(get_class(kind, ref.name).version)


def expand(spec: MatrixSpec) -> list[Job]:
    """The jobs of a matrix in dependency order (every job after its upstreams).

    A purify job that an evaluator asks for (``needs_defenses``) and that the
    matrix also lists with the same config is one job, not two.
    """
    jobs: dict[str, Job] = {}
    recipe = spec.recipe.payload()
    evaluators = {(e.display, a.display): create("evaluator", e.name, **e.config_for(a.display))
                  for e in spec.evaluators for a in spec.attacks}
    needs_clean = any(ev.needs_clean_model for ev in evaluators.values())

    def add(job: Job) -> Job:
        return jobs.setdefault(job.key, job)

    for ds in spec.datasets:
        data, reserve = ds.payloads()
        ds_version = str(get_class("dataset", ds.name).version)
        for model in spec.models:
            mspec = model.model_dump(mode="json", exclude={"label"})
            for seed in spec.seeds:
                base = {"dataset": ds.display, "model": model.display, "seed": seed}

                def clean_job() -> Job:
                    return add(_make("train", f"train {ds.display}/{model.display}/clean/s{seed}", [],
                                     {**base, "attack": None, "role": "clean"},
                                     {"data": data, "model": mspec, "recipe": recipe, "attack": None, "seed": seed},
                                     {"dataset": ds_version, **model.versions}))

                clean = clean_job() if needs_clean else None
                for atk in spec.attacks:
                    a_cls = get_class("attack", atk.name)
                    rate = a_cls.Config(**atk.config).poison_rate
                    a_attrs = {**base, "attack": atk.display, "poison_rate": rate}
                    a_ref = atk.payload()
                    a_versions = {"dataset": ds_version, "attack": _version("attack", atk)}
                    train_deps = []
                    if a_cls.prepares():  # generated resources: one job per data set (and model), cached
                        if a_cls.prepare_needs_clean_model:
                            p_deps, p_payload = [clean_job().key], {"model": mspec, "recipe": recipe}
                            where, p_attrs = f"{ds.display}/{model.display}", a_attrs
                        else:
                            p_deps, p_payload = [], {}
                            where = ds.display
                            p_attrs = {k: v for k, v in a_attrs.items() if k != "model"}
                        prep = add(_make("prepare", f"prepare {where}/{atk.display}/s{seed}", p_deps,
                                         {**p_attrs, "role": "resource"},
                                         {"data": data, "attack": a_ref, "seed": seed, **p_payload},
                                         {**a_versions, **(model.versions if p_payload else {})}))
                        train_deps = [prep.key]
                    train = add(_make("train", f"train {ds.display}/{model.display}/{atk.display}/s{seed}",
                                      train_deps, {**a_attrs, "role": "attacked"},
                                      {"data": data, "model": mspec, "recipe": recipe, "attack": a_ref, "seed": seed},
                                      {**a_versions, **model.versions}))

                    def purify(dfn: PluginRef) -> Job:
                        return add(_make("purify",
                                         f"purify {ds.display}/{model.display}/{atk.display}/{dfn.display}/s{seed}",
                                         [train.key], {**a_attrs, "defense": dfn.display},
                                         {"defense": dfn.payload(atk.display), "seed": seed,
                                          "reserve": reserve},
                                         {"defense": _version("defense", dfn)}))

                    for dfn in spec.defenses:
                        row = purify(dfn)
                        for ev in spec.evaluators:
                            ev_obj = evaluators[(ev.display, atk.display)]
                            deps = [train.key, row.key] + ([clean.key] if ev_obj.needs_clean_model else [])
                            deps += [purify(PluginRef.model_validate(r)).key for r in ev_obj.needs_defenses]
                            add(_make("evaluate",
                                      f"evaluate {ds.display}/{model.display}/{atk.display}/{dfn.display}/{ev.display}/s{seed}",
                                      deps, {**row.attrs, "evaluator": ev.display},
                                      {"evaluator": ev.payload(atk.display), "seed": seed,
                                       "reserve": reserve},
                                      {"evaluator": str(ev_obj.version)}))
    return list(jobs.values())
