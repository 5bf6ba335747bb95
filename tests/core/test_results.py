"""The results module: schema-1 records upgraded from the installed plugins, cells folded from typed
records, and a leaderboard that reads results without the registry."""

from __future__ import annotations

import ast
import json

import pytest

from backdoor_harness.results import collect, upgrade, upgrade_all
from backdoor_harness.store import SCHEMA_VERSION, Cell, JobRecord, Metric, PluginInfo

from helpers import ROOT

PUBLISHED = ROOT / "leaderboard" / "records" / "defenses-cpu.jsonl"


def published(kind: str, defense: str | None = None, evaluator: str | None = None) -> dict:
    for line in PUBLISHED.read_text().splitlines():
        raw = json.loads(line)
        a = raw["attrs"]
        if raw["kind"] == kind and (defense is None or a.get("defense") == defense) \
                and (evaluator is None or a.get("evaluator") == evaluator):
            return raw
    raise LookupError((kind, defense, evaluator))


def test_a_schema_1_record_is_upgraded_from_the_installed_plugins():
    train = JobRecord.model_validate(published("train"))
    assert train.schema_version == 1 and train.plugin is None and train.attrs.poison_rate is None
    new = upgrade(train)
    assert new.schema_version == SCHEMA_VERSION
    assert new.plugin.name == "badnets" and new.plugin.version == train.versions["attack"]
    assert new.plugin.config["poison_rate"] == new.attrs.poison_rate == 0.1  # the installed default, filled in
    ep = upgrade(JobRecord.model_validate(published("purify", "ep")), {train.key: new})
    assert ep.plugin.oracle and not ep.plugin.baseline and ep.attrs.poison_rate == 0.1
    none = upgrade(JobRecord.model_validate(published("purify", "none")), {train.key: new})
    assert none.plugin.baseline and not none.plugin.oracle
    ev = upgrade(JobRecord.model_validate(published("evaluate", "ep", "asr")))
    assert ev.plugin.name == "asr" and set(ev.metric_info) == {"asr"}
    assert ev.metric_info["asr"].higher_is_better is False
    assert ev.attrs.poison_rate is None  # without its train record, no rate to read
    assert upgrade(ev) is ev  # a current record stays as it is


def test_reading_the_published_records_upgrades_them():
    from backdoor_harness.submission import read_records

    recs = read_records(PUBLISHED)
    assert all(r.schema_version == SCHEMA_VERSION for r in recs)
    evaluations = [r for r in recs if r.kind == "evaluate"]
    assert evaluations and all(r.metric_info and r.attrs.poison_rate == 0.1 for r in evaluations)
    cells = collect(recs)
    facts = {c.defense: (c.baseline, c.oracle) for c in cells}
    assert facts["none"] == (True, False) and facts["ep"] == (False, True) and facts["ft"] == (False, False)


def record(kind: str, key: str, deps=(), metrics=None, evaluator=None, label=None, defense="d1", **fields):
    cell = Cell(dataset="ds", model="m", attack="a", seed=fields.pop("seed", 0), poison_rate=0.05,
                defense=defense if kind in ("purify", "evaluate") else None, evaluator=label or evaluator)
    return JobRecord(key=key, label=key, kind=kind, status=fields.pop("status", "done"), attrs=cell,
                     deps=list(deps), metrics=metrics or {}, **fields)


def test_collect_reads_everything_from_typed_records():
    """The facts and metadata come from the records, not from any installed plugin: the names here
    are of no installed plugin."""
    info = {"score": Metric(higher_is_better=True, title="Score", board=0),
            "curve": Metric(higher_is_better=True, curve=True)}
    train = record("train", "t", config={"data": {"name": "ds"}, "model": {"name": "m"}, "recipe": {"epochs": 3},
                                         "attack": {"name": "a", "config": {}}},
                   plugin=PluginInfo(name="a", version="1", config={"strength": 2}, substitute="its own"))
    purify = record("purify", "p", deps=["t"], config={"defense": {"name": "d1", "config": {}}, "reserve": {"r": 1}},
                    plugin=PluginInfo(name="d1", version="1", config={"k": 3}, oracle=True), wall_s=4.0, device="gpu")
    ev = [record("evaluate", f"e{s}", deps=["t", "p"], seed=s, metrics={"score": v, "curve": [0.0, 1.0]},
                 evaluator="scorer", plugin=PluginInfo(name="scorer", version="1", config={"n": 5}), metric_info=info)
          for s, v in ((0, 0.2), (1, 0.4))]
    labelled = record("evaluate", "e-l", deps=["t", "p"], metrics={"score": 0.9}, evaluator="scorer",
                      label="scorer_b", plugin=PluginInfo(name="scorer", version="1"), metric_info=info)
    failed = record("evaluate", "e-f", deps=["t", "p"], evaluator="other", status="failed",
                    error="Traceback\nRuntimeError: no", plugin=PluginInfo(name="other", version="1"),
                    metric_info={"extra": Metric(higher_is_better=False, board=1)})
    (cell,) = collect([train, purify, *ev, labelled, failed])
    assert (cell.dataset, cell.model, cell.attack, cell.defense, cell.poison_rate) == ("ds", "m", "a", "d1", 0.05)
    assert cell.metrics == {"score": pytest.approx(0.3), "score@scorer_b": 0.9} and cell.seeds == [0, 1]
    assert set(cell.metric_info) == {"score", "score@scorer_b", "extra"}  # curves are not cell metrics
    assert cell.metric_info["score@scorer_b"].title == "Score"
    assert cell.oracle and not cell.baseline
    assert cell.status["other"].status == "failed" and cell.status["other"].reason == "RuntimeError: no"
    assert cell.setup.attack_config == {"strength": 2} and cell.setup.attack_substitute == "its own"
    assert cell.setup.defense_config == {"k": 3} and cell.setup.reserve == {"r": 1}
    assert cell.setup.recipe["epochs"] == 3 and "lr" in cell.setup.recipe  # the trainer's defaults filled in
    assert cell.evaluator_of["score"].config == {"n": 5}
    assert (cell.cost.wall_s, cell.cost.device) == (4.0, ["gpu"])
    assert upgrade_all([train]) == [train]  # current records: the installed plugins are never asked


def test_the_leaderboard_imports_only_results_and_record_types_from_the_core():
    """From the core, leaderboard/*.py import only results, store (record types) and errors: never the
    registry, the models, the trainer or the matrix. (A source check: the package's ``__init__``
    imports the registry, so a run-time check of ``sys.modules`` cannot tell.)"""
    allowed = {"backdoor_harness.results", "backdoor_harness.store", "backdoor_harness.errors"}
    for path in sorted((ROOT / "leaderboard").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # within the leaderboard package
                    continue
                name = ("backdoor_harness." if node.level == 2 else "") + (node.module or "")
                if node.level == 2 and not node.module:
                    name = "backdoor_harness"
                names = [name] if name != "backdoor_harness" else [f"{name}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("backdoor_harness"):
                    assert name in allowed, f"{path.name} imports {name}"
