"""`harness verify` and `harness leaderboard --add --verify`: sampled evaluations re-run here and compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backdoor_harness import cli
from backdoor_harness.errors import HarnessError
from backdoor_harness.golden import MIN_DELTA
from backdoor_harness.store import Metric
from backdoor_harness.submission import add_submission, read_records
from backdoor_harness.submission import verify_submission as verify
from backdoor_harness.verify import load_verified, tolerance, verified_path

from helpers import fresh_board, published_site

MATRIX = """\
name: verify-test
datasets: [{name: cifar10, train_per_class: 10, test_per_class: 5}]
models: [{name: tiny_cnn, kwargs: {width: 4}}]
attacks: [{name: badnets, config: {stamp: after_augment}}]
defenses: [none]
evaluators: [clean_acc]
recipe: {base: cpu-quick, epochs: 1}
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A published leaderboard of a one-cell matrix and an honest exported run of it."""
    return published_site(tmp_path_factory.mktemp("verify-site"), MATRIX)


@pytest.fixture
def board(site, tmp_path) -> Path:
    """A fresh published leaderboard (nothing published yet) of the site's matrix: its published.yaml."""
    return fresh_board(site, tmp_path / "board")


def invented(site: Path, tmp_path: Path) -> Path:
    """The honest run with its evaluation's number moved by 0.3 (the key still holds: metrics are not
    part of it), as a submitter filling a cell without running it would."""
    records = [json.loads(line) for line in (site / "run.jsonl").read_text().split("\n") if line.strip()]
    for r in records:
        if r["kind"] == "evaluate":
            claimed = r["metrics"]["clean_acc"]
            r["metrics"]["clean_acc"] = claimed + 0.3 if claimed < 0.5 else claimed - 0.3
    path = tmp_path / "invented.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_an_honest_run_verifies_and_an_invented_number_does_not(site, board, tmp_path, capsys):
    result = verify(site / "run.jsonl", 1, seed=0, device="cpu", published=board, log=lambda *_: None)
    assert result.ok and len(result.cells) == 1
    [cell] = result.cells
    [check] = cell.metrics
    assert check.name == "clean_acc" and check.claimed == check.rerun and check.tolerance == MIN_DELTA
    forged = invented(site, tmp_path)
    assert cli.main(["verify", str(forged), "--sample", "1", "--seed", "3", "--device", "cpu",
                     "--published", str(board)]) == 1
    out, err = capsys.readouterr()
    assert "MISMATCH" in out and "clean_acc: claimed" in err and "--seed 3" in err
    assert cli.main(["verify", str(site / "run.jsonl"), "--sample", "1", "--device", "cpu",
                     "--published", str(board)]) == 0
    assert "match the claims (--seed " in capsys.readouterr().out


def test_add_verify_refuses_a_mismatch_and_records_verified_cells(site, board, tmp_path, capsys):
    forged = invented(site, tmp_path)
    target = board.parent / "records" / "submissions.jsonl"
    assert cli.main(["leaderboard", "--add", str(forged), "--verify", "1", "--device", "cpu",
                     "--published", str(board)]) == 2
    assert "refused: re-running 1 of its evaluations here gave other numbers" in capsys.readouterr().err
    assert not target.exists() and not verified_path(target).exists()
    added, known, target = add_submission(site / "run.jsonl", board, verify=1, seed=0, device="cpu",
                                          log=lambda *_: None)
    evaluate = next(r for r in read_records(target) if r.kind == "evaluate")
    doc = load_verified(target)
    assert verified_path(target) == target.parent / "submissions.verified.json"
    assert set(doc) == {evaluate.key}
    entry = doc[evaluate.key]
    assert entry["claimed"] == entry["rerun"] == evaluate.metrics and entry["label"] == evaluate.label
    assert set(entry) == {"label", "claimed", "rerun", "tolerance", "device", "date", "harness_version", "seed"}
    assert entry["device"].startswith("cpu") and entry["seed"] == 0
    # the board marks the verified cell, and only it
    empty = tmp_path / "reported.yaml"
    empty.write_text("[]\n")
    capsys.readouterr()
    assert cli.main(["leaderboard", "--records", str(target), "--format", "markdown", "--reported", str(empty)]) == 0
    board_text = capsys.readouterr().out
    marked = [line for line in board_text.splitlines() if "\u2713" in line and line.startswith("|")]
    assert len(marked) == 1 and "re-run by `harness verify` and matched" in board_text
    verified_path(target).unlink()
    assert cli.main(["leaderboard", "--records", str(target), "--format", "markdown", "--reported", str(empty)]) == 0
    assert "\u2713" not in capsys.readouterr().out


