"""Export and submission: the record schema, and what `harness leaderboard --add` accepts or refuses.

The forgeries are made the way an attacker would: install the harness, expand the published
matrices (``published_jobs``: what ``leaderboard/published.yaml`` lists) and write records for
their jobs with the keys the harness computes, then edit what the attacker wants to change."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backdoor_harness import __version__, cli, submission
from backdoor_harness.errors import HarnessError
from backdoor_harness.jobs import job_key
from backdoor_harness.store import SCHEMA_VERSION, JobRecord, Store, job_record
from backdoor_harness.submission import add_submission, published_jobs, read_records, record_schema

from helpers import ROOT, fresh_board, published_site, tiny_matrix


MATRIX = tiny_matrix("submission-test")
#: every character some reader takes for a line break (str.splitlines does for all of them)
SEPARATORS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A repository-like folder: configs/, leaderboard/published.yaml, and one exported run of its matrix."""
    return published_site(tmp_path_factory.mktemp("site"), MATRIX)


@pytest.fixture
def board(site, tmp_path) -> Path:
    """A fresh published leaderboard (nothing published yet) of the site's matrix: its published.yaml."""
    return fresh_board(site, tmp_path / "board")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def target_of(published: Path) -> Path:
    return published.parent / "records" / "submissions.jsonl"


def forge(published: Path, **metrics: float) -> list[dict]:
    """A complete run of the published matrix (seed 0) that was never run: records written for the
    published jobs, with the keys the harness computes, plausible numbers (``metrics`` override them)."""
    jobs, _ = published_jobs(published)
    out = []
    for job in jobs.values():
        values = {m: metrics.get(m, 0.5) for m in job.metric_info} if job.kind == "evaluate" else {}
        rec = job_record(job, "done", metrics=values, device="cpu (x86_64, 1 threads)", finished=2e9, wall_s=1.0)
        if job.kind != "evaluate":
            rec.artifact, rec.artifact_sha256 = f"artifacts/{job.key}.safetensors", "ab" * 32
        out.append(rec.model_dump(mode="json"))
    return out


def rekeyed(rec: dict, **fields) -> dict:
    """``rec`` with ``fields`` changed and its key recomputed from its own kind/config/deps/versions
    (what an attacker who edits them would do)."""
    rec = {**rec, **fields}
    return {**rec, "key": job_key(rec["kind"], rec["config"], rec["deps"], rec["versions"])}


def refused(path: Path, published: Path) -> str:
    """The refusal of ``path`` (asserting that nothing was written)."""
    target = target_of(published)
    before = target.read_bytes() if target.exists() else None
    with pytest.raises(HarnessError) as err:
        add_submission(path, published)
    assert (target.read_bytes() if target.exists() else None) == before
    return str(err.value)


def evaluate_of(records: list[dict], evaluator: str = "clean_acc", defense: str = "ft") -> dict:
    return next(r for r in records if r["kind"] == "evaluate" and r["attrs"]["evaluator"] == evaluator
                and r["attrs"]["defense"] == defense)


# ------------------------------------------------------------------ schema and export


def test_the_committed_json_schema_is_the_record_model():
    committed = json.loads((ROOT / "leaderboard" / "schema" / f"record-v{SCHEMA_VERSION}.json").read_text())
    assert committed == record_schema(), f"regenerate leaderboard/schema/record-v{SCHEMA_VERSION}.json from JobRecord"


def test_old_records_are_read_upgraded_but_never_accepted_as_a_submission(site, board, tmp_path):
    old = [{**r, "schema_version": 1, "plugin": None, "metric_info": {}} for r in lines(site / "run.jsonl")]
    path = write(tmp_path / "old.jsonl", old)
    recs = read_records(path)
    evaluate = next(r for r in recs if r.kind == "evaluate")
    assert evaluate.plugin is not None and evaluate.metric_info  # from the installed evaluator
    assert "schema_version 1, this harness reads 2 here" in refused(path, board)


