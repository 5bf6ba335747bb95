"""The results store: one typed record per job in an embedded SQLite database.

A job whose record says ``done`` is never recomputed. Records are written only
after the job's artifact is completely on disk (atomic rename), so a killed
run leaves no record claiming work that does not exist.

Several ``harness run`` processes may share one work directory. Each holds a
:class:`RunLease` (a file under ``.runs/`` it keeps locked while it lives)
and claims a job in the store's ``claims`` table, in one SQLite transaction,
before it starts it: a job is run by one live run at a time, and a claim
whose run has died (its lease is no longer locked) is taken over.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

#: 2: records carry the cell (typed ``attrs``), the plugin's facts (``plugin``) and the evaluator's
#: metric metadata (``metric_info``); schema-1 records get them from :func:`backdoor_harness.results.upgrade`
SCHEMA_VERSION = 2

Status = Literal["running", "done", "failed", "skipped", "blocked"]
#: done and skipped (the plugin cannot run this cell) are final; failed and
#: blocked (an upstream job failed) are retried by the next run.
FINAL = ("done", "skipped")
#: what :meth:`Store.claim` answers for a job another run has finished meanwhile
FINISHED = "finished"


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
    poison_rate: float | None = None
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


def job_record(job: Any, status: Status, **fields: Any) -> JobRecord:
    """A record of ``job`` (a typed job of :mod:`backdoor_harness.jobs`) started now: its cell,
    config, versions, upstream keys, plugin and metric metadata, and the harness version."""
    from . import __version__

    return JobRecord(key=job.key, kind=job.kind, label=job.label, status=status, attrs=job.cell,
                     config=job.payload, versions=job.versions, deps=job.deps, started=time.time(),
                     harness_version=__version__, plugin=job.plugin, metric_info=job.metric_info, **fields)


_COLUMNS = list(JobRecord.model_fields)
_JSON = {"attrs", "config", "versions", "deps", "metrics", "plugin", "metric_info"}


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
        a missing, truncated or corrupt artifact makes the job run again, never silently used."""
        rec = self.get(key)
        if rec is None or rec.status not in FINAL:
            return False
        return rec.artifact is None or self.artifact_intact(rec)

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


class Store(Records):
    """SQLite-backed job records under ``workdir/results.sqlite``."""

    def __init__(self, workdir: str | Path):
        super().__init__(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / "results.sqlite"
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        cols = ", ".join(f"{c} TEXT" if c != "key" else "key TEXT PRIMARY KEY" for c in _COLUMNS)
        self.db.execute(f"CREATE TABLE IF NOT EXISTS jobs ({cols})")
        have = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
        for c in _COLUMNS:  # a store written by an older schema: the new fields start empty
            if c not in have:
                try:
                    self.db.execute(f"ALTER TABLE jobs ADD COLUMN {c} TEXT")
                except sqlite3.OperationalError:  # another run added it meanwhile
                    pass
        self.db.execute("CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, run TEXT, since REAL)")

    def close(self) -> None:
        self.db.close()

    def put(self, rec: JobRecord) -> None:
        """Store ``rec``; a final outcome (not ``running``) also releases the job's claim."""
        data = rec.model_dump(mode="json")
        row = [json.dumps(data[c]) if c in _JSON else data[c] for c in _COLUMNS]
        marks = ", ".join("?" for _ in _COLUMNS)
        with self._transaction():
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
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- claims: which live run is running a job ------------------------------------

    def claim(self, key: str, run: str, since: float = 0.0) -> str | None:
        """Claim job ``key`` for run ``run``. Returns None when it is ours now; else the id of the
        live run that holds it, or :data:`FINISHED` when a run finished it after ``since`` (the
        claimer's start: what it saw unfinished then is final now). A dead run's claim is taken over."""
        with self._transaction():
            row = self.db.execute("SELECT run FROM claims WHERE key = ?", (key,)).fetchone()
            if row and row[0] != run and lease_alive(self.workdir, row[0]):
                return row[0]
            done = self.db.execute("SELECT status, finished FROM jobs WHERE key = ?", (key,)).fetchone()
            if done and done[0] in FINAL and float(done[1] or 0) >= since:
                return FINISHED
            self.db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)", (key, run, time.time()))
        return None

    def claims(self) -> dict[str, str]:
        """Job key -> the run id of every claim whose run is alive."""
        rows = self.db.execute("SELECT key, run FROM claims").fetchall()
        alive = {run: lease_alive(self.workdir, run) for run in {r for _, r in rows}}
        return {k: r for k, r in rows if alive[r]}

    def release_all(self, run: str) -> None:
        """Drop every claim of ``run`` (a run that ends gives back what it did not finish)."""
        self.db.execute("DELETE FROM claims WHERE run = ?", (run,))

    @staticmethod
    def _record(row: sqlite3.Row | tuple) -> JobRecord:
        data = dict(zip(_COLUMNS, row))
        for c in _JSON:
            data[c] = json.loads(data[c]) if data[c] is not None else None
        for c in ("started", "finished", "wall_s"):
            data[c] = float(data[c]) if data[c] is not None else None
        data = {k: v for k, v in data.items() if v is not None}
        return JobRecord(**data)

    def get(self, key: str) -> JobRecord | None:
        row = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE key = ?", (key,)).fetchone()
        return self._record(row) if row else None

    def find(self, prefix: str) -> list[JobRecord]:
        rows = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE key LIKE ?", (prefix + "%",))
        return [self._record(r) for r in rows]

    def records(self, kind: str | None = None) -> Iterator[JobRecord]:
        q = f"SELECT {', '.join(_COLUMNS)} FROM jobs" + (" WHERE kind = ?" if kind else "") + " ORDER BY started"
        for row in self.db.execute(q, (kind,) if kind else ()):
            yield self._record(row)

    def export_jsonl(self, path: str | Path) -> int:
        n = 0
        with open(path, "w") as f:
            for rec in self.records():
                f.write(rec.model_dump_json() + "\n")
                n += 1
        return n


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
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{self.id}.new"  # locked before it gets its name: never seen unlocked
        self.fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(self.fd, f"{socket.gethostname()} pid {os.getpid()}".encode(), 0)
        tmp.replace(self.path)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def lease_alive(workdir: Path, run: str) -> bool:
    """Whether run ``run`` still holds its lease on ``workdir``."""
    try:
        fd = os.open(Path(workdir) / RUNS_DIR / run, os.O_RDWR)
    except FileNotFoundError:
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
            path.unlink(missing_ok=True)
    return out


def now() -> float:
    return time.time()
