"""The results store: one typed record per job in an embedded SQLite database.

A job whose record says ``done`` is never recomputed. Records are written only
after the job's artifact is completely on disk (atomic rename), so a killed
run leaves no record claiming work that does not exist.

Several ``harness run`` processes may share one work directory. Each holds a
:class:`RunLease` (a file under ``.runs/`` it keeps locked while it lives)
and claims a job in the store's ``claims`` table, in one SQLite transaction,
before it starts it: a job is run by one live run at a time, and a claim
whose run has died (its lease is no longer locked) is taken over.

The store's bad days end in one clear :class:`~backdoor_harness.errors.HarnessError`
(never a raw ``sqlite3`` traceback): a corrupt database says how to go on (the
checkpoints survive), a full disk stops the run with nothing more marked done,
and a read-only work directory is opened read-only, so that ``status``, ``show``,
``export`` and ``leaderboard`` still work there. One unreadable record (a JSON
column that does not parse, a record that no longer validates) is reported once,
naming its key, and skipped: its job counts as not run, so the next run
recomputes it and overwrites the row.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import sqlite3
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import HarnessError

#: 2: records carry the cell (typed ``attrs``), the plugin's facts (``plugin``) and the evaluator's
#: metric metadata (``metric_info``); schema-1 records get them from :func:`backdoor_harness.results.upgrade`.
#: Optional fields added since (``predictions``, ``upstream``) default to empty and keep the version: a
#: record without them reads as one written before they existed (no fact is taken from the installed plugins).
SCHEMA_VERSION = 2

Status = Literal["running", "done", "failed", "skipped", "blocked"]
#: done and skipped (the plugin cannot run this cell) are final; failed and
#: blocked (an upstream job failed) are retried by the next run.
FINAL = ("done", "skipped")
#: what :meth:`Store.claim` answers for a job another run has finished meanwhile
FINISHED = "finished"
#: the kinds of job whose done record names an artifact (the model or attack state downstream jobs
#: load): one recorded done without it (written before plugin outputs were checked) is not final
MAKES_ARTIFACT = ("prepare", "train", "purify")


class Cell(BaseModel):
    """Where a job sits in the matrix: the names (labels) of its data set, model, attack,
    defense and evaluator, its seed and the attack's configured poison rate. A job has the
    fields of its kind only (a train job no defense, a prepare job of a model-free attack no
    model); ``role`` tells a train job's model (``attacked`` or ``clean``) and marks a
    prepare job's (``resource``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    seed: int
    model: str | None = None
    attack: str | None = None
    poison_rate: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    defense: str | None = None
    evaluator: str | None = None
    role: Literal["attacked", "clean", "resource"] | None = None


