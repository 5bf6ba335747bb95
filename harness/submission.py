"""Exporting results and accepting them into the published leaderboard.

``harness export`` writes a run's records as JSONL, one :class:`JobRecord`
per line, validated against the record schema (``schema_version``; the JSON
Schema is ``leaderboard/schema/record-v<N>.json``, generated from
:class:`JobRecord` and checked against it by the tests).

``harness leaderboard --add FILE`` accepts a submission only when

- every line is a valid record of the current schema version, with the
  harness version that produced it;
- every record is a job of one of the published matrices
  (``leaderboard/published.yaml``): its key, which hashes the job's config,
  upstream keys and plugin versions, is the key the installed harness
  computes for that cell, so the same cell with another config or plugin
  version is refused with the difference named;
- every evaluate record is ``done`` and comes with its purify and train
  records (the leaderboard reads the poison rate and the defense's cost from
  them).

Accepted records are appended to the published records; a job already
published as done is kept, never overwritten.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import yaml
from pydantic import ValidationError

from .errors import HarnessError
from .matrix import Job, expand, load_matrix
from .store import SCHEMA_VERSION, JobRecord

#: the published leaderboard's definition, relative to the repository root
PUBLISHED = Path("leaderboard/published.yaml")
#: at most this many problems are listed in one refusal
MAX_PROBLEMS = 20


def record_schema() -> dict:
    """The JSON Schema of one exported record (this schema version)."""
    schema = JobRecord.model_json_schema()
    schema["$id"] = f"backdoor-harness/record-v{SCHEMA_VERSION}.json"
    schema["title"] = f"backdoor-harness job record, schema version {SCHEMA_VERSION}"
    return schema


def export(records: Iterable[JobRecord], path: str | Path) -> int:
    """Write records as JSONL (each re-validated); returns how many."""
    lines = [JobRecord.model_validate(r.model_dump()).model_dump_json() for r in records]
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)
    return len(lines)


#: the oldest record schema :func:`read_records` reads (older records are upgraded, see
#: :func:`backdoor_harness.results.upgrade`)
OLDEST_SCHEMA = 1


def read_records(path: str | Path, current_only: bool = False) -> list[JobRecord]:
    """Parse a JSONL file of records; every bad line is named (file:line: what, how to fix).
    Records of an older schema (the published leaderboard's) are upgraded with the facts the
    installed plugins give (:func:`backdoor_harness.results.upgrade_all`); ``current_only`` refuses
    them instead (a submission carries the facts of its own run)."""
    from .results import upgrade_all

    path = Path(path)
    if not path.exists():
        raise HarnessError(f"{path}: no such file (write one with `harness export --workdir W --out {path}`)")
    records, problems = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{path}:{n}: not JSON ({err.msg})")
            continue
        version = raw.get("schema_version", SCHEMA_VERSION) if isinstance(raw, dict) else SCHEMA_VERSION
        if version not in range(SCHEMA_VERSION if current_only else OLDEST_SCHEMA, SCHEMA_VERSION + 1):
            reads = (f"{SCHEMA_VERSION}" if current_only or OLDEST_SCHEMA == SCHEMA_VERSION
                     else f"{OLDEST_SCHEMA} to {SCHEMA_VERSION}")
            problems.append(f"{path}:{n}: schema_version {version}, this harness reads {reads}"
                            f"{' here' if current_only else ''}; export it again with this harness version")
            continue
        try:
            records.append(JobRecord.model_validate(raw))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(map(str, first["loc"])) or "record"
            problems.append(f"{path}:{n}: {where}: {first['msg']} (see leaderboard/schema/"
                            f"record-v{SCHEMA_VERSION}.json)")
    _raise(problems, f"{path} is not a valid export")
    return upgrade_all(records)


def _raise(problems: list[str], headline: str) -> None:
    if problems:
        shown = problems[:MAX_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise HarnessError(f"{headline}: {len(problems)} problem(s):\n  " + "\n  ".join(shown) + more)


def published_jobs(published: str | Path = PUBLISHED) -> tuple[dict[str, Job], Path]:
    """The jobs of every published matrix (by key) and the published records folder."""
    published = Path(published)
    if not published.exists():
        raise HarnessError(f"{published}: no such file; run from the repository root or pass --published PATH")
    doc = yaml.safe_load(published.read_text()) or {}
    if not isinstance(doc, dict) or not doc.get("matrices") or not doc.get("records"):
        raise HarnessError(f"{published}: needs `matrices` (a list of matrix files) and `records` (a folder)")
    root = published.parent.parent
    jobs: dict[str, Job] = {}
    for spec in doc["matrices"]:
        for job in expand(load_matrix(root / spec)):
            jobs[job.key] = job
    return jobs, root / doc["records"]


def check_submission(records: list[JobRecord], jobs: dict[str, Job]) -> list[str]:
    """Every reason to refuse ``records`` against the published ``jobs`` (empty: acceptable)."""
    problems = []
    by_label = {job.label: job for job in jobs.values()}
    keys = {r.key for r in records}
    for r in records:
        if not r.harness_version:
            problems.append(f"{r.label}: no harness_version; export it with `harness export`")
        job = jobs.get(r.key)
        if job is None:
            same = by_label.get(r.label)
            if same is None:
                problems.append(f"{r.label}: not a cell of the published matrices; add it to a matrix "
                                f"listed in {PUBLISHED} first")
            else:
                diff = "plugin versions " + json.dumps(r.versions) + " vs installed " + json.dumps(same.versions) \
                    if r.versions != same.versions else "its config or upstream jobs differ from the matrix's"
                problems.append(f"{r.label}: key {r.key} is not the published cell's {same.key}: {diff}")
            continue
        if r.kind == "evaluate":
            if r.status != "done":
                problems.append(f"{r.label}: status {r.status}; submit finished evaluations only")
            missing = [d for d in r.deps[:2] if d not in keys]
            if missing:
                problems.append(f"{r.label}: its train/purify records {missing} are not in the submission; "
                                f"export the whole run")
    return problems


def add_submission(path: str | Path, published: str | Path = PUBLISHED) -> tuple[int, int, Path]:
    """Validate a submission and append it to the published records.
    Returns (added, already published, the file written)."""
    records = read_records(path, current_only=True)
    jobs, folder = published_jobs(published)
    _raise(check_submission(records, jobs), f"{path} refused")
    done = set()
    for existing in sorted(folder.glob("*.jsonl")):
        done |= {r.key for r in read_records(existing) if r.status == "done"}
    new = [r for r in records if r.key not in done]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "submissions.jsonl"
    before = target.read_text() if target.exists() else ""
    tmp = target.with_suffix(".tmp")  # all or nothing: never a half-appended file
    tmp.write_text(before + "".join(r.model_dump_json() + "\n" for r in new))
    tmp.replace(target)
    return len(new), len(records) - len(new), target
