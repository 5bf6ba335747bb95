"""What a work directory holds: done, failed, running (where, for how long), queued, and the time left.

``harness run`` leaves the matrix it runs in ``matrix.json`` beside the store,
so the status knows the jobs that have no record yet (queued). The time left
is an estimate: each job not yet final is expected to take the mean wall time
of the finished jobs of the same kind and plugin (else of the same kind); a
running job is credited with the time it has already run. Jobs of a kind no
finished job has are counted, not estimated.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from pydantic import ValidationError

from .errors import HarnessError
from .matrix import Job, MatrixSpec, expand
from .store import FINAL, JobRecord, disk_full_error, no_space, write_atomic

MATRIX_FILE = "matrix.json"


def save_matrix(spec: MatrixSpec, workdir: Path) -> None:
    """Leave the matrix in ``workdir`` (atomically); a full disk or a read-only directory is a
    :class:`HarnessError`."""
    try:
        write_atomic(workdir / MATRIX_FILE, json.dumps(spec.model_dump(mode="json"), indent=1))
    except OSError as err:
        if no_space(err):
            raise disk_full_error(workdir, str(err)) from None
        raise HarnessError(f"cannot write {workdir / MATRIX_FILE} ({err}); make the work directory writable "
                           f"or pick another with --workdir") from None


def plugin_of(kind: str, config: dict[str, Any]) -> str:
    """The plugin a job runs (its attack, defense or evaluator name; ``clean`` for a clean model)."""
    ref = config.get({"prepare": "attack", "train": "attack", "purify": "defense",
                      "evaluate": "evaluator"}.get(kind, ""))
    return ref["name"] if isinstance(ref, dict) else "clean"


def summarize(records: list[JobRecord], jobs: list[Job] | None, now: float | None = None) -> dict[str, Any]:
    """Counts per (kind, status) including ``queued``, the running jobs, and the estimated seconds left."""
    now = time.time() if now is None else now
    by_key = {r.key: r for r in records}
    walls: dict[tuple[str, str], list[float]] = defaultdict(list)
    kind_walls: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.status == "done" and r.wall_s is not None:
            walls[(r.kind, plugin_of(r.kind, r.config))].append(r.wall_s)
            kind_walls[r.kind].append(r.wall_s)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for r in records:
        counts[(r.kind, r.status)] += 1
    running = [r for r in records if r.status == "running"]
    left, unknown = 0.0, 0
    pending = [(j.kind, plugin_of(j.kind, j.payload), by_key.get(j.key)) for j in (jobs or [])
               if j.key not in by_key or by_key[j.key].status not in FINAL]
    for job in jobs or []:
        if job.key not in by_key:
            counts[(job.kind, "queued")] += 1
    for kind, plugin, rec in pending:
        history = walls.get((kind, plugin)) or kind_walls.get(kind)
        if not history:
            unknown += 1
            continue
        spent = now - rec.started if rec is not None and rec.status == "running" and rec.started else 0.0
        left += max(mean(history) - spent, 0.0)
    return {"counts": dict(counts), "running": running, "seconds_left": left if jobs is not None else None,
            "unestimated": unknown, "now": now}


def load_jobs(workdir: Path, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr)) -> list[Job] | None:
    """The jobs of the matrix last run in ``workdir``; None when it left none, or when that file no
    longer reads or expands (reported through ``warn``: the status then lacks the queued jobs)."""
    path = Path(workdir) / MATRIX_FILE
    if not path.exists():
        return None
    try:
        return expand(MatrixSpec.model_validate(json.loads(path.read_text())))
    except (OSError, ValueError, ValidationError, HarnessError) as err:
        why = " ".join(str(err).split())[:300]
        warn(f"{path} does not give the matrix's jobs ({why}); queued jobs and the time left are not shown "
             f"(the next `harness run` rewrites it)")
        return None