def test_verify_needs_a_valid_submission_and_a_sample(site, board, tmp_path):
    with pytest.raises(HarnessError, match="--sample 0: re-run at least one evaluation"):
        verify(site / "run.jsonl", 0, device="cpu", published=board)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "evaluate"}\n')
    with pytest.raises(HarnessError, match="is not a valid export"):
        verify(bad, 1, device="cpu", published=board)
    with pytest.raises(HarnessError, match="not a torch device"):
        verify(site / "run.jsonl", 1, device="gpu7", published=board)


def test_add_verify_names_its_own_option_when_n_is_negative(site, board, capsys):
    assert cli.main(["leaderboard", "--add", str(site / "run.jsonl"), "--verify", "-1", "--device", "cpu",
                     "--published", str(board)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --verify -1: how many of its evaluations to re-run") and "--sample" not in err, err
    assert not (board.parent / "records").exists()


def test_add_verify_on_a_full_disk_adds_neither_the_records_nor_their_verification(site, board, monkeypatch,
                                                                                   capsys):
    """The records and the verification file beside them are both written and flushed before either is
    renamed into place: a full disk while the second is flushed leaves neither."""
    import errno
    import os

    fsync = os.fsync

    def no_space_for_the_second(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))  # Linux, as the records folder's flock
        if name.startswith(".submissions.verified.json.") and name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", no_space_for_the_second)
    assert cli.main(["leaderboard", "--add", str(site / "run.jsonl"), "--verify", "1", "--seed", "0", "--device",
                     "cpu", "--published", str(board)]) == 2
    monkeypatch.undo()
    assert "the disk is full" in capsys.readouterr().err
    folder = board.parent / "records"
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # no records, no verification, no temporary file


def test_tolerances_are_the_golden_floor_scaled_for_metrics_that_are_not_rates_and_golden_spread_when_known():
    rate = Metric(higher_is_better=True)
    count = Metric(higher_is_better=True, percent=False)
    assert tolerance(rate, 0.5) == MIN_DELTA
    assert tolerance(count, 300.0) == pytest.approx(3.0) and tolerance(count, 0.2) == MIN_DELTA
    assert tolerance(rate, 0.5, golden_delta=0.04) == 0.04 and tolerance(rate, 0.5, golden_delta=0.001) == MIN_DELTA
    assert tolerance(rate, [0.1, 0.9]) == MIN_DELTA


def test_golden_deltas_apply_to_the_very_jobs_a_golden_file_measured(tmp_path):
    from backdoor_harness.golden import golden_spec, load_golden
    from backdoor_harness.matrix import expand
    from backdoor_harness.verify import golden_deltas

    from helpers import ROOT, fresh_board, published_site

    path = ROOT / "tests" / "golden" / "tiny.yaml"
    doc = load_golden(path)
    job = next(j for j in expand(golden_spec(doc, doc["seeds_measured"][1])) if j.kind == "evaluate")
    check = next(c for c in doc["checks"] if (c["dataset"], c["model"], c["attack"], c["defense"]) == (
        job.cell.dataset, job.cell.model, job.cell.attack, job.cell.defense) and c["metric"] in job.metrics
        and c.get("kind", "absolute") == "absolute")
    deltas = golden_deltas([path], {job.key, "0" * 24}, log=lambda *_: None)
    assert deltas[job.key][check["metric"]] == check["delta"] and "0" * 24 not in deltas


def test_a_cell_checked_only_paired_gets_the_spread_of_its_own_values(tmp_path):
    """A paired check's delta is the spread of a difference; a re-run is allowed the spread of the value itself,
    rebuilt seed by seed from the paired values and the baseline's."""
    import yaml

    from backdoor_harness.golden import golden_spec, load_golden
    from backdoor_harness.matrix import expand
    from backdoor_harness.verify import golden_deltas

    from helpers import ROOT

    doc = load_golden(ROOT / "tests" / "golden" / "tiny.yaml")
    doc["seeds_measured"] = [0, 1, 2]
    where = {"dataset": "cifar10", "model": "tiny_cnn", "attack": "badnets", "metric": "clean_acc",
             "direction": "min"}
    doc["checks"] = [{**where, "defense": "none", "kind": "absolute", "ref": 0.49, "delta": 0.06,
                      "values": [0.5, 0.46, 0.52]},
                     {**where, "defense": "ep", "kind": "paired", "baseline": "none", "ref": -0.0167, "delta": 0.01,
                      "values": [-0.02, -0.02, -0.01]}]
    path = tmp_path / "paired.yaml"
    path.write_text(yaml.safe_dump({**doc, "format": 2}))
    job = next(j for j in expand(golden_spec(doc, 1)) if j.kind == "evaluate" and j.cell.defense == "ep"
               and "clean_acc" in j.metrics)
    deltas = golden_deltas([path], {job.key}, log=lambda *_: None)
    assert deltas[job.key]["clean_acc"] == pytest.approx(0.07)  # 0.48, 0.44, 0.51; not the paired 0.01