class Metric(BaseModel):
    """A metric an evaluator declares (``Evaluator.metrics``), and how results show and check it:
    every evaluate record carries it (``JobRecord.metric_info``), so leaderboards and golden checks
    read it from the records.

    Attributes:
        higher_is_better: which way is better for the defender.
        doc: one line: what it measures.
        curve: a list of numbers kept whole in the record (boards show only numbers).
        title: its column title on leaderboards (default: the metric's name).
        percent: on the scale of a rate in [0, 1] (a rate, or a score or difference of rates such
            as DER or an accuracy barrier), shown as a percentage; ``False`` for anything else
            (an interpolation coefficient t, a count, a loss), shown as it is.
        board: its column's position on leaderboard boards (ascending); ``None``: not a board column.
            Board columns are single numbers (never a ``curve``) and unique across installed metrics.
        one_sided: golden checks test it one way only; otherwise a drift either way beyond the
            tolerance fails. A one-sided higher-is-better metric must not drop (in every row). A
            one-sided lower-is-better metric must not rise, except in a ``Defense.baseline`` row,
            where it measures the attack (which must keep working): there it must not drop.
        range: the values it can take, ``(lo, hi)`` inclusive (every element of a curve); a value
            outside (or not finite) fails its evaluation. ``None``: no bounds declared.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    higher_is_better: bool
    doc: str = ""
    curve: bool = False
    title: str = ""
    percent: bool = True
    board: int | None = None
    one_sided: bool = False
    range: tuple[float, float] | None = None


class PluginInfo(BaseModel):
    """The plugin a job ran (a train or prepare job's attack, a purify job's defense, an
    evaluate job's evaluator) as the job saw it: its config with every default filled in, and
    the facts results need about it.

    Attributes:
        oracle: a defense that needs the real trigger (``needs: oracle_trigger``).
        baseline: a defense that returns the model as it is (the undefended row).
        substitute: an attack whose trigger replaces the reference one: what replaces it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    config: dict[str, Any] = Field(default_factory=dict)
    oracle: bool = False
    baseline: bool = False
    substitute: str | None = None


class JobRecord(BaseModel):
    """What the store keeps of one job."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    key: str
    kind: str
    label: str
    status: Status
    attrs: Cell
    config: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    deps: list[str] = Field(default_factory=list)
    upstream: dict[str, str] = Field(default_factory=dict, description=(
        "Role -> key of each upstream job (the keys of deps, named, in their order): a prepare job's 'clean' "
        "model; a train job's 'prepare'; a purify job's 'train'; an evaluation's 'train', 'purified', 'clean' and "
        "'defended:<defense>'. Empty in records written before it existed: readers then take deps by position "
        "(backdoor_harness.results.upstream_of)."))
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    started: float | None = None
    finished: float | None = None
    wall_s: float | None = None
    device: str | None = None
    harness_version: str | None = None
    artifact: str | None = None
    artifact_sha256: str | None = None
    plugin: PluginInfo | None = None
    metric_info: dict[str, Metric] = Field(default_factory=dict)
    predictions: dict[str, str] = Field(default_factory=dict, description=(
        "An evaluation's per-example predictions: 'role:split' (e.g. 'purified:poisoned') -> the file it read, "
        "relative to the work directory (predictions/<id>.safetensors: class indices and test-set indices, "
        "see backdoor_harness.predictions). Empty for other jobs and for records written before it existed."))


def job_record(job: Any, status: Status, **fields: Any) -> JobRecord:
    """A record of ``job`` (a typed job of :mod:`backdoor_harness.jobs`) started now: its cell,
    config, versions, upstream keys (``deps``, and by role ``upstream``), plugin and metric metadata, and
    the harness version."""
    from . import __version__

    return JobRecord(key=job.key, kind=job.kind, label=job.label, status=status, attrs=job.cell,
                     config=job.payload, versions=job.versions, deps=job.deps, upstream=job.upstream,
                     started=time.time(), harness_version=__version__, plugin=job.plugin,
                     metric_info=job.metric_info, **fields)


_COLUMNS = list(JobRecord.model_fields)
_JSON = {"attrs", "config", "versions", "deps", "upstream", "metrics", "plugin", "metric_info", "predictions"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Records:
    """What running a job needs of the records: look one up, and whether a job is final with its
    artifact intact. :class:`Store` is the SQLite-backed one; a bare ``Records`` holds the records
    it is given (a Ray actor's: the driver sends each job's upstream records with it, so no node
    but the driver's opens the database)."""

    def __init__(self, workdir: str | Path, records: dict[str, JobRecord] | None = None):
        self.workdir = Path(workdir)
        self.artifacts = self.workdir / "artifacts"
        self._intact: set[tuple] = set()
        self._records = dict(records or {})

    def get(self, key: str) -> JobRecord | None:
        return self._records.get(key)

    def update(self, records: dict[str, JobRecord]) -> None:
        self._records.update(records)

    def is_final(self, key: str) -> bool:
        """Done or skipped, with its artifact (if any) on disk and matching its recorded sha256:
        a missing, truncated or corrupt artifact makes the job run again, never silently used; so
        does none at all for a done job that makes one (:data:`MAKES_ARTIFACT`)."""
        rec = self.get(key)
        if rec is None or rec.status not in FINAL:
            return False
        if rec.artifact is None:
            return not (rec.status == "done" and rec.kind in MAKES_ARTIFACT)
        return self.artifact_intact(rec)

    def artifact_intact(self, rec: JobRecord) -> bool:
        """Whether ``rec``'s artifact exists and hashes to its recorded sha256 (checked once per file version)."""
        path = self.workdir / rec.artifact
        if not path.exists():
            return False
        if not rec.artifact_sha256:
            return True
        stat = path.stat()
        memo = (rec.key, rec.artifact_sha256, stat.st_size, stat.st_mtime_ns)
        if memo not in self._intact:
            if sha256_file(path) != rec.artifact_sha256:
                return False
            self._intact.add(memo)
        return True

    def artifact_path(self, key: str) -> Path:
        return self.artifacts / f"{key}.safetensors"


#: what a disk that is full says (``ENOSPC``, and ``EDQUOT`` for a quota), as Python and SQLite word it
_FULL_TEXTS = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), "database or disk is full", "os error 28")


