"""Results: job records folded into cells, the one reading of records that leaderboards, golden
checks and the pytest plugin share.

A cell is one (data set, model, poison rate, attack, defense) of a run, and of a source when
records come from several files: its metrics averaged over seeds (an evaluator listed under its
own ``label`` keeps its metrics apart as ``<metric>@<label>``), the statuses of its unfinished
evaluations, the defense's cost, and what the cell ran with (:class:`Setup`). Everything a
reader needs comes from the records: the plugin facts of the train, purify and evaluate records
(``JobRecord.plugin``: the attack's ``substitute``, the defense's ``oracle`` and ``baseline``,
each plugin's effective config) and the metric metadata of the evaluate records
(``JobRecord.metric_info``: title, direction, percent, board position, one-sidedness). A cell
finds its train and purify records by the roles its evaluations name (:func:`upstream_of`).

Records written before these facts were recorded (schema 1, e.g. the published leaderboard's)
lack them; :func:`upgrade` fills them from the installed plugins, the only source there is for
them. The installed plugins are never consulted for a record of the current schema.
"""

from __future__ import annotations

from collections import defaultdict
from statistics import mean
from typing import Any, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field

from .jobs import metric_infos, plugin_info
from .store import SCHEMA_VERSION, JobRecord, Metric, PluginInfo

#: the plugin kind a job of each kind runs, under that key of its config
PLUGIN_OF_JOB = {"train": "attack", "prepare": "attack", "purify": "defense", "evaluate": "evaluator"}
#: the roles of the first upstream keys (``deps``) of a record of each kind, for records that do not
#: name them (``JobRecord.upstream`` is empty in records written before it existed); an evaluation's
#: later keys (its clean model, other defenses' models) are not told apart by position and stay unnamed
POSITIONAL_ROLES = {"prepare": ("clean",), "train": ("prepare",), "purify": ("train",),
                    "evaluate": ("train", "purified")}


def upstream_of(rec: JobRecord) -> dict[str, str]:
    """Role -> key of a record's upstream jobs (``train``, ``purified``, ``prepare``, ``clean`` ...): the
    record's own ``upstream``, or for a record that does not name them, its ``deps`` read by position
    (:data:`POSITIONAL_ROLES`)."""
    if rec.upstream:
        return dict(rec.upstream)
    return dict(zip(POSITIONAL_ROLES.get(rec.kind, ()), rec.deps))


# ---------------------------------------------------------------- schema-1 records


def _mapping(value: Any) -> dict[str, Any]:
    """A record's config section as a dict: one that is not a mapping (a record that validates may
    hold anything there) reads as empty."""
    return dict(value) if isinstance(value, Mapping) else {}


def _name(ref: Mapping[str, Any]) -> str | None:
    """The plugin name of a config section (None where it names none, or not as a string)."""
    name = ref.get("name")
    return name if isinstance(name, str) else None


