"""`python -m backdoor_harness.gpu_queue mark-done`: an item marked done with its results, from
scripts/device-run's summary.json or by hand, the rest of the queue file kept line for line."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from backdoor_harness.errors import HarnessError
from backdoor_harness.gpu_queue import Result, load_queue, main, mark_done

QUEUE = """\
# The queue (a comment that stays).
items:

- id: first
  description: a benchmark
  commands:
  - python3 benchmarks/x.py | tee "$ITEM_OUT/x.md"
  expected_min: {h200: 4.0}
  estimate: a guess

# a comment before an item
- id: second
  description: a matrix
  matrix: configs/quickstart.yaml
  expected_min: {h200: 6.5}
  estimate: 'a guess,
    over two lines'
  status: blocked
  blocked_by: 'the trainer''s speed;
    a second line'
  # a comment inside it

- id: third
  description: the last
  commands: ["true"]
  expected_min: {h200: 1}
  estimate: e
"""

RESULT = Result(records="leaderboard/records/quickstart.h200.jsonl", readme="GPU results",
                date=datetime.date(2026, 12, 4), device="NVIDIA H200")


def summary(tmp: Path, result: str = "ran", records: str | None = "records/quickstart.h200.jsonl") -> Path:
    """A summary.json as scripts/device-run packs it (the fields mark-done reads, and others)."""
    path = tmp / "summary.json"
    path.write_text(json.dumps({
        "device": "NVIDIA H200", "kind": "h200", "commit": "abc1234", "preflight": "passed", "budget_s": 540,
        "started": "2026-12-04T10:11:12+00:00", "installed": [], "notes": [],
        "items": [{"id": "first", "description": "a benchmark", "expected_min": 4.0, "minutes": None,
                   "records": None, "result": "skipped", "why": "expected 4 min > 1 min left"},
                  {"id": "second", "description": "a matrix", "expected_min": 6.5, "minutes": 5.9,
                   "records": records, "result": result, "why": ""}]}))
    return path


def test_marking_an_item_done_changes_only_its_status_and_results():
    text = mark_done(QUEUE, "second", RESULT)
    before, after = QUEUE.split("\n"), text.split("\n")
    assert after[:17] == before[:17]  # everything up to the item's status, its two-line estimate included
    assert after[17:25] == ["  # a comment inside it", "  status: done", "  results:",
                            "  - records: leaderboard/records/quickstart.h200.jsonl", "    readme: GPU results",
                            "    date: '2026-12-04'", "    device: NVIDIA H200", ""]
    assert after[24:] == before[21:]  # the next item as it was
    item = load_queue_text(text).get("second")
    assert (item.status, item.blocked_by, item.results) == ("done", None, [RESULT])
    # a second run of it adds a result; the last item of a file can be marked too
    again = mark_done(text, "second", RESULT.model_copy(update={"readme": None, "device": "NVIDIA H100"}))
    assert [r.device for r in load_queue_text(again).get("second").results] == ["NVIDIA H200", "NVIDIA H100"]
    last = mark_done(QUEUE, "third", RESULT)
    assert last.startswith(QUEUE.rstrip("\n")) and load_queue_text(last).get("third").status == "done"


def load_queue_text(text: str):
    from backdoor_harness.gpu_queue import _parse

    return _parse(text, "test")


def test_an_unknown_item_is_refused():
    with pytest.raises(HarnessError, match="no item 'fourth'"):
        mark_done(QUEUE, "fourth", RESULT)


def test_mark_done_reads_device_run_s_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpu-queue.yaml").write_text(QUEUE)
    argv = ["mark-done", "second", "--queue", "gpu-queue.yaml", "--summary", str(summary(tmp_path)),
            "--readme", "GPU results"]
    assert main(argv) == 2  # the records are not in leaderboard/records/ yet
    assert "leaderboard/records/quickstart.h200.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "leaderboard" / "records").mkdir(parents=True)
    (tmp_path / RESULT.records).write_text("")
    assert main(argv) == 0
    assert "second done" in capsys.readouterr().out
    assert load_queue(tmp_path / "gpu-queue.yaml").get("second").results == [RESULT]


@pytest.mark.parametrize("change, message", [
    ({"result": "failed"}, "did not run to the end (failed"),
    ({"records": None}, "exported no records"),
])
def test_a_summary_that_does_not_say_the_item_ran_is_refused(tmp_path, capsys, change, message):
    (tmp_path / "gpu-queue.yaml").write_text(QUEUE)
    assert main(["mark-done", "second", "--queue", str(tmp_path / "gpu-queue.yaml"),
                 "--summary", str(summary(tmp_path, **change))]) == 2
    assert message in capsys.readouterr().err
    assert main(["mark-done", "third", "--queue", str(tmp_path / "gpu-queue.yaml"),
                 "--summary", str(summary(tmp_path))]) == 2
    assert "item 'third' is not in this run" in capsys.readouterr().err
    assert (tmp_path / "gpu-queue.yaml").read_text() == QUEUE


def test_mark_done_by_hand_needs_the_records_date_and_device(tmp_path, capsys):
    (tmp_path / "gpu-queue.yaml").write_text(QUEUE)
    (tmp_path / "r.jsonl").write_text("")
    queue = str(tmp_path / "gpu-queue.yaml")
    assert main(["mark-done", "first", "--queue", queue, "--records", str(tmp_path / "r.jsonl")]) == 2
    assert "give --summary or --date, --device" in capsys.readouterr().err
    assert main(["mark-done", "first", "--queue", queue, "--records", str(tmp_path / "r.jsonl"),
                 "--date", "2026-12-05", "--device", "NVIDIA H200"]) == 0
    [result] = load_queue(queue).get("first").results
    assert (result.records, result.readme, result.date) == (str(tmp_path / "r.jsonl"), None, datetime.date(2026, 12, 5))
