"""The typed jobs of a matrix's DAG: one spec type per kind, each naming its upstream jobs by role.

    PrepareJob   an attack's generated resources         upstream: clean (when the attack asks)
    TrainJob     an attacked model, or a clean reference  upstream: prepare (attacks that prepare)
    PurifyJob    a purified model                         upstream: train
    EvaluateJob  metrics of a purified model              upstream: train, purified, clean, defended

:func:`backdoor_harness.matrix.expand` builds them once; the scheduler, every
executor and the job handlers get the same objects. A job's key hashes its
kind, its ``payload`` (what it runs with: plugin names and configs, data,
model, recipe, seed), its upstream keys (``deps``, in the role order above)
and the versions of everything it runs, so a changed value anywhere re-runs
exactly the jobs downstream of it. Each job also carries what its records
say about it: the cell (:class:`~backdoor_harness.store.Cell`), its upstream
keys by role (``upstream``, what readers of records use), the plugin it
runs (:class:`~backdoor_harness.store.PluginInfo`) and, for an evaluation,
its metrics' metadata.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .store import Cell, Metric, PluginInfo

#: Bump when the core changes what a job computes (trainer, data pipeline):
#: it is part of every key, so old results are not reused.
CORE_VERSION = "2"


def job_key(kind: str, payload: dict, deps: list[str], versions: dict[str, str]) -> str:
    blob = json.dumps({"kind": kind, "payload": payload, "deps": deps, "versions": versions,
                       "core": CORE_VERSION}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class PluginCall:
    """A plugin as a job runs it: its name and the config the cell gives it (what enters the key)."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return {"name": self.name, "config": dict(self.config)}


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """What every kind of job has.

    Attributes:
        label: ``kind dataset/model/attack/defense/evaluator/seed``, for logs and boards.
        cell: where it sits in the matrix (recorded as the record's ``attrs``).
        seed: the cell's seed.
        versions: the versions of the plugins (and models) it runs.
        plugin: the plugin it runs as its records describe it (None: a clean model's training).
        key: the content hash (computed; see the module docstring).
    """

    kind: ClassVar[str]
    label: str
    cell: Cell
    seed: int
    versions: dict[str, str]
    plugin: PluginInfo | None = None
    key: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", job_key(self.kind, self.payload, self.deps, self.versions))

    @property
    def upstream(self) -> dict[str, str]:
        """Role -> key of every upstream job."""
        return {}

    @property
    def deps(self) -> list[str]:
        """The upstream keys in role order (what the key hashes)."""
        return list(self.upstream.values())

    @property
    def payload(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def metric_info(self) -> dict[str, Metric]:
        return {}


@dataclass(frozen=True, kw_only=True)
class PrepareJob(JobSpec):
    """An attack's generated resources, per data set (and per model, when it needs a clean model)."""

    kind: ClassVar[str] = "prepare"
    data: dict[str, Any]
    attack: PluginCall
    model: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None
    clean: str | None = None

    @property
    def upstream(self) -> dict[str, str]:
        return {"clean": self.clean} if self.clean else {}

    @property
    def payload(self) -> dict[str, Any]:
        extra = {"model": self.model, "recipe": self.recipe} if self.model is not None else {}
        return {"data": self.data, "attack": self.attack.payload(), "seed": self.seed, **extra}


@dataclass(frozen=True, kw_only=True)
class TrainJob(JobSpec):
    """A model trained on the cell's data set: attacked (``attack``) or the clean reference (None)."""

    kind: ClassVar[str] = "train"
    data: dict[str, Any]
    model: dict[str, Any]
    recipe: dict[str, Any]
    attack: PluginCall | None = None
    prepare: str | None = None

    @property
    def upstream(self) -> dict[str, str]:
        return {"prepare": self.prepare} if self.prepare else {}

    @property
    def payload(self) -> dict[str, Any]:
        return {"data": self.data, "model": self.model, "recipe": self.recipe,
                "attack": self.attack.payload() if self.attack else None, "seed": self.seed}


@dataclass(frozen=True, kw_only=True)
class PurifyJob(JobSpec):
    """A defense applied to an attacked model, with the defender's reserve."""

    kind: ClassVar[str] = "purify"
    defense: PluginCall
    reserve: dict[str, Any]
    train: str

    @property
    def upstream(self) -> dict[str, str]:
        return {"train": self.train}

    @property
    def payload(self) -> dict[str, Any]:
        return {"defense": self.defense.payload(), "seed": self.seed, "reserve": self.reserve}


@dataclass(frozen=True, kw_only=True)
class EvaluateJob(JobSpec):
    """An evaluator's metrics of a purified model.

    Attributes:
        train, purified: the attacked model and the purified one.
        clean: the clean reference model (evaluators that ask for it).
        defended: ``(defense name, purify key)`` of each other defense the evaluator asks for.
        metrics: the evaluator's metrics' metadata (what its records carry).
    """

    kind: ClassVar[str] = "evaluate"
    evaluator: PluginCall
    reserve: dict[str, Any]
    train: str
    purified: str
    clean: str | None = None
    defended: tuple[tuple[str, str], ...] = ()
    metrics: dict[str, Metric] = field(default_factory=dict)

    @property
    def upstream(self) -> dict[str, str]:
        roles = {"train": self.train, "purified": self.purified}
        if self.clean:
            roles["clean"] = self.clean
        roles.update({f"defended:{name}": key for name, key in self.defended})
        return roles

    @property
    def payload(self) -> dict[str, Any]:
        return {"evaluator": self.evaluator.payload(), "seed": self.seed, "reserve": self.reserve}

    @property
    def metric_info(self) -> dict[str, Metric]:
        return self.metrics


Job = PrepareJob | TrainJob | PurifyJob | EvaluateJob


def plugin_info(plugin: Any) -> PluginInfo:
    """What a job's records say about the plugin instance it runs: its effective config (every
    default filled in) and the facts results need (oracle, baseline, substitute)."""
    return PluginInfo(name=plugin.name, version=str(plugin.version), config=plugin.config.model_dump(mode="json"),
                      oracle="oracle_trigger" in getattr(plugin, "needs", ()),
                      baseline=bool(getattr(plugin, "baseline", False)),
                      substitute=getattr(plugin, "substitute", None))


def metric_infos(evaluator: Any) -> dict[str, Metric]:
    """The metrics an evaluator (instance or class) declares, as its records carry them."""
    return dict(evaluator.metrics)