def _number(value: Any) -> float | None:
    """A recorded number as a float (one beyond the float range: an infinity); None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


def _installed(kind: str, name: str) -> type | None:
    try:
        from .registry import get_class

        return get_class(kind, name)
    except Exception:  # not installed (or the registry cannot load): the record keeps what it has
        return None


def _instance(cls: type | None, config: dict[str, Any]) -> Any:
    try:
        return cls(cls.Config(**config)) if cls is not None else None
    except Exception:
        return None


def installed_plugin_info(kind: str, ref: Mapping[str, Any], version: str | None = None) -> PluginInfo:
    """The :class:`PluginInfo` the installed plugin gives for the reference ``{name, config}`` (what
    a schema-1 record did not record), with the record's ``version``. A plugin that is not
    installed (or no longer takes the config) gives its name, version and raw config and no facts."""
    name, config = ref["name"], _mapping(ref.get("config"))
    plugin = _instance(_installed(kind, name), config)
    if plugin is None:
        return PluginInfo(name=name, version=version or "?", config=config)
    info = plugin_info(plugin)
    return info.model_copy(update={"version": version or info.version})


def installed_metric_info(name: str) -> dict[str, Metric]:
    """The metric metadata the installed evaluator ``name`` declares (empty when it is not installed)."""
    cls = _installed("evaluator", name)
    return metric_infos(cls) if cls is not None else {}


def _poison_rate(rec: JobRecord, plugin: PluginInfo | None, upstream: Mapping[str, JobRecord]) -> float | None:
    """A schema-1 record's poison rate: a train record's attack config (as configured, else as its
    metrics report it, else the installed attack's default); a purify or evaluate record's train record's."""
    if rec.kind == "train":
        raw = _mapping(_mapping(rec.config.get("attack")).get("config")).get("poison_rate")
        rate = raw if raw is not None else rec.metrics.get("poison_rate")
        if rate is None and plugin is not None:
            rate = plugin.config.get("poison_rate")
        if isinstance(rate, str):  # a schema-1 config may spell it as text
            try:
                rate = float(rate)
            except ValueError:
                return None
        return _number(rate)
    key = upstream_of(rec).get("train")
    train = upstream.get(key) if key is not None else None
    if train is None or train.kind != "train":
        return None
    return (train if train.schema_version >= SCHEMA_VERSION else upgrade(train)).attrs.poison_rate


def upgrade(record: JobRecord | Mapping[str, Any], upstream: Mapping[str, JobRecord] | None = None) -> JobRecord:
    """A schema-1 record as a current one: its ``plugin`` (the attack of a train or prepare job, the
    defense of a purify job, the evaluator of an evaluate job), an evaluate record's ``metric_info``,
    and the poison rate in ``attrs`` where it lacks one, all taken from the installed plugins, the
    only source there is for records that did not record them (``upstream``: key -> record, where a
    purify or evaluate record finds its train record's poison rate). A record of the current schema
    is returned as it is."""
    rec = record if isinstance(record, JobRecord) else JobRecord.model_validate(record)
    if rec.schema_version >= SCHEMA_VERSION:
        return rec
    upstream = upstream or {}
    kind = PLUGIN_OF_JOB.get(rec.kind)
    ref = rec.config.get(kind) if kind else None
    plugin = rec.plugin
    if plugin is None and isinstance(ref, Mapping) and ref.get("name") and isinstance(ref["name"], str):
        plugin = installed_plugin_info(kind, ref, rec.versions.get(kind))
    metric_info = rec.metric_info
    if not metric_info and rec.kind == "evaluate" and plugin is not None:
        metric_info = installed_metric_info(plugin.name)
    attrs = rec.attrs
    if attrs.poison_rate is None and attrs.attack is not None and rec.kind in ("train", "purify", "evaluate"):
        attrs = attrs.model_copy(update={"poison_rate": _poison_rate(rec, plugin, upstream)})
    return rec.model_copy(update={"plugin": plugin, "metric_info": metric_info, "attrs": attrs,
                                  "schema_version": SCHEMA_VERSION})


def upgrade_all(records: Iterable[JobRecord | Mapping[str, Any]]) -> list[JobRecord]:
    """:func:`upgrade` every record, each finding its upstream records among ``records``."""
    records = [r if isinstance(r, JobRecord) else JobRecord.model_validate(r) for r in records]
    if all(r.schema_version >= SCHEMA_VERSION for r in records):
        return records
    trains = {r.key: upgrade(r) for r in records if r.kind == "train"}  # first: the others read their rates
    return [trains[r.key] if r.kind == "train" else upgrade(r, trains) for r in records]


# ---------------------------------------------------------------- cells


class PluginSetup(BaseModel):
    """A plugin as a cell ran it: its name and effective config (defaults filled in)."""

    model_config = ConfigDict(frozen=True)

    name: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class Setup(BaseModel):
    """What a cell ran with, from its train and purify records: the data, the defender's reserve,
    the model (its recorded and installed architecture revision), the training recipe (defaults
    filled in), the attack and defense with their effective configs, and what replaces the attack's
    reference trigger (its ``substitute``, None when it is the reference one)."""

    model_config = ConfigDict(frozen=True)

    data: dict[str, Any] = Field(default_factory=dict)
    reserve: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)
    model_version: str | None = None
    installed_model_version: str | None = None
    recipe: dict[str, Any] = Field(default_factory=dict)
    attack: str | None = None
    attack_config: dict[str, Any] = Field(default_factory=dict)
    attack_substitute: str | None = None
    defense: str | None = None
    defense_config: dict[str, Any] = Field(default_factory=dict)


