"""The matrix file (YAML, validated by pydantic) and its expansion into a DAG of typed jobs
(:mod:`backdoor_harness.jobs`).

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

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .data import DataSpec
from .errors import HarnessError
from .jobs import CORE_VERSION, EvaluateJob, Job, PluginCall, PrepareJob, PurifyJob, TrainJob, metric_infos, plugin_info
from .models import ModelSpec, check_model_kwargs, check_model_name
from .plugin import NamedEntry
from .registry import format_validation_error, get_class, instance
from .store import Cell
from .train import Recipe, resolve_recipe

__all__ = ["CORE_VERSION", "Job", "MatrixSpec", "PluginRef", "expand", "load_matrix", "validate_plugins"]


class PluginRef(NamedEntry):
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

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        # the default work directory is runs/<name>: a name must not lead anywhere else
        if (not value.strip() or value in (".", "..") or ".." in value or any(c in value for c in "/\\:\0")
                or Path(value).is_absolute() or any(ord(c) < 32 for c in value)):
            raise ValueError("a matrix name is one plain folder name (the default work directory is "
                             "runs/<name>): no path separators, no '..', not absolute; pass --workdir to "
                             "choose where results go")
        return value

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


def load_matrix(path: str | Path, *, check_data: bool = True) -> MatrixSpec:
    """Read and validate a matrix file; every problem raises one HarnessError
    naming the file, the key and the fix.

    ``check_data``: also check that each data set can be found here (a ``root`` that
    exists, see :meth:`DatasetSource.check`); turn it off where a matrix is only read
    for its jobs (e.g. checking submitted records against published configs).
    """
    path = Path(path)
    raw = read_yaml_mapping(path, "no such matrix file",
                            "a matrix file is a mapping with keys datasets, models, attacks, defenses, evaluators")
    try:
        spec = MatrixSpec.model_validate(raw)
    except ValidationError as err:
        raise HarnessError(format_validation_error(err, str(path))) from None
    validate_plugins(spec, str(path), check_data=check_data)
    return spec


def validate_plugins(spec: MatrixSpec, where: str = "matrix", *, check_data: bool = True) -> None:
    """Every plugin exists and its config validates (at load time, not mid-run); data sets and
    models have distinct labels (each is one leaderboard cell), model ``kwargs`` are arguments
    the model takes, attack targets are classes of every data set whose class count is known,
    and (``check_data``) each data set's source finds its data (:meth:`DatasetSource.check`)."""
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
                    instance(kind, ref.name, ref.config_for(atk))
                except HarnessError as err:
                    at = f" (per_attack {atk})" if atk is not None else ""
                    raise HarnessError(f"{where}: {kind}s[{i}]{at}: {err}") from None
    for kind, entries in (("dataset", spec.datasets), ("model", spec.models)):
        labels = [e.display for e in entries]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            at = ", ".join(f"{kind}s[{i}]" for i, x in enumerate(labels) if x in dup)
            raise HarnessError(f"{where}: {at}: {kind}s {dup} appear twice (one leaderboard cell would average "
                               f"them); give each entry its own `label`, or remove the repeat")
    for i, m in enumerate(spec.models):
        try:
            check_model_name(m.name)
            check_model_kwargs(m)
        except HarnessError as err:
            raise HarnessError(f"{where}: models[{i}]: {err}") from None
    for i, ds in enumerate(spec.datasets):
        try:
            source = instance("dataset", ds.name, ds.options)
            if check_data:
                source.check()
        except HarnessError as err:
            raise HarnessError(f"{where}: datasets[{i}]: {err}") from None
        classes = source.num_classes()
        if classes is None:
            continue
        for j, ref in enumerate(spec.attacks):
            target = instance("attack", ref.name, ref.config).config.target
            if target >= classes:
                raise HarnessError(f"{where}: attacks[{j}].config.target: {target} is not a class of data set "
                                   f"{ds.display!r} (datasets[{i}]), which has {classes} classes (0 to "
                                   f"{classes - 1}); choose a target below {classes}")


# --------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------