def test_export_writes_every_record_valid_with_versions_seed_device_date(site):
    recs = read_records(site / "run.jsonl")
    store = Store(site / "work")
    assert [r.key for r in recs] == [r.key for r in store.records()]
    for r in recs:
        assert r.harness_version and r.versions and r.device and r.started and r.attrs.seed is not None
    assert (site / "run.jsonl").read_bytes().isascii()


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


def test_the_cli_refuses_with_exit_2_naming_file_and_line_and_renders_exported_records(site, board, tmp_path,
                                                                                     capsys):
    good = lines(site / "run.jsonl")
    evaluate = evaluate_of(good)
    bad = write(tmp_path / "bad.jsonl", [*good, {**evaluate, "metrics": {"clean_acc": 7.5}},
                                         {**good[0], "artifact": "/etc/passwd"}])
    assert cli.main(["leaderboard", "--add", str(bad), "--published", str(board)]) == 2
    err = capsys.readouterr().err
    n = len(good)
    assert err.startswith("error: ") and f"{bad} refused" in err
    assert f"{bad}:{n + 1}: metric 'clean_acc': 7.5 is outside its declared range [0, 1]" in err
    assert f"{bad}:{n + 1}: key {evaluate['key']} is already at {bad}:" in err
    assert f"{bad}:{n + 2}: artifact '/etc/passwd'" in err
    assert not target_of(board).exists()
    reported = tmp_path / "reported.yaml"
    reported.write_text("[]\n")
    assert cli.main(["leaderboard", "--records", str(site / "run.jsonl"), "--format", "markdown",
                     "--reported", str(reported)]) == 0
    out = capsys.readouterr().out
    assert "| none" in out and "| ft" in out


def test_the_published_leaderboard_lists_existing_matrices_and_valid_records():
    import yaml

    doc = yaml.safe_load((ROOT / "leaderboard" / "published.yaml").read_text())
    for spec in doc["matrices"]:
        assert (ROOT / spec).exists(), spec
    for path in sorted((ROOT / doc["records"]).glob("*.jsonl")):
        assert all(isinstance(r, JobRecord) for r in read_records(path))


# ------------------------------------------------------------------ forgeries (issue 18, item 1)


def test_a_plausible_forged_run_passes_the_checks_only_a_rerun_can_catch_it(board, tmp_path):
    """What --add cannot know: numbers invented for a cell nobody published yet (harness verify re-runs it)."""
    added, known, _ = add_submission(write(tmp_path / "forged.jsonl", forge(board)), board)
    assert added == len(forge(board)) and known == 0


def test_metrics_outside_their_declared_range_are_refused(board, tmp_path):
    jobs, _ = published_jobs(board)
    declared = {name: info.range for job in jobs.values() for name, info in job.metric_info.items()}
    assert declared["clean_acc"] == (0.0, 1.0) and declared["asr"] == (0.0, 1.0)  # the evaluators declare them
    text = refused(write(tmp_path / "s.jsonl", forge(board, clean_acc=7.5, asr=-3.0)), board)
    assert "metric 'clean_acc': 7.5 is outside its declared range [0, 1]" in text
    assert "metric 'asr': -3 is outside its declared range [0, 1]" in text


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinity_are_refused_not_turned_into_null(board, tmp_path, token):
    path = write(tmp_path / "s.jsonl", forge(board, clean_acc=0.123456))
    path.write_text(path.read_text().replace("0.123456", token))
    text = refused(path, board)
    assert "not a valid number" in text


@pytest.mark.parametrize("value", ["0.9", True, None, [0.5], {"v": 0.5}])
def test_metrics_that_are_not_numbers_are_refused(board, tmp_path, value):
    records = forge(board)
    evaluate_of(records)["metrics"]["clean_acc"] = value
    assert "metric 'clean_acc'" in refused(write(tmp_path / "s.jsonl", records), board)


def test_an_undeclared_metric_is_refused(board, tmp_path):
    records = forge(board)
    evaluate_of(records)["metrics"]["my_score"] = 0.99
    assert "metric 'my_score' is not one its evaluator declares (clean_acc)" in refused(
        write(tmp_path / "s.jsonl", records), board)