class Unfinished(BaseModel):
    """An evaluation of a cell that has no number: its status and the last line of its error."""

    model_config = ConfigDict(frozen=True)

    status: str
    reason: str = ""


class Cost(BaseModel):
    """The defense's cost in a cell: mean wall seconds of its purify jobs and the devices they ran on."""

    model_config = ConfigDict(frozen=True)

    wall_s: float | None = None
    device: list[str] = Field(default_factory=list)


class ResultCell(BaseModel):
    """One cell of results (see the module's doc).

    Attributes:
        metrics: metric (``<metric>@<label>`` for a labelled evaluator) -> mean over seeds.
        metric_info: the metadata of each metric the cell's evaluators declare (folded names alike).
        evaluator_of: metric -> the evaluator that produced it, with its effective config.
        status: evaluator label -> its unfinished outcome (failed, blocked, skipped).
        oracle: the defense uses the real trigger (never a contender for best).
        baseline: the defense returns the model as it is (the undefended reference row).
        setup: what the cell ran with (None when its train or purify record is missing).
        source: the name of the records' source, when several were folded apart.
        evaluations: the keys of its done evaluate records (what ``harness verify`` re-runs).
    """

    model_config = ConfigDict(frozen=True)

    dataset: str
    model: str | None
    model_revision: str | None = None
    installed_revision: str | None = None
    poison_rate: float | None = None
    attack: str | None
    defense: str | None
    metrics: dict[str, float] = Field(default_factory=dict)
    metric_info: dict[str, Metric] = Field(default_factory=dict)
    evaluator_of: dict[str, PluginSetup] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=list)
    status: dict[str, Unfinished] = Field(default_factory=dict)
    oracle: bool = False
    baseline: bool = False
    setup: Setup | None = None
    cost: Cost = Field(default_factory=Cost)
    source: str | None = None
    evaluations: list[str] = Field(default_factory=list)


def installed_revision(name: str | None) -> str | None:
    """The architecture revision the installed model ``name`` declares (None: none declared, or unknown)."""
    try:
        from .models import model_version

        return model_version(name) if name else None
    except Exception:
        return None


def _recipe(payload: dict | None) -> dict[str, Any]:
    """A recorded recipe with the defaults of the installed trainer filled in."""
    if not isinstance(payload, Mapping):
        return {}
    try:
        from .train import Recipe

        return {**Recipe(**payload).model_dump(mode="json"), **payload}
    except Exception:
        return dict(payload)


def _plugin_config(rec: JobRecord, kind: str) -> dict[str, Any]:
    if rec.plugin is not None:
        return dict(rec.plugin.config)
    return _mapping(_mapping(rec.config.get(kind)).get("config"))


def cell_setup(train: JobRecord | None, purify: JobRecord | None) -> Setup | None:
    """What a cell ran with, from its train and purify records (None without both)."""
    if train is None or purify is None:
        return None
    tc, pc = train.config, purify.config
    attack, defense = _mapping(tc.get("attack")), _mapping(pc.get("defense"))
    model = _mapping(tc.get("model"))
    return Setup(data=_mapping(tc.get("data")), reserve=_mapping(pc.get("reserve")), model=model,
                 model_version=train.versions.get("model"), installed_model_version=installed_revision(model.get("name")),
                 recipe=_recipe(tc.get("recipe")), attack=_name(attack),
                 attack_config=_plugin_config(train, "attack") if attack else {},
                 attack_substitute=train.plugin.substitute if train.plugin is not None else None,
                 defense=_name(defense), defense_config=_plugin_config(purify, "defense") if defense else {})


