"""The results module: schema-1 records upgraded from the installed plugins, cells folded from typed
records, and a leaderboard that reads results without the registry."""

from __future__ import annotations

import ast
import json

import pytest

from backdoor_harness.results import collect, upgrade, upgrade_all, upstream_of
from backdoor_harness.store import SCHEMA_VERSION, Cell, JobRecord, Metric, PluginInfo

from helpers import ROOT

PUBLISHED = ROOT / "leaderboard" / "records" / "defenses-cpu.jsonl"


def schema_1(raw: dict) -> dict:
    """A published record as schema 1 wrote it: no plugin facts, no metric metadata, no upstream roles
    or predictions, and no poison rate in its cell (the published files were upgraded from such records)."""
    old = {k: v for k, v in raw.items() if k not in ("plugin", "metric_info", "predictions", "upstream")}
    attrs = {k: v for k, v in raw["attrs"].items() if v is not None and k != "poison_rate"}
    return {**old, "schema_version": 1, "attrs": attrs}


def published(kind: str, defense: str | None = None, evaluator: str | None = None) -> dict:
    """The first record of ``kind`` (with that defense and evaluator) of the published defenses run, as schema 1."""
    for line in PUBLISHED.read_text().splitlines():
        raw = json.loads(line)
        a = raw["attrs"]
        if raw["kind"] == kind and (defense is None or a.get("defense") == defense) \
                and (evaluator is None or a.get("evaluator") == evaluator):
            return schema_1(raw)
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


def test_reading_schema_1_records_upgrades_them(tmp_path):
    from backdoor_harness.submission import read_records

    old = tmp_path / "old.jsonl"
    lines = PUBLISHED.read_text().splitlines()
    old.write_text("".join(json.dumps(schema_1(json.loads(line))) + "\n" for line in lines))
    recs = read_records(old)
    assert all(r.schema_version == SCHEMA_VERSION for r in recs)
    evaluations = [r for r in recs if r.kind == "evaluate"]
    assert evaluations and all(r.metric_info and r.attrs.poison_rate == 0.1 for r in evaluations)
    cells = collect(recs)
    facts = {c.defense: (c.baseline, c.oracle) for c in cells}
    assert facts["none"] == (True, False) and facts["ep"] == (False, True) and facts["ft"] == (False, False)


def test_the_published_records_are_read_without_the_installed_plugins(monkeypatch):
    """Every published record file is of the current schema (schema-1 files were upgraded once, with
    :func:`upgrade`): the board takes its plugin facts and metric metadata from the records alone."""
    from backdoor_harness import results
    from backdoor_harness.submission import read_records

    files = sorted((ROOT / "leaderboard" / "records").glob("*.jsonl"))
    assert PUBLISHED in files
    for path in files:
        versions = {json.loads(line)["schema_version"] for line in path.read_text().splitlines() if line.strip()}
        assert versions == {SCHEMA_VERSION}, f"{path.name}: schema {sorted(versions)}; upgrade it once"
    monkeypatch.setattr(results, "_installed", lambda *a: pytest.fail("a published record asked the registry"))
    recs = [r for path in files for r in read_records(path)]
    cells = collect(recs)
    assert cells and all(c.metric_info for c in cells)
    facts = {c.defense: (c.baseline, c.oracle) for c in cells if c.model == "tiny_cnn" and c.attack == "badnets"}
    assert facts["none"] == (True, False) and facts["ep"] == (False, True)


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


def test_upstream_jobs_are_read_by_role_and_by_position_only_where_a_record_names_none():
    named = record("evaluate", "e", deps=["t", "p", "c", "p2"], upstream={"train": "t", "purified": "p", "clean": "c",
                                                                           "defended:ep": "p2"})
    assert upstream_of(named) == {"train": "t", "purified": "p", "clean": "c", "defended:ep": "p2"}
    # written before records named their roles: the first keys by position, the later ones unnamed
    assert upstream_of(record("evaluate", "e", deps=["t", "p", "c", "p2"])) == {"train": "t", "purified": "p"}
    assert upstream_of(record("purify", "p", deps=["t"])) == {"train": "t"}
    assert upstream_of(record("train", "t", deps=["r"])) == {"prepare": "r"}
    assert upstream_of(record("prepare", "r", deps=["c"])) == {"clean": "c"}
    assert upstream_of(record("train", "t")) == {}
    assert upstream_of(record("evaluate", "e", deps=["t"])) == {"train": "t"}


def test_a_cell_finds_its_train_and_purify_records_by_role_not_position():
    """Roles, not positions: deps in another order (here reversed) still give the cell its setup."""
    train = record("train", "t", config={"data": {"name": "ds"}, "model": {"name": "m"},
                                         "attack": {"name": "a", "config": {}}})
    purify = record("purify", "p", deps=["t"], upstream={"train": "t"}, config={"defense": {"name": "d1"}},
                    plugin=PluginInfo(name="d1", version="1", baseline=True))
    ev = record("evaluate", "e", deps=["p", "t"], upstream={"purified": "p", "train": "t"}, metrics={"s": 0.5},
                evaluator="s", metric_info={"s": Metric(higher_is_better=True)})
    (cell,) = collect([train, purify, ev])
    assert cell.setup is not None and cell.setup.defense == "d1" and cell.setup.data == {"name": "ds"}
    assert cell.baseline  # the purify record's fact: found as the 'purified' upstream
    (positional,) = collect([train, purify, ev.model_copy(update={"upstream": {}})])
    # the same record read by position takes the purify record for the train record: no defense, no fact
    assert positional.setup.defense is None and not positional.baseline


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