def no_space(err: OSError) -> bool:
    """Whether ``err`` says the disk, or the user's quota on it, is full (``ENOSPC``, ``EDQUOT``)."""
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(text: str | None) -> bool:
    """Whether an error message (or a failed job's traceback) says the disk is full."""
    return bool(text) and any(t.lower() in text.lower() for t in _FULL_TEXTS)


def disk_full_error(where: str | Path, detail: str) -> HarnessError:
    """The message that stops a run whose disk is full."""
    return HarnessError(f"the disk holding {where} is full ({detail}): the run stopped and nothing more was "
                        f"marked done; free some space (or rerun into another --workdir) and rerun the same "
                        f"command to resume")


def _process_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


#: read once, at import (setting it to read it is not safe while other threads create files)
_UMASK = _process_umask()


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Write ``path`` all or nothing: the caller writes the temporary file this yields (in the same
    folder); on success it is flushed to disk and renamed over ``path``, on any failure removed.
    The file keeps the mode it had, or gets what a plain ``open`` would give it (0666 less the
    umask), not the 0600 of the temporary file. What writes checkpoints, predictions and text files."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write the text file ``path`` all or nothing (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="ascii" if text.isascii() else "utf-8")


def jsonl_line(rec: JobRecord) -> str:
    """One record as one line of JSONL: ASCII-escaped JSON (``\\uXXXX`` for every non-ASCII
    character), so that no character of a string (U+2028, U+2029, U+0085 ...) can ever split a line,
    whatever splits the file into lines; NaN and infinities are written as ``null``, as pydantic does."""
    return json.dumps(json.loads(rec.model_dump_json()), ensure_ascii=True, separators=(",", ":"))


def _errname(err: sqlite3.Error) -> str:
    return getattr(err, "sqlite_errorname", None) or ""


