"""The store's bad days: a corrupt or truncated database, one bad row, a read-only work directory, a
full disk (the database's or the checkpoints'), and JSONL export that no Unicode line separator can
split. Each ends in one clear message (or a warning and a skipped row), never a raw sqlite3
traceback, and never a job marked done that is not."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from backdoor_harness.cli import main
from backdoor_harness.errors import HarnessError
from backdoor_harness.matrix import MatrixSpec
from backdoor_harness.scheduler import run_matrix
from backdoor_harness.store import Cell, JobRecord, Store

#: every character str.splitlines() splits on, beyond "\n"
SEPARATORS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"

TINY = {"name": "tiny", "datasets": [{"name": "cifar10", "train_per_class": 10, "test_per_class": 5}],
        "models": [{"name": "tiny_cnn", "kwargs": {"width": 4}}],
        "attacks": [{"name": "badnets", "config": {"stamp": "after_augment"}}],
        "defenses": ["none"], "evaluators": ["clean_acc"], "recipe": {"base": "cpu-quick", "epochs": 1}}


def harness(capsys, *args: str) -> tuple[int, str, str]:
    """``harness ARGS`` in this process: its exit status, stdout and stderr (a traceback fails the test)."""
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


#: runs ``harness`` commands (argv lists, one JSON list per line of stdin) in one process and prints a
#: JSON line per command: its exit status and standard error
READER = """
import contextlib, io, json, sys
from backdoor_harness.cli import main
for line in sys.stdin:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(json.loads(line))
        except BaseException as exc:
            import traceback
            rc, _ = 99, err.write(traceback.format_exc())
    print(json.dumps([rc, err.getvalue()]), flush=True)
"""


def record(key: str, **fields) -> JobRecord:
    return JobRecord(key=key, kind="evaluate", label=f"job {key}", status="done",
                     attrs=Cell(dataset="cifar10", seed=0), **fields)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A work directory holding a finished tiny matrix (copy it before changing it)."""
    work = tmp_path_factory.mktemp("store") / "work"
    counts = run_matrix(MatrixSpec.model_validate(TINY), work, progress=False, log=lambda *a: None)
    assert counts["failed"] == 0 and counts["done"] >= 3, counts
    return work


@pytest.fixture
def work(finished, tmp_path) -> Path:
    copy = tmp_path / "work"
    shutil.copytree(finished, copy)
    return copy


def rows(work: Path) -> dict[str, tuple[str, str]]:
    con = sqlite3.connect(work / "results.sqlite")
    try:
        return {k: (kind, status) for k, kind, status in con.execute("SELECT key, kind, status FROM jobs")}
    finally:
        con.close()


# -- JSONL export --------------------------------------------------------------------------------


def test_export_jsonl_is_ascii_and_no_line_separator_splits_a_record(tmp_path):
    store = Store(tmp_path / "w")
    texts = [f"a{sep}b" for sep in SEPARATORS] + ["caf\u00e9 \U0001f600 \u2028\u2029"]
    for i, text in enumerate(texts):
        store.put(record(f"k{i}", error=text, config={"note": text}))
    out = tmp_path / "out.jsonl"
    assert store.export_jsonl(out) == len(texts)
    store.close()
    raw = out.read_bytes()
    assert raw.isascii()
    lines = raw.decode().splitlines()  # the strictest splitter: every separator above splits here
    assert len(lines) == len(texts)
    back = {json.loads(line)["key"]: json.loads(line) for line in lines}
    for i, text in enumerate(texts):
        assert back[f"k{i}"]["error"] == text and back[f"k{i}"]["config"] == {"note": text}
        assert JobRecord.model_validate(back[f"k{i}"]).error == text


# -- a store written before a field existed ------------------------------------------------------


def test_a_store_written_before_records_named_their_upstream_reads_them_by_position(tmp_path):
    """A store whose table has no ``upstream`` column (written before records named roles): read
    read-only, its records have none (results read their deps by position); opened to write, the
    column is added and new records keep their roles."""
    from backdoor_harness.results import upstream_of

    store = Store(tmp_path)
    store.put(record("e1", deps=["t", "p"], upstream={"train": "t", "purified": "p"}))
    store.db.execute("ALTER TABLE jobs DROP COLUMN upstream")  # as an older harness wrote it
    store.close()
    for readonly in (True, False):
        store = Store(tmp_path, readonly=readonly)
        old = store.get("e1")
        assert old.deps == ["t", "p"] and old.upstream == {}
        assert upstream_of(old) == {"train": "t", "purified": "p"}
        store.close()
    store = Store(tmp_path)
    store.put(record("e2", deps=["t", "p", "c"], upstream={"train": "t", "purified": "p", "clean": "c"}))
    assert store.get("e2").upstream == {"train": "t", "purified": "p", "clean": "c"}
    assert store.get("e1").upstream == {}
    store.close()


# -- one bad row ---------------------------------------------------------------------------------