def expand(spec: MatrixSpec) -> list[Job]:
    """The typed jobs of a matrix (:mod:`backdoor_harness.jobs`) in dependency order (every job after
    its upstreams), each built once.

    A purify job that an evaluator asks for (``needs_defenses``) and that the
    matrix also lists with the same config is one job, not two.
    """
    jobs: dict[str, Job] = {}
    recipe = spec.recipe.payload()

    def add(job: Job) -> Job:
        return jobs.setdefault(job.key, job)

    def call(ref: PluginRef, attack: str | None = None) -> PluginCall:
        return PluginCall(ref.name, ref.config_for(attack))

    for ds in spec.datasets:
        data, reserve = ds.payloads()
        ds_version = str(get_class("dataset", ds.name).version)
        for model in spec.models:
            mspec = model.model_dump(mode="json", exclude={"label"})
            for seed in spec.seeds:
                where = dict(dataset=ds.display, model=model.display, seed=seed)
                clean: TrainJob | None = None

                def clean_job() -> TrainJob:
                    return add(TrainJob(label=f"train {ds.display}/{model.display}/clean/s{seed}",
                                        cell=Cell(**where, role="clean"), seed=seed,
                                        versions={"dataset": ds_version, **model.versions},
                                        data=data, model=mspec, recipe=recipe))

                if any(instance("evaluator", e.name, e.config_for(a.display)).needs_clean_model
                       for e in spec.evaluators for a in spec.attacks):
                    clean = clean_job()
                for atk in spec.attacks:
                    attack = instance("attack", atk.name, atk.config)
                    a_where = {**where, "attack": atk.display, "poison_rate": attack.config.poison_rate}
                    a_versions = {"dataset": ds_version, "attack": str(attack.version)}
                    a_info = plugin_info(attack)
                    prepare = None
                    if type(attack).prepares():  # generated resources: one job per data set (and model), cached
                        per_model = type(attack).prepare_needs_clean_model
                        p_where = a_where if per_model else {k: v for k, v in a_where.items() if k != "model"}
                        prepare = add(PrepareJob(
                            label=f"prepare {ds.display}{'/' + model.display if per_model else ''}/{atk.display}/s{seed}",
                            cell=Cell(**p_where, role="resource"), seed=seed,
                            versions={**a_versions, **(model.versions if per_model else {})}, plugin=a_info,
                            data=data, attack=call(atk), model=mspec if per_model else None,
                            recipe=recipe if per_model else None, clean=clean_job().key if per_model else None))
                    train = add(TrainJob(label=f"train {ds.display}/{model.display}/{atk.display}/s{seed}",
                                         cell=Cell(**a_where, role="attacked"), seed=seed,
                                         versions={**a_versions, **model.versions}, plugin=a_info,
                                         data=data, model=mspec, recipe=recipe, attack=call(atk),
                                         prepare=prepare.key if prepare else None))

                    def purify(dfn: PluginRef) -> PurifyJob:
                        defense = instance("defense", dfn.name, dfn.config_for(atk.display))
                        return add(PurifyJob(
                            label=f"purify {ds.display}/{model.display}/{atk.display}/{dfn.display}/s{seed}",
                            cell=Cell(**a_where, defense=dfn.display), seed=seed,
                            versions={"defense": str(defense.version)}, plugin=plugin_info(defense),
                            defense=call(dfn, atk.display), reserve=reserve, train=train.key))

                    for dfn in spec.defenses:
                        row = purify(dfn)
                        for ev in spec.evaluators:
                            evaluator = instance("evaluator", ev.name, ev.config_for(atk.display))
                            defended = tuple((r["name"], purify(PluginRef.model_validate(r)).key)
                                             for r in evaluator.needs_defenses)
                            add(EvaluateJob(
                                label=f"evaluate {ds.display}/{model.display}/{atk.display}/{dfn.display}/"
                                      f"{ev.display}/s{seed}",
                                cell=row.cell.model_copy(update={"evaluator": ev.display}), seed=seed,
                                versions={"evaluator": str(evaluator.version)}, plugin=plugin_info(evaluator),
                                evaluator=call(ev, atk.display), reserve=reserve, train=train.key,
                                purified=row.key, clean=clean.key if evaluator.needs_clean_model else None,
                                defended=defended, metrics=metric_infos(evaluator)))
    return list(jobs.values())
