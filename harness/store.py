"""The results store: one typed record per job in an embedded SQLite database.

A job whose record says ``done`` is never recomputed. Records are written only
after the job's artifact is completely on disk (atomic rename), so a killed
run leaves no record claiming work that does not exist.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import HarnessError

SCHEMA_VERSION = 1

Status = Literal["running", "done", "failed", "skipped", "blocked"]
#: done and skipped (the plugin cannot run this cell) are final; failed and
#: blocked (an upstream job failed) are retried by the next run.
FINAL = ("done", "skipped")


class JobRecord(BaseModel):
    """What the store keeps of one job."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    key: str
    kind: str
    label: str
    status: Status
    attrs: dict[str, Any] = Field(default_factory=dict)
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


def job_record(job: Any, status: Status, **fields: Any) -> JobRecord:
    """A record of ``job`` (a :class:`~backdoor_harness.matrix.Job`) started now, with the harness version."""
    from . import __version__

    return JobRecord(key=job.key, kind=job.kind, label=job.label, status=status, attrs=job.attrs,
                     config=job.payload, versions=job.versions, deps=job.deps, started=time.time(),
                     harness_version=__version__, **fields)


_COLUMNS = list(JobRecord.model_fields)
_JSON = {"attrs", "config", "versions", "deps", "metrics"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Store:
    """SQLite-backed job records under ``workdir/results.sqlite``."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.artifacts = self.workdir / "artifacts"
        self.path = self.workdir / "results.sqlite"
        self._intact: set[tuple] = set()
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        cols = ", ".join(f"{c} TEXT" if c != "key" else "key TEXT PRIMARY KEY" for c in _COLUMNS)
        self.db.execute(f"CREATE TABLE IF NOT EXISTS jobs ({cols})")

    def close(self) -> None:
        self.db.close()

    def put(self, rec: JobRecord) -> None:
        row = [json.dumps(getattr(rec, c)) if c in _JSON else getattr(rec, c) for c in _COLUMNS]
        marks = ", ".join("?" for _ in _COLUMNS)
        self.db.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(_COLUMNS)}) VALUES ({marks})", row)

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

    def export_jsonl(self, path: str | Path) -> int:
        n = 0
        with open(path, "w") as f:
            for rec in self.records():
                f.write(rec.model_dump_json() + "\n")
                n += 1
        return n


class WorkdirLock:
    """An exclusive lock on a work directory: two runs never write one store."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise HarnessError(f"work directory {self.path.parent} is in use by another `harness run` "
                               f"(pid {holder}); wait for it to finish or use another --workdir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def active_run(workdir: Path) -> str | None:
    """The pid of the `harness run` holding ``workdir``'s lock, or None when no run holds it."""
    path = Path(workdir) / ".lock"
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def now() -> float:
    return time.time()