def test_a_forged_harness_version_is_refused(board, tmp_path):
    records = forge(board)
    evaluate_of(records)["harness_version"] = "9.9.9"
    assert f"harness_version '9.9.9': the published jobs are this harness's ({__version__})" in refused(
        write(tmp_path / "s.jsonl", records), board)


def test_forged_plugin_versions_are_refused_with_the_key_kept_or_recomputed(board, tmp_path):
    records = forge(board)
    evaluate = evaluate_of(records)
    kept = {**evaluate, "versions": {"evaluator": "99"}}  # the published key, other versions
    text = refused(write(tmp_path / "s.jsonl", [r for r in records if r is not evaluate] + [kept]), board)
    assert "is not the hash of the record's own kind, config, deps and versions" in text and "versions differ" in text
    recomputed = rekeyed(evaluate, versions={"evaluator": "99"})
    text = refused(write(tmp_path / "s.jsonl", [r for r in records if r is not evaluate] + [recomputed]), board)
    assert 'plugin versions {"evaluator": "99"} vs installed {"evaluator": "1"}' in text


def test_a_duplicate_key_is_refused_not_averaged_as_another_seed(board, tmp_path):
    records = forge(board)
    twin = {**evaluate_of(records), "metrics": {"clean_acc": 0.99}, "attrs": {**evaluate_of(records)["attrs"]}}
    text = refused(write(tmp_path / "s.jsonl", records + [twin]), board)
    assert f"key {twin['key']} is already at" in text
    seed = {**evaluate_of(records), "attrs": {**evaluate_of(records)["attrs"], "seed": 7}}  # another seed, same job
    text = refused(write(tmp_path / "s.jsonl", [r for r in records if r is not evaluate_of(records)] + [seed]), board)
    assert 'attrs {"attack": "badnets"' in text and "is not the published job's" in text


def test_a_published_record_is_never_replaced(board, tmp_path):
    records = forge(board)
    add_submission(write(tmp_path / "first.jsonl", records), board)
    before = target_of(board).read_bytes()
    evaluate_of(records)["metrics"] = {"clean_acc": 0.99}
    text = refused(write(tmp_path / "again.jsonl", records), board)
    assert "already published with other results; a published record is never replaced" in text
    assert add_submission(tmp_path / "first.jsonl", board)[:2] == (0, len(records))  # identical: nothing added
    assert target_of(board).read_bytes() == before


def test_emptied_deps_are_refused(board, tmp_path):
    records = forge(board)
    evaluate = evaluate_of(records)
    kept = {**evaluate, "deps": []}
    assert "deps differ from the published job" in refused(write(tmp_path / "s.jsonl", [kept]), board)
    assert "not a cell of the published matrices" not in refused(
        write(tmp_path / "s.jsonl", [rekeyed(evaluate, deps=[])]), board)


def test_records_name_their_upstream_by_role_and_a_forged_role_is_refused(board, tmp_path):
    records = forge(board)
    evaluate = evaluate_of(records)
    jobs, _ = published_jobs(board)
    assert evaluate["upstream"] == jobs[evaluate["key"]].upstream and list(evaluate["upstream"].values()) == \
        evaluate["deps"]
    train, purified = evaluate["upstream"]["train"], evaluate["upstream"]["purified"]
    cases = [{"train": purified, "purified": train},  # the roles swapped: the attacked model read as purified
             {"train": train},  # one role left out
             {"train": train, "purified": "f" * 24}]  # a key of no job
    for upstream in cases:
        forged = [r if r is not evaluate else {**evaluate, "upstream": upstream} for r in records]
        text = refused(write(tmp_path / "s.jsonl", forged), board)
        assert "upstream " in text and "is not the published job's" in text, (upstream, text)


