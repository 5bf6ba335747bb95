"""The scheduler: decides which job of a matrix runs next, hands it to an executor and stores
what comes back.

It hands every job whose upstream jobs are done to an executor
(:mod:`backdoor_harness.executor`: this process, a pool of worker processes, or
Ray actors; each runs a job with a :class:`~backdoor_harness.handlers.JobRunner`)
and is the only writer of the store. A finished job (its record is ``done``) is
never recomputed; a job that raises is recorded ``failed`` with its traceback
and the jobs downstream of it are recorded ``blocked``, while the rest of the
matrix goes on. Both are retried by the next run.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from .executor import POLL_S, Executor, InProcess, RayExecutor, WorkerPool
from .handlers import JobRunner, device_name
from .jobs import Job
from .matrix import MatrixSpec, expand
from .status import save_matrix
from .store import FINISHED, RunLease, Store, active_runs, job_record, now
from .train import default_device


def run_matrix(spec: MatrixSpec, workdir: str | Path, *, device: str | None = None, progress: bool = True,
               log=print, workers: int = 1, devices: list[str] | None = None, retries: int = 2,
               executor: str = "local", address: str | None = None) -> dict[str, int]:
    """Run (or resume) a matrix in ``workdir``. Returns counts per outcome.

    With ``workers == 1`` and no ``devices``, jobs run in this process; otherwise in a
    :class:`~backdoor_harness.executor.WorkerPool` of ``workers`` processes per device
    (``devices``: CUDA indices, default every visible GPU, or the CPU). ``executor="ray"``
    runs them on Ray actors instead (``address``: a cluster to join; none starts a local Ray).
    """
    jobs = expand(spec)
    counts = {"cached": 0, "done": 0, "failed": 0, "skipped": 0, "blocked": 0}
    workdir = Path(workdir)
    by_key = {j.key: j for j in jobs}
    with RunLease(workdir) as lease:
        store = Store(workdir)
        save_matrix(spec, workdir)
        if executor == "ray":
            pool = RayExecutor(workdir, by_key, store, address=address, per_device=workers, retries=retries,
                               log=log)
            where = f"{len(pool.actors)} Ray actors"
        elif workers > 1 or devices:
            if not devices:
                cuda = device != "cpu" and torch.cuda.is_available()
                devices = [str(i) for i in range(torch.cuda.device_count())] if cuda else ["cpu"]
            pool = WorkerPool(workdir, by_key, devices, workers, retries, log=log)
            where = f"{len(pool.workers)} workers on {'CPU' if devices == ['cpu'] else 'GPU ' + ','.join(devices)}"
        else:
            runner = JobRunner(store, by_key, torch.device(device) if device else default_device(), progress)
            pool, where = InProcess(runner), f"device {device_name(runner.device)}"
        log(f"matrix {spec.name!r}: {len(jobs)} jobs, workdir {workdir}, {where}")
        others = [who for run, who in active_runs(workdir).items() if run != lease.id]
        if others:
            log(f"{len(others)} other `harness run` on this work directory ({'; '.join(others)}): "
                f"sharing the work, each job runs in one of them")
        try:
            schedule(jobs, store, pool, counts, log, lease.id)
        finally:
            pool.close()
            store.release_all(lease.id)
            store.close()
    log(" ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def schedule(jobs: list[Job], store: Store, executor: Executor, counts: dict[str, int], log, run: str | None = None
              ) -> None:
    """Hand every job whose upstreams are done to the executor and store what comes back; a job
    whose upstream failed (or was skipped) is recorded blocked (skipped) without running.

    ``run`` (a :class:`~backdoor_harness.store.RunLease` id): claim each job in the store before
    starting it, so that other runs on the same work directory never start it too; jobs they hold
    are waited for and counted ``cached`` once they finish there."""
    began = now()
    width = len(str(len(jobs)))
    tags = {j.key: f"[{i:>{width}}/{len(jobs)}]" for i, j in enumerate(jobs, 1)}
    labels = {j.key: j.label for j in jobs}
    pending: dict[str, Job] = {}
    for job in jobs:
        if store.is_final(job.key):
            counts["cached"] += 1
            continue
        old = store.get(job.key)
        if old is not None and old.status == "done" and old.artifact:
            log(f"{tags[job.key]} {job.label}: its artifact {old.artifact} is missing or does not match its "
                f"recorded sha256 (truncated or corrupt): recomputing")
        elif old is not None and old.status == "done":  # not final: a kind that makes one (store.MAKES_ARTIFACT)
            log(f"{tags[job.key]} {job.label}: recorded done with no artifact (by a harness that did not check "
                f"plugin outputs): recomputing")
        pending[job.key] = job
    running: dict[str, Job] = {}
    elsewhere: dict[str, str] = {}  # job key -> the other run that holds it (or finished it)
    recompute: set[str] = set()  # finished by another run, but its artifact fails the check

    def claim(job: Job) -> bool:
        owner = store.claim(job.key, run, math.inf if job.key in recompute else began) if run else None
        if owner is not None:
            elsewhere[job.key] = owner
        return owner is None

    waiting = False
    while pending or running:
        for key in list(elsewhere):  # finished there: reuse it; else try to claim it again below
            if store.is_final(key):
                counts["cached"] += 1
                del pending[key]
                log(f"{tags[key]} {labels[key]}: done by another run")
            elif elsewhere[key] == FINISHED:
                recompute.add(key)
        elsewhere.clear()
        ready = []
        for job in list(pending.values()):
            if any(d in pending or d in running for d in job.deps):
                continue
            bad = [d for d in job.deps if not store.is_final(d) or store.get(d).status != "done"]
            if not bad:
                ready.append(job)
                continue
            up = store.get(bad[0])
            status = "skipped" if up and up.status == "skipped" else "blocked"
            why = f"upstream {labels[bad[0]]} is {up.status if up else 'missing'}"
            store.put(job_record(job, status, error=why, finished=now()))
            counts[status] += 1
            del pending[job.key]
            log(f"{tags[job.key]} {job.label}: not run ({why})")
        if ready and executor.free():
            for job, where in executor.submit(ready, claim):
                del pending[job.key]
                running[job.key] = job
                store.put(job_record(job, "running", device=where))
        if not running:
            held = {o for o in elsewhere.values() if o != FINISHED}
            if held and not waiting:
                who = active_runs(store.workdir)
                log(f"waiting: the {len(elsewhere)} job(s) left that can start are held by another "
                    f"`harness run` on this work directory ({'; '.join(sorted(who.get(o, o) for o in held))})")
            waiting = bool(held)
            if held:
                time.sleep(POLL_S)
            continue
        waiting = False
        for rec in executor.poll():
            running.pop(rec.key, None)
            store.put(rec)
            counts[rec.status] += 1
            summary = ", ".join(f"{k} {v:.4f}" for k, v in rec.metrics.items()
                                if isinstance(v, float) and k not in ("images_per_s", "wall_s", "final_loss"))
            note = {"done": summary, "skipped": rec.error,
                    "failed": (rec.error or "").strip().splitlines()[-1] if rec.error else ""}[rec.status]
            log(f"{tags[rec.key]} {rec.label}: {rec.status} in {rec.wall_s:.1f}s" + (f" ({note})" if note else ""))
            sys.stdout.flush()