class Store(Records):
    """SQLite-backed job records under ``workdir/results.sqlite``.

    Args:
        workdir: the work directory (created unless ``readonly``).
        readonly: open the database read-only (``mode=ro``; reading never writes a byte there):
            what commands that only read use. A store that cannot be written (a read-only work
            directory or file system) is opened read-only even when ``readonly`` is False, and then
            refuses to write with a :class:`HarnessError`.
        warn: where warnings go (an unreadable record; default: standard error).
    """

    def __init__(self, workdir: str | Path, readonly: bool = False, warn: Callable[[str], None] | None = None):
        super().__init__(workdir)
        self.path = self.workdir / "results.sqlite"
        self.warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
        self.readonly = readonly
        self._reported: set[str] = set()
        self.db: sqlite3.Connection | None = None
        if not readonly:
            try:
                self.workdir.mkdir(parents=True, exist_ok=True)
                self._open_writable()
            except (OSError, sqlite3.OperationalError, sqlite3.DatabaseError) as err:
                if self.db is not None:
                    self.db.close()
                    self.db = None
                if isinstance(err, sqlite3.ProgrammingError) or not self._cannot_write(err):
                    raise self._error(err, "opening it") from None
                if not self.path.exists():
                    raise HarnessError(f"cannot create {self.path} ({err}): the work directory is not writable; "
                                       f"make it writable or pick another with --workdir") from None
                self.readonly = True  # a read-only work directory: reading still works
        if self.readonly:
            self._open_readonly()

    @staticmethod
    def _cannot_write(err: BaseException) -> bool:
        if isinstance(err, OSError):
            return err.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        return _errname(err).startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")) or any(
            t in str(err) for t in ("readonly database", "unable to open database file"))

    def _open_writable(self) -> None:
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        cols = ", ".join(f"{c} TEXT" if c != "key" else "key TEXT PRIMARY KEY" for c in _COLUMNS)
        self.db.execute(f"CREATE TABLE IF NOT EXISTS jobs ({cols})")
        have = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
        for c in _COLUMNS:  # a store written by an older schema: the new fields start empty
            if c not in have:
                try:
                    self.db.execute(f"ALTER TABLE jobs ADD COLUMN {c} TEXT")
                except sqlite3.OperationalError as err:  # another run added it meanwhile
                    if "duplicate column" not in str(err):
                        raise
        self.db.execute("CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, run TEXT, since REAL)")

    def _open_readonly(self) -> None:
        """``mode=ro``; where even that must write (a write-ahead-log database whose ``-shm`` file
        cannot be created in a read-only directory), ``immutable=1``: the file as it is."""
        if not self.path.exists():
            raise HarnessError(f"{self.workdir} holds no results ({self.path.name} is missing); run `harness run "
                               f"SPEC --workdir {self.workdir}` first")
        uri = self.path.resolve().as_uri()
        try:
            self.db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30, isolation_level=None)
            self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as err:
            if self.db is not None:
                self.db.close()
            if not isinstance(err, sqlite3.OperationalError) or not self._cannot_write(err):
                raise self._error(err, "opening it read-only") from None
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.exists() and wal.stat().st_size:
                self.warn(f"{self.path}: its write-ahead log {wal.name} cannot be read in this read-only "
                          f"directory; showing the records as they were last checkpointed")
            self.db = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None)
        with self._guard("opening it read-only"):
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            have = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")} if "jobs" in tables else set()
        if "jobs" not in tables:
            raise HarnessError(f"{self.path} holds no job records (no `jobs` table): not a store written by "
                               f"`harness run`")
        self._columns = [c for c in _COLUMNS if c in have]  # an older schema's store: its missing fields are empty
        self._claims = "claims" in tables

    def _error(self, err: BaseException, doing: str) -> HarnessError:
        """One clear message for a failing database (or work directory): what, where, what to do."""
        text, name = str(err), (_errname(err) if isinstance(err, sqlite3.Error) else "")
        if isinstance(err, OSError):
            if no_space(err):
                return disk_full_error(self.workdir, text)
            return HarnessError(f"cannot use the work directory {self.workdir} ({text}) while {doing}; check that "
                                f"it is a directory you can write to, or pick another with --workdir")
        if name in ("SQLITE_FULL",) or disk_full(text):
            return disk_full_error(self.path, f"{text}, while {doing}")
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or any(
                t in text for t in ("file is not a database", "malformed", "corrupt")):
            return HarnessError(
                f"{self.path} is corrupt ({text}, while {doing}). The checkpoints in {self.artifacts} survive, "
                f"but without their records they are not trusted. To go on: move it aside (`mv {self.path} "
                f"{self.path}.corrupt`, with its -wal and -shm files if any) and rerun the same matrix into "
                f"{self.workdir}: the jobs it finished are recomputed; or rerun into a fresh --workdir. Records "
                f"you exported earlier (`harness export`) still render with `harness leaderboard --records FILE`")
        if name.startswith("SQLITE_READONLY") or "readonly database" in text:
            return HarnessError(f"{self.path} is read-only: cannot write to it while {doing}; make the work "
                                f"directory writable, or rerun into another --workdir")
        if name.startswith("SQLITE_BUSY") or "database is locked" in text:
            return HarnessError(f"{self.path} stayed locked by another process for 30 s while {doing}; is a "
                                f"`harness run` on {self.workdir} hung? (`harness status --workdir {self.workdir}`)")
        if name.startswith("SQLITE_IOERR") or "disk I/O error" in text:
            return HarnessError(f"{self.path}: the disk failed to read or write it ({text}) while {doing}; "
                                f"check the disk (and free space), then rerun the same command")
        if name.startswith("SQLITE_CANTOPEN") or "unable to open database" in text:
            return HarnessError(f"cannot open {self.path} ({text}); check that {self.workdir} exists and is "
                                f"readable")
        return HarnessError(f"{self.path}: {type(err).__name__}: {text} (while {doing})")

    @contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """Turn a failing database into one :class:`HarnessError` (see :meth:`_error`)."""
        try:
            yield
        except (sqlite3.OperationalError, sqlite3.DatabaseError) as err:
            if isinstance(err, (sqlite3.ProgrammingError, sqlite3.InterfaceError)):
                raise  # a bug, not a bad day
            raise self._error(err, doing) from None

    def _writable(self, doing: str) -> None:
        if self.readonly:
            raise HarnessError(f"{self.path} is open read-only (the work directory {self.workdir} cannot be "
                               f"written): cannot {doing}; make it writable, or rerun into another --workdir")

    def close(self) -> None:
        if self.db is not None:
            self.db.close()

    def put(self, rec: JobRecord) -> None:
        """Store ``rec``; a final outcome (not ``running``) also releases the job's claim. A failing
        write (a full disk) raises :class:`HarnessError` with nothing written."""
        self._writable(f"record job {rec.key}")
        data = rec.model_dump(mode="json")
        row = [json.dumps(data[c]) if c in _JSON else data[c] for c in _COLUMNS]
        marks = ", ".join("?" for _ in _COLUMNS)
        with self._guard(f"recording job {rec.key} ({rec.status})"), self._transaction():
            self.db.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(_COLUMNS)}) VALUES ({marks})", row)
            if rec.status != "running":
                self.db.execute("DELETE FROM claims WHERE key = ?", (rec.key,))

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on an error): one writer at a time."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.db.in_transaction:  # SQLite has already rolled back after some errors (a full disk)
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the error that got us here is the one to report
            raise
        self.db.execute("COMMIT")

    # -- claims: which live run is running a job ------------------------------------

    def claim(self, key: str, run: str, since: float = 0.0) -> str | None:
        """Claim job ``key`` for run ``run``. Returns None when it is ours now; else the id of the
        live run that holds it, or :data:`FINISHED` when a run finished it after ``since`` (the
        claimer's start: what it saw unfinished then is final now). A dead run's claim is taken over."""
        self._writable(f"claim job {key}")
        with self._guard(f"claiming job {key}"), self._transaction():
            row = self.db.execute("SELECT run FROM claims WHERE key = ?", (key,)).fetchone()
            if row and row[0] != run and lease_alive(self.workdir, row[0]):
                return row[0]
            done = self.db.execute("SELECT status, finished FROM jobs WHERE key = ?", (key,)).fetchone()
            if done and done[0] in FINAL and _float(done[1]) >= since:
                return FINISHED
            self.db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)", (key, run, time.time()))
        return None

    def claims(self) -> dict[str, str]:
        """Job key -> the run id of every claim whose run is alive."""
        if self.readonly and not getattr(self, "_claims", True):
            return {}
        with self._guard("reading the claims"):
            rows = self.db.execute("SELECT key, run FROM claims").fetchall()
        alive = {run: lease_alive(self.workdir, run) for run in {r for _, r in rows}}
        return {k: r for k, r in rows if alive[r]}

    def release_all(self, run: str) -> None:
        """Drop every claim of ``run`` (a run that ends gives back what it did not finish). Best
        effort: where the database cannot be written (a full disk), the claims stay, and are taken
        over as a dead run's once this process has ended."""
        if self.readonly:
            return
        try:
            self.db.execute("DELETE FROM claims WHERE run = ?", (run,))
        except sqlite3.Error:
            pass

    def _record(self, row: sqlite3.Row | tuple, columns: list[str] | None = None) -> JobRecord | None:
        """The record a row holds; None (reported once) for a row that no longer parses or validates."""
        data = dict(zip(columns or _COLUMNS, row))
        try:
            for c in _JSON:
                data[c] = json.loads(data[c]) if data.get(c) is not None else None
            for c in ("started", "finished", "wall_s"):
                data[c] = float(data[c]) if data.get(c) is not None else None
            data = {k: v for k, v in data.items() if v is not None}
            return JobRecord(**data)
        except (ValueError, TypeError) as err:  # json, float() and pydantic's ValidationError
            key = str(data.get("key"))
            if key not in self._reported:
                self._reported.add(key)
                why = " ".join(str(err).split())
                self.warn(f"{self.path}: the record of job {key} is unreadable ({why[:300]}); skipped: its job "
                          f"counts as not run, and the next `harness run` recomputes it")
            return None

    @property
    def _select(self) -> str:
        return ", ".join(getattr(self, "_columns", _COLUMNS))

    def _rows(self, where: str = "", params: tuple = (), doing: str = "reading the records") -> list[JobRecord]:
        cols = getattr(self, "_columns", _COLUMNS)
        with self._guard(doing):
            rows = self.db.execute(f"SELECT {self._select} FROM jobs {where}", params).fetchall()
        return [rec for rec in (self._record(r, cols) for r in rows) if rec is not None]

    def get(self, key: str) -> JobRecord | None:
        found = self._rows("WHERE key = ?", (key,), f"reading the record of job {key}")
        return found[0] if found else None

    def find(self, prefix: str) -> list[JobRecord]:
        return self._rows("WHERE key LIKE ?", (prefix + "%",))

    def records(self, kind: str | None = None) -> Iterator[JobRecord]:
        yield from self._rows(("WHERE kind = ? " if kind else "") + "ORDER BY started", (kind,) if kind else ())

    def export_jsonl(self, path: str | Path) -> int:
        """Write every readable record to ``path`` as JSONL (:func:`jsonl_line`: one record per line,
        ASCII-escaped); returns how many. Written all or nothing (:func:`write_atomic`)."""
        path = Path(path)
        lines = [jsonl_line(rec) + "\n" for rec in self.records()]
        try:
            write_atomic(path, "".join(lines))
        except OSError as err:
            if no_space(err):
                raise disk_full_error(path.parent, str(err)) from None
            raise HarnessError(f"cannot write {path} ({err}); pick a writable path") from None
        return len(lines)