def evaluator_setup(evaluate: JobRecord) -> PluginSetup:
    """The evaluator of an evaluate record with its effective config."""
    if evaluate.plugin is not None:
        return PluginSetup(name=evaluate.plugin.name, config=evaluate.plugin.config)
    ref = _mapping(evaluate.config.get("evaluator"))
    name = ref.get("name")
    return PluginSetup(name=name if isinstance(name, str) else None, config=_mapping(ref.get("config")))


def collect(records: Iterable[JobRecord | Mapping[str, Any]], sources: list[str] | None = None) -> list[ResultCell]:
    """Fold evaluate records into cells, one per (data set, model, poison rate, attack, defense,
    model revision), in the order their first evaluations come (schema-1 records are upgraded
    first, see :func:`upgrade`).

    ``sources`` (the name of each record's source, e.g. its records file, in the order of
    ``records``): cells of different sources stay apart, and each cell then has its ``source``."""
    records = list(records)
    if sources is not None and len(sources) != len(records):
        raise ValueError(f"{len(sources)} sources for {len(records)} records")
    records = upgrade_all(records)
    by_key = {r.key: r for r in records}
    cells: dict[tuple, dict[str, Any]] = {}
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    costs: dict[tuple, list[tuple[float, str]]] = defaultdict(list)
    for rec, source in zip(records, sources or [None] * len(records)):
        a = rec.attrs
        if rec.kind == "purify" and rec.status == "done":
            costs[(source, a.dataset, a.model, a.attack, a.defense)].append((rec.wall_s or 0.0, rec.device or "?"))
        if rec.kind != "evaluate":
            continue
        roles = upstream_of(rec)
        train, purify = (by_key.get(roles[role]) if role in roles else None for role in ("train", "purified"))
        revision = train.versions.get("model") if train is not None else None
        # two revisions of one architecture never share a cell
        key = (source, a.dataset, a.model, a.poison_rate, a.attack, a.defense, revision)
        cell = cells.get(key)
        if cell is None:  # what the cell ran with: read once, from its first evaluation's upstream records
            setup = cell_setup(train, purify)
            fact = purify.plugin if purify is not None and purify.plugin is not None else None
            cell = cells[key] = {
                "dataset": a.dataset, "model": a.model, "model_revision": revision,
                "installed_revision": setup.installed_model_version if setup else installed_revision(a.model),
                "poison_rate": a.poison_rate, "attack": a.attack, "defense": a.defense,
                "oracle": bool(fact and fact.oracle), "baseline": bool(fact and fact.baseline),
                "setup": setup, "seeds": set(), "status": {}, "evaluator_of": {}, "metric_info": {},
                "evaluations": [],
                "source": source}
        label = a.evaluator or "?"
        produced_by = evaluator_setup(rec)
        folded = (lambda m: m) if label == (produced_by.name or label) else (lambda m: f"{m}@{label}")
        for m, info in rec.metric_info.items():
            if not info.curve:
                cell["metric_info"].setdefault(folded(m), info)
        if rec.status == "done":
            cell["evaluations"].append(rec.key)
            cell["seeds"].add(a.seed)
            for m, v in rec.metrics.items():
                if isinstance(v, (int, float)):  # curves stay in the store
                    values[key][folded(m)].append(_number(v) if not isinstance(v, bool) else float(v))
                    cell["evaluator_of"][folded(m)] = produced_by
        else:
            reason = (rec.error or "").strip().splitlines()[-1:] or [""]
            cell["status"][label] = Unfinished(status=rec.status, reason=reason[0])
    out = []
    for key, cell in cells.items():
        spent = costs.get((key[0], key[1], key[2], key[4], key[5]), [])
        out.append(ResultCell(**{**cell, "seeds": sorted(cell["seeds"]),
                                 "metrics": {m: mean(v) for m, v in values[key].items()},
                                 "cost": Cost(wall_s=mean(w for w, _ in spent) if spent else None,
                                              device=sorted({d for _, d in spent}))}))
    return out