def test_records_that_do_not_name_their_upstream_are_accepted(board, tmp_path):
    """Exported before records named roles (the field absent, or empty): deps carry the keys."""
    records = forge(board)
    absent = [{k: v for k, v in r.items() if k != "upstream"} for r in records]
    path = write(tmp_path / "s.jsonl", absent[: len(absent) // 2] + [{**r, "upstream": {}}
                                                                      for r in absent[len(absent) // 2:]])
    assert add_submission(path, board)[:2] == (len(records), 0)


def test_upstream_records_must_be_submitted_or_published(board, tmp_path):
    records = forge(board)
    evaluate = evaluate_of(records)
    alone = refused(write(tmp_path / "s.jsonl", [evaluate]), board)
    assert "its upstream job train cifar10/tiny_cnn/badnets/s0 is neither in the submission nor published" in alone
    add_submission(write(tmp_path / "up.jsonl", [r for r in records if r["kind"] != "evaluate"]), board)
    assert add_submission(write(tmp_path / "s.jsonl", [evaluate]), board)[:2] == (1, 0)  # its upstream is published


def test_an_evaluation_whose_upstream_failed_is_refused(board, tmp_path):
    records = forge(board)
    evaluate = evaluate_of(records)
    purify = next(r for r in records if r["key"] == evaluate["deps"][1])
    purify.update(status="failed", error="Traceback ...", artifact=None, artifact_sha256=None)
    text = refused(write(tmp_path / "s.jsonl", records), board)
    assert "status failed: submit finished jobs only" in text
    assert "its upstream job purify cifar10/tiny_cnn/badnets/ft/s0 is failed, not done" in text


@pytest.mark.parametrize("path", ["../../../../etc/passwd", "/etc/passwd", "artifacts/../../x.safetensors",
                                  "artifacts/0123.safetensors"])
def test_artifact_paths_from_outside_are_refused(board, tmp_path, path):
    records = forge(board)
    train = next(r for r in records if r["kind"] == "train")
    train["artifact"] = path
    assert f"artifact '{path}': a record's artifact is null or artifacts/{train['key']}.safetensors" in refused(
        write(tmp_path / "s.jsonl", records), board)


def test_forged_labels_configs_and_metric_metadata_are_refused(board, tmp_path):
    records = forge(board)
    evaluate = evaluate_of(records)
    cases = [
        ({**evaluate, "label": evaluate["label"].replace("/ft/", "/none/")}, "label "),
        ({**evaluate, "config": {**evaluate["config"], "reserve": {"reserve_ratio": 0.5}}}, "config differ"),
        ({**evaluate, "metric_info": {"clean_acc": {**evaluate["metric_info"]["clean_acc"], "range": [0, 1000]}}},
         "metric_info "),
        ({**evaluate, "plugin": {**evaluate["plugin"], "version": "2"}}, "plugin "),
    ]
    for forged, why in cases:
        text = refused(write(tmp_path / "s.jsonl", [r if r is not evaluate else forged for r in records]), board)
        assert why in text, (why, text)


def test_size_limits_per_line_and_per_file_are_checked_before_parsing(board, tmp_path, monkeypatch):
    records = forge(board)
    evaluate_of(records)["device"] = "x" * (submission.MAX_LINE_BYTES + 10)
    path = write(tmp_path / "s.jsonl", records)
    assert f"bytes, a record is at most {submission.MAX_LINE_BYTES} bytes" in refused(path, board)
    monkeypatch.setattr(submission, "MAX_FILE_BYTES", 1000)
    monkeypatch.setattr(submission, "_parse", lambda *a, **k: pytest.fail("parsed a file over the size limit"))
    monkeypatch.setattr(submission, "published_jobs", lambda *a, **k: pytest.fail("read before the size check"))
    assert "a submission is at most 1000 bytes" in refused(path, board)


def test_every_refusal_is_listed_with_its_line(board, tmp_path):
    records = forge(board)
    n = len(records)
    broken = [{**evaluate_of(records), "metrics": {"clean_acc": 2.0}, "key": "f" * 24}] * 3
    text = refused(write(tmp_path / "s.jsonl", records + broken), board)
    for line in range(n + 1, n + 4):
        assert f"s.jsonl:{line}: " in text


@pytest.mark.parametrize("field, value, why", [
    ("wall_s", -1e9, "wall_s -1e+09: the job's wall-clock seconds, a finite number, 0 or more"),
    ("started", -5.0, "started -5: a time (seconds since 1970), a finite number, 0 or more"),
    ("finished", 1.0, "finished 1 is before started "),
])
def test_forged_times_are_refused(board, tmp_path, capsys, field, value, why):
    """A negative cost on the board (wall_s -1e9), a time before 1970, a job that finished before it started."""
    records = forge(board)
    n = next(i for i, r in enumerate(records, 1) if r["kind"] == "purify" and r["attrs"]["defense"] == "ft")
    records[n - 1][field] = value
    path = write(tmp_path / "s.jsonl", records)
    assert f"{path}:{n}: {why}" in refused(path, board)
    assert cli.main(["leaderboard", "--add", str(path), "--published", str(board)]) == 2
    assert f"{path}:{n}: {why}" in capsys.readouterr().err


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_times_are_refused_even_when_they_get_past_json(value):
    """Strict JSON parsing refuses NaN and Infinity already; the record check does not rely on it."""
    from backdoor_harness.store import Cell

    rec = JobRecord(key="k", kind="purify", label="purify x", status="done", attrs=Cell(dataset="d", seed=0),
                    started=1.0, finished=2.0, wall_s=1.0)
    assert submission.timing_problems(rec) == []
    for field in ("started", "finished", "wall_s"):
        problems = submission.timing_problems(rec.model_copy(update={field: value}))
        assert problems and problems[0].startswith(f"{field} {value:g}: "), problems


# ------------------------------------------------------------------ an unwritable or full records folder


def test_add_to_a_records_folder_that_cannot_be_written_is_one_message(board, tmp_path, capsys):
    """The records folder under a regular file: the OS refuses to create it, root or not (chmod does not
    stop root)."""
    (board.parent / "blocker").write_text("a file, not a folder\n")
    board.write_text(board.read_text().replace("records: leaderboard/records", "records: leaderboard/blocker/records"))
    path = write(tmp_path / "s.jsonl", forge(board))
    assert cli.main(["leaderboard", "--add", str(path), "--published", str(board)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write the published records folder {board.parent / 'blocker' / 'records'} (")
    assert "nothing was added" in err and "run --add again" in err and err.count("\n") == 1, err
    assert (board.parent / "blocker").read_text() == "a file, not a folder\n"


@pytest.mark.parametrize("at", ["write", "replace"])
def test_add_on_a_full_disk_is_one_message_and_writes_nothing(board, tmp_path, capsys, monkeypatch, at):
    """A full disk (simulated as tests/core/test_store.py does): while the new file is flushed, or renamed into
    place. The records already published stay as they were, no temporary file is left behind."""
    import errno
    import os

    records = forge(board)
    first = [r for r in records if r["kind"] != "evaluate"]
    add_submission(write(tmp_path / "up.jsonl", first), board)
    folder = target_of(board).parent
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync" if at == "write" else "replace", no_space)
    path = write(tmp_path / "s.jsonl", records)
    assert cli.main(["leaderboard", "--add", str(path), "--published", str(board)]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot add to the published records in {folder}: the disk is full (")
    assert "nothing was added" in err and "free some space and run --add again" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary file either
    assert add_submission(path, board)[:2] == (len(records) - len(first), len(first))  # space again: it goes in


# ------------------------------------------------------------------ line separators (issue 18, item 2)


@pytest.mark.parametrize("escaped", [True, False], ids=["ascii-escaped", "raw"])
def test_every_unicode_line_separator_in_a_string_survives_add_and_the_leaderboard(site, board, tmp_path, capsys,
                                                                                escaped):
    records = lines(site / "run.jsonl")
    for r in records:
        r["device"] = f"cpu{SEPARATORS}end"
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=escaped) + "\n" for r in records), encoding="utf-8")
    added, _, target = add_submission(path, board)
    assert added == len(records)
    assert target.read_bytes().isascii() and target.read_bytes().count(b"\n") == len(records)
    back = read_records(target)
    assert [r.device for r in back] == [f"cpu{SEPARATORS}end"] * len(records)
    reported = tmp_path / "reported.yaml"  # none (the shipped file takes seconds to parse)
    reported.write_text("[]\n")
    for fmt in ("markdown", "html"):  # what `make leaderboard` runs
        assert cli.main(["leaderboard", "--records", str(target), "--format", fmt, "--reported", str(reported)]) == 0
    capsys.readouterr()
    again = write(tmp_path / "again.jsonl", [])  # a later --add still reads the published records
    again.write_text(path.read_text())
    assert add_submission(again, board)[:2] == (0, len(records))


def test_export_writes_ascii_escaped_lines(site, tmp_path):
    recs = [r.model_copy(update={"device": f"cpu{SEPARATORS}"}) for r in read_records(site / "run.jsonl")]
    store = Store(tmp_path / "work")
    for rec in recs:
        store.put(rec)
    out = tmp_path / "export.jsonl"
    assert store.export_jsonl(out) == len(recs)
    store.close()
    assert out.read_bytes().isascii() and out.read_bytes().count(b"\n") == len(recs)
    assert [r.device for r in read_records(out)] == [f"cpu{SEPARATORS}"] * len(recs)


# ------------------------------------------------------------------ fuzz (issue 18, done means)


def _json_values():
    scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
               | st.text(max_size=20))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                        max_leaves=12)


def _mutate(record: dict, data) -> dict:
    """``record`` with one field (top level, or inside attrs/metrics/config/metric_info) replaced or dropped."""
    record = json.loads(json.dumps(record))
    holder = record
    nested = [k for k in ("attrs", "metrics", "config", "plugin", "metric_info", "versions")
              if isinstance(record.get(k), dict) and record[k]]
    if nested and data.draw(st.booleans()):
        holder = record[data.draw(st.sampled_from(nested))]
    key = data.draw(st.sampled_from(sorted(holder)) | st.text(max_size=8))
    if data.draw(st.booleans()) and key in holder:
        del holder[key]
    else:
        holder[key] = data.draw(_json_values())
    return record


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_submission_lines_end_in_success_or_one_clear_refusal(site, tmp_path_factory, data):
    published = fresh_board(site, tmp_path_factory.mktemp("fuzz") / "board")
    valid = lines(site / "run.jsonl")
    kind = data.draw(st.sampled_from(["json", "text", "mutated", "mixed"]))
    if kind == "json":
        body = [json.dumps(data.draw(_json_values()))]
    elif kind == "text":
        body = [data.draw(st.text(max_size=200))]
    elif kind == "mutated":
        body = [json.dumps(r) for r in valid[:-1]] + [json.dumps(_mutate(valid[-1], data),
                                                                  ensure_ascii=data.draw(st.booleans()))]
    else:
        body = [json.dumps(data.draw(st.sampled_from(valid)) if data.draw(st.booleans()) else _mutate(
            data.draw(st.sampled_from(valid)), data)) for _ in range(data.draw(st.integers(1, 4)))]
    path = published.parents[1] / "s.jsonl"
    path.write_text("\n".join(body) + "\n", encoding="utf-8", errors="surrogatepass")
    folder = published.parent / "records"
    before = {p.name: p.read_bytes() for p in folder.glob("*")} if folder.exists() else {}
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["leaderboard", "--add", str(path), "--published", str(published)])
    after = {p.name: p.read_bytes() for p in folder.glob("*")} if folder.exists() else {}
    if rc == 2:
        text = err.getvalue()
        assert text.startswith("error: ") and "Traceback" not in text
        assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
    else:
        assert rc == 0
        for p in folder.glob("*.jsonl"):
            assert p.read_bytes().isascii()
            assert all(math.isfinite(v) for r in read_records(p) for v in r.metrics.values()
                       if isinstance(v, float))