def _float(value: Any) -> float:
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


RUNS_DIR = ".runs"


class RunLease:
    """This run's lease on a work directory: ``.runs/<id>``, locked (``flock``) while the run lives.

    The kernel drops the lock when the process dies, however it dies, so
    :func:`lease_alive` tells a live run from a killed one. The file holds the
    host and pid, for messages. Runs sharing a work directory are on one
    machine (the store is SQLite in WAL mode: a local file system).
    """

    def __init__(self, workdir: Path):
        self.folder = Path(workdir) / RUNS_DIR
        self.id = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        self.path = self.folder / self.id
        self.fd: int | None = None

    def __enter__(self) -> "RunLease":
        tmp = self.folder / f".{self.id}.new"  # locked before it gets its name: never seen unlocked
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.pwrite(self.fd, f"{socket.gethostname()} pid {os.getpid()}".encode(), 0)
            tmp.replace(self.path)
        except OSError as err:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
                tmp.unlink(missing_ok=True)
            workdir = self.folder.parent
            if no_space(err):
                raise disk_full_error(workdir, str(err)) from None
            raise HarnessError(f"cannot write to the work directory {workdir} ({err}): `harness run` needs one "
                               f"it can write to; make it writable or pick another with --workdir (reading it "
                               f"works: `harness status --workdir {workdir}`)") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def lease_alive(workdir: Path, run: str) -> bool:
    """Whether run ``run`` still holds its lease on ``workdir`` (read only: works in a read-only directory)."""
    try:
        fd = os.open(Path(workdir) / RUNS_DIR / run, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def active_runs(workdir: Path) -> dict[str, str]:
    """Run id -> ``host pid N`` of every `harness run` alive on ``workdir``; dead runs' leases are removed."""
    folder = Path(workdir) / RUNS_DIR
    out = {}
    for path in sorted(folder.glob("[!.]*")) if folder.is_dir() else []:
        if lease_alive(workdir, path.name):
            out[path.name] = path.read_text().strip() or path.name
        else:
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a read-only work directory: the dead lease stays, it is ignored all the same
                pass
    return out


def now() -> float:
    return time.time()
