"""Export and submission: the record schema, and what `harness leaderboard --add` accepts or refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backdoor_harness import cli
from backdoor_harness.errors import HarnessError
from backdoor_harness.store import SCHEMA_VERSION, JobRecord, Store
from backdoor_harness.submission import add_submission, read_records, record_schema

from helpers import ROOT


MATRIX = """\
name: submission-test
datasets: [{name: cifar10, train_per_class: 20, test_per_class: 10}]
models: [{name: tiny_cnn, kwargs: {width: 8}}]
attacks: [{name: badnets, config: {stamp: after_augment}}]
defenses: [none, {name: ft, config: {epochs: 1}}]
evaluators: [clean_acc, asr]
recipe: {base: cpu-quick, epochs: 1}
"""


def test_the_committed_json_schema_is_the_record_model():
    committed = json.loads((ROOT / "leaderboard" / "schema" / f"record-v{SCHEMA_VERSION}.json").read_text())
    assert committed == record_schema(), f"regenerate leaderboard/schema/record-v{SCHEMA_VERSION}.json from JobRecord"


def test_old_records_are_read_upgraded_but_never_accepted_as_a_submission(site, tmp_path):
    published = site / "leaderboard" / "published.yaml"
    old = [{**r, "schema_version": 1, "plugin": None, "metric_info": {}} for r in lines(site / "run.jsonl")]
    path = write(tmp_path / "old.jsonl", old)
    recs = read_records(path)
    evaluate = next(r for r in recs if r.kind == "evaluate")
    assert evaluate.plugin is not None and evaluate.metric_info  # from the installed evaluator
    with pytest.raises(HarnessError, match="schema_version 1, this harness reads 2 here"):
        add_submission(path, published)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A repository-like folder: configs/, leaderboard/published.yaml, and one exported run of its matrix."""
    root = tmp_path_factory.mktemp("site")
    (root / "configs").mkdir()
    (root / "configs" / "m.yaml").write_text(MATRIX)
    (root / "leaderboard").mkdir()
    (root / "leaderboard" / "published.yaml").write_text("matrices: [configs/m.yaml]\nrecords: leaderboard/records\n")
    work = root / "work"
    assert cli.main(["run", str(root / "configs" / "m.yaml"), "--workdir", str(work), "--no-progress"]) == 0
    assert cli.main(["export", "--workdir", str(work), "--out", str(root / "run.jsonl")]) == 0
    return root


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_export_writes_every_record_valid_with_versions_seed_device_date(site):
    recs = read_records(site / "run.jsonl")
    store = Store(site / "work")
    assert [r.key for r in recs] == [r.key for r in store.records()]
    for r in recs:
        assert r.harness_version and r.versions and r.device and r.started and r.attrs.seed is not None


def test_an_exported_run_of_a_published_matrix_is_accepted_once(site):
    published = site / "leaderboard" / "published.yaml"
    added, known, target = add_submission(site / "run.jsonl", published)
    assert (added, known) == (len(lines(site / "run.jsonl")), 0)
    assert target == site / "leaderboard" / "records" / "submissions.jsonl"
    again = add_submission(site / "run.jsonl", published)  # finished jobs are never added twice
    assert again[:2] == (0, added)
    assert len(lines(target)) == added


def test_bad_lines_are_named_with_file_and_line(site, tmp_path):
    good = lines(site / "run.jsonl")
    bad = write(tmp_path / "bad.jsonl", [good[0], {**good[1], "status": "great"}, {**good[2], "schema_version": 9},
                                         {**good[3], "surprise": 1}])
    with open(bad, "a") as f:
        f.write("{not json\n")
    with pytest.raises(HarnessError) as err:
        read_records(bad)
    text = str(err.value)
    assert "4 problem(s)" in text
    assert f"{bad}:2: status:" in text and f"{bad}:3: schema_version 9" in text
    assert f"{bad}:4: surprise:" in text and f"{bad}:5: not JSON" in text


def test_refused_cells_say_why_and_nothing_is_written(site, tmp_path):
    good = lines(site / "run.jsonl")
    published = site / "leaderboard" / "published.yaml"
    evaluate = next(r for r in good if r["kind"] == "evaluate")
    purify = next(r for r in good if r["key"] == evaluate["deps"][1])
    other_version = {**purify, "key": "0" * 24, "versions": {"defense": "99"}}
    foreign = {**evaluate, "key": "1" * 24, "label": "evaluate elsewhere/x/y/z/asr/s0"}
    unfinished = {**evaluate, "status": "failed"}
    orphan = {**evaluate, "deps": ["2" * 24, "3" * 24]}
    target = site / "leaderboard" / "records" / "submissions.jsonl"
    before = target.read_text() if target.exists() else None
    for record, why in ((other_version, 'plugin versions {"defense": "99"} vs installed'),
                        (foreign, "not a cell of the published matrices"),
                        (unfinished, "status failed; submit finished evaluations only"),
                        (orphan, "are not in the submission; export the whole run"),
                        ({**evaluate, "harness_version": None}, "no harness_version")):
        with pytest.raises(HarnessError, match="refused") as err:
            add_submission(write(tmp_path / "s.jsonl", [record]), published)
        assert why in str(err.value)
    assert (target.read_text() if target.exists() else None) == before


def test_the_cli_refuses_with_exit_2_and_renders_exported_records(site, tmp_path, capsys):
    bad = write(tmp_path / "bad.jsonl", [{"kind": "evaluate"}])
    assert cli.main(["leaderboard", "--add", str(bad), "--published",
                     str(site / "leaderboard" / "published.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a valid export" in err and "bad.jsonl:1: key:" in err
    assert cli.main(["leaderboard", "--records", str(site / "run.jsonl"), "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert "| none" in out and "| ft" in out


def test_the_published_leaderboard_lists_existing_matrices_and_valid_records():
    import yaml

    doc = yaml.safe_load((ROOT / "leaderboard" / "published.yaml").read_text())
    for spec in doc["matrices"]:
        assert (ROOT / spec).exists(), spec
    for path in sorted((ROOT / doc["records"]).glob("*.jsonl")):
        assert all(isinstance(r, JobRecord) for r in read_records(path))