def test_a_bad_row_is_reported_once_and_skipped(tmp_path):
    store = Store(tmp_path)
    for key in ("good", "badjson", "invalid"):
        store.put(record(key, metrics={"clean_acc": 0.5}))
    store.db.execute("UPDATE jobs SET metrics = '{not json' WHERE key = 'badjson'")
    store.db.execute("UPDATE jobs SET status = 'exploded' WHERE key = 'invalid'")
    store.close()

    warnings: list[str] = []
    store = Store(tmp_path, warn=warnings.append)
    assert [r.key for r in store.records()] == ["good"]
    assert [r.key for r in store.records()] == ["good"]  # asked again: not reported again
    assert store.get("badjson") is None and store.get("invalid") is None and store.get("good") is not None
    assert [r.key for r in store.find("")] == ["good"]
    assert store.is_final("good") and not store.is_final("badjson")
    assert len(warnings) == 2, warnings
    assert any("job badjson is unreadable" in w for w in warnings)
    assert any("job invalid is unreadable" in w and "exploded" in w for w in warnings)
    store.put(record("badjson", metrics={"clean_acc": 0.25}))  # rerunning the job overwrites the row
    assert store.get("badjson").metrics == {"clean_acc": 0.25}
    store.close()


@pytest.mark.integration
def test_a_bad_row_is_recomputed_and_read_commands_skip_it(work, capsys):
    evaluate = next(k for k, (kind, _) in rows(work).items() if kind == "evaluate")
    con = sqlite3.connect(work / "results.sqlite")
    con.execute("UPDATE jobs SET attrs = '[1, 2' WHERE key = ?", (evaluate,))
    con.commit()
    con.close()
    for args in (["status"], ["leaderboard"], ["export", "--out", str(work.parent / "out.jsonl")]):
        rc, _, err = harness(capsys, *args, "--workdir", str(work))
        assert rc == 0, err
        assert err.count(f"job {evaluate} is unreadable") == 1, err
    assert len((work.parent / "out.jsonl").read_text().splitlines()) == len(rows(work)) - 1

    lines: list[str] = []
    counts = run_matrix(MatrixSpec.model_validate(TINY), work, progress=False, log=lines.append)
    assert counts["done"] == 1 and counts["cached"] == len(rows(work)) - 1, counts
    store = Store(work)
    assert store.get(evaluate).status == "done"
    store.close()


# -- a corrupt store -----------------------------------------------------------------------------


def test_a_store_that_is_not_a_database_gets_one_message(tmp_path):
    (tmp_path / "results.sqlite").write_bytes(b"this is not an SQLite database, whatever it was " * 100)
    with pytest.raises(HarnessError, match="is corrupt") as err:
        Store(tmp_path)
    assert "mv " in str(err.value) and "rerun" in str(err.value) and "artifacts" in str(err.value)
    with pytest.raises(HarnessError, match="is corrupt"):
        Store(tmp_path, readonly=True)


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["garbage", "truncated", "overwritten"])
def test_a_corrupt_store_gets_one_message_in_every_command(work, damage, capsys):
    db = work / "results.sqlite"
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file
    con.close()
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    size = db.stat().st_size
    if damage == "garbage":
        db.write_bytes(os.urandom(size))
    elif damage == "truncated":
        with open(db, "r+b") as f:
            f.truncate(size // 2)
    else:  # the pages after the first (the schema's) overwritten
        with open(db, "r+b") as f:
            f.seek(4096)
            f.write(b"\xff" * (size - 4096))
    spec = work.parent / "m.yaml"
    spec.write_text(json.dumps(TINY))
    for args in (["status"], ["leaderboard"], ["export", "--out", str(work.parent / "out.jsonl")],
                 ["show", "0"], ["run", str(spec), "--no-progress"]):
        rc, out, err = harness(capsys, *args, "--workdir", str(work))
        assert rc == 2, (args, out, err)
        assert err.startswith("error: ") and "corrupt" in err and "rerun" in err, err
    assert (work / "artifacts").is_dir() and list((work / "artifacts").glob("*.safetensors"))  # untouched


# -- a read-only work directory ------------------------------------------------------------------


def reader_prefix() -> tuple[str, ...]:
    """How to run a command that obeys file permissions: as is, or, for root (whom permissions do not
    stop), through setpriv without the capabilities that override them."""
    if os.geteuid() != 0:
        return ()
    prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
    if shutil.which("setpriv") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode:
        pytest.skip("running as root without setpriv: file permissions cannot be enforced")
    return prefix


def set_writable(path: Path, writable: bool) -> None:
    for p in [path, *path.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.mark.integration
@pytest.mark.parametrize("left", ["clean", "wal"])
def test_read_commands_work_in_a_read_only_workdir(work, left):
    prefix = reader_prefix()
    keys = rows(work)
    writer = None
    if left == "wal":  # a run killed before its last checkpoint leaves its -wal and -shm files behind
        writer = sqlite3.connect(work / "results.sqlite", isolation_level=None)
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.execute("UPDATE jobs SET device = device || '!'")
        assert Path(f"{work / 'results.sqlite'}-wal").stat().st_size
    before = sorted(p.name for p in work.rglob("*"))
    spec = work.parent / "m.yaml"
    spec.write_text(json.dumps(TINY))
    commands = [["status"], ["show", next(iter(keys))[:10]], ["leaderboard"],
                ["export", "--out", str(work.parent / "out.jsonl")], ["run", str(spec), "--no-progress"]]
    set_writable(work, False)
    try:
        out = subprocess.run([*prefix, sys.executable, "-c", READER], capture_output=True, text=True, timeout=300,
                             input="".join(json.dumps([*c, "--workdir", str(work)]) + "\n" for c in commands))
        after = sorted(p.name for p in work.rglob("*"))
    finally:
        set_writable(work, True)
        if writer is not None:
            writer.close()
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(results) == len(commands), out.stderr
    for command, (rc, err) in zip(commands[:-1], results):
        assert rc == 0, (command, err)
    assert len((work.parent / "out.jsonl").read_text().splitlines()) == len(keys)
    if left == "wal":  # what the write-ahead log holds was read
        assert all(json.loads(line)["device"].endswith("!") for line in (work.parent / "out.jsonl").open())
    rc, err = results[-1]
    assert rc == 2 and err.startswith("error: cannot write to the work directory"), err
    assert after == before  # nothing created there (no -wal, -shm, lease)


def test_a_read_only_store_refuses_to_write(tmp_path):
    Store(tmp_path).close()
    store = Store(tmp_path, readonly=True)
    with pytest.raises(HarnessError, match="open read-only"):
        store.put(record("k"))
    with pytest.raises(HarnessError, match="open read-only"):
        store.claim("k", "run")
    store.close()


def test_a_missing_store_opened_read_only_says_so(tmp_path):
    with pytest.raises(HarnessError, match="holds no results"):
        Store(tmp_path, readonly=True)
    assert not (tmp_path / "results.sqlite").exists()


# -- a full disk ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_full_database_stops_the_run_with_nothing_marked_done(tmp_path, monkeypatch):
    """SQLite's own "database or disk is full" (a page limit: the real error, from SQLite)."""
    opened = Store._open_writable

    def small_disk(self):
        opened(self)
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        self.db.execute(f"PRAGMA max_page_count = {pages}")  # no room to grow

    monkeypatch.setattr(Store, "_open_writable", small_disk)
    spec = MatrixSpec.model_validate({**TINY, "evaluators": ["clean_acc", "asr"],  # 7 jobs: more than one page
                                      "defenses": ["none", {"name": "ft", "config": {"epochs": 1}}]})
    with pytest.raises(HarnessError, match="is full") as err:
        run_matrix(spec, tmp_path, progress=False, log=lambda *a: None)
    assert "rerun the same command to resume" in str(err.value)
    monkeypatch.undo()
    store = Store(tmp_path)
    recs = list(store.records())
    assert all(store.is_final(r.key) for r in recs if r.status == "done")  # done means done
    assert sum(r.status == "done" for r in recs) < 7  # the run stopped at the full disk
    store.close()
    # with space again, the same command resumes and finishes
    counts = run_matrix(spec, tmp_path, progress=False, log=lambda *a: None)
    assert counts["failed"] == counts["blocked"] == 0 and counts["cached"] + counts["done"] == 7, counts


@pytest.mark.integration
def test_a_full_disk_writing_a_checkpoint_stops_the_run(tmp_path, monkeypatch):
    replace = os.replace

    def no_space_for_checkpoints(src, dst, *args, **kwargs):
        if str(dst).endswith(".safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", no_space_for_checkpoints)
    lines: list[str] = []
    with pytest.raises(HarnessError, match="is full") as err:
        run_matrix(MatrixSpec.model_validate(TINY), tmp_path, progress=False, log=lines.append)
    monkeypatch.undo()
    assert "nothing more was marked done" in str(err.value)
    assert not any("not run" in line for line in lines), lines  # nothing after it was blocked: it stopped
    store = Store(tmp_path)
    recs = list(store.records())
    assert not [r for r in recs if r.status in ("done", "failed", "blocked")], [(r.label, r.status) for r in recs]
    assert store.claims() == {}
    store.close()
    assert not list((tmp_path / "artifacts").glob("*.tmp*"))  # the checkpoint's temporary file is gone too


def test_an_atomic_write_gives_the_file_the_mode_a_plain_write_would(tmp_path):
    """Not the 0600 of the temporary file: a new file gets 0666 less the umask, a rewritten one keeps its mode."""
    import os
    import stat

    from backdoor_harness.store import write_atomic

    umask = os.umask(0o022)
    try:
        new = tmp_path / "new.jsonl"
        write_atomic(new, "a\n")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644 and new.read_text() == "a\n"
        kept = tmp_path / "kept.md"
        kept.write_text("x")
        kept.chmod(0o640)
        write_atomic(kept, "y")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "y"
    finally:
        os.umask(umask)
