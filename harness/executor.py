"""Executors: where the jobs of a matrix run.

The scheduler (:mod:`backdoor_harness.scheduler`) owns the DAG and the store: it
hands ready jobs to an executor and writes every record itself. An executor
only runs jobs, each with a :class:`~backdoor_harness.handlers.JobRunner`:

- :class:`InProcess` runs one job at a time in the calling process (the
  default on a CPU-only machine, and what the tests use);
- :class:`RayExecutor` runs them as calls to Ray actors (one per GPU slot,
  fractional GPUs allowed) on a cluster;
- :class:`WorkerPool` keeps long-lived worker processes (spawned, each pinned
  to one GPU through ``CUDA_VISIBLE_DEVICES`` before CUDA starts; ``k``
  workers per device), hands each a job when it is free, preferring a job
  downstream of an attacked model the worker already ran (its data and
  models are cached there), and replaces a worker that dies or hits a CUDA
  error, retrying its job (twice by default) before recording it failed.
  Its workers die with their driver: each watches its parent (and, on Linux,
  asks the kernel for a parent-death signal), so a driver killed even with
  SIGKILL leaves no worker holding a GPU. They ignore Ctrl-C (SIGINT): the
  driver gets it and stops them.

They speak the same small interface, :class:`Executor`. A job that fails
because the disk is full stops the run (:class:`~backdoor_harness.errors.HarnessError`)
instead of failing every job after it the same way.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from .handlers import JobRunner, device_name
from .jobs import Job
from .errors import HarnessError
from .store import JobRecord, Records, disk_full, disk_full_error, job_record, now

#: how often the pool looks at its workers while waiting for results
POLL_S = 0.5
#: how often a worker checks that its driver is alive
WATCH_S = 0.5
#: how long a Ray actor may stay unavailable (its node silent, not yet declared dead) before its
#: job counts a retry
UNAVAILABLE_S = 300.0
#: environment variables a Ray actor gets from the driver
ENV_PASSED = ("HARNESS_DATA", "HARNESS_CACHE", "HARNESS_PLUGINS", "HARNESS_COMPILE", "PYTHONPATH")


def model_key(job: Job) -> str:
    """The attacked (or clean) model a job works on: its own key for a train or prepare job, else its
    ``train`` upstream."""
    return getattr(job, "train", None) or job.key


Claim = Callable[[Job], bool]


def checked(records: list[JobRecord], workdir: str | Path) -> list[JobRecord]:
    """``records``, unless one failed because the disk is full (its checkpoint could not be
    written): then the run stops with :func:`~backdoor_harness.store.disk_full_error` (that job is
    not recorded, so nothing is marked done; the next run reruns it)."""
    for rec in records:
        if rec.status == "failed" and disk_full(rec.error):
            last = (rec.error or "").strip().splitlines()[-1:] or [""]
            raise disk_full_error(workdir, f"{rec.label}: {last[0][:200]}")
    return records


class Executor(Protocol):
    """Where jobs run; the scheduler's only view of it."""

    def free(self) -> int:
        """How many jobs it can take now."""

    def submit(self, ready: list[Job], claim: Claim) -> list[tuple[Job, str]]:
        """Start some of the ``ready`` jobs (those ``claim`` grants; it picks which) and return
        them with where each runs."""

    def poll(self) -> list[JobRecord]:
        """Records of the jobs that finished since the last call."""

    def close(self) -> None:
        """Stop its workers."""


def pick(ready: list[Job], holds: set[str], claim: Claim) -> Job | None:
    """Take from ``ready`` the job to start next: the first one on a model in ``holds``, else the
    first one, skipping (and dropping) the jobs ``claim`` refuses (another run has them)."""
    for job in sorted(ready, key=lambda j: model_key(j) not in holds):  # stable: order kept otherwise
        ready.remove(job)
        if claim(job):
            return job
    return None


class InProcess:
    """Runs jobs one at a time in this process."""

    def __init__(self, runner: JobRunner):
        self.runner = runner
        self._next: Job | None = None

    def free(self) -> int:
        return 0 if self._next else 1

    def submit(self, ready: list[Job], claim: Claim = lambda job: True) -> list[tuple[Job, str]]:
        self._next = pick(list(ready), set(), claim)
        return [(self._next, device_name(self.runner.device))] if self._next else []

    def poll(self) -> list[JobRecord]:
        job, self._next = self._next, None
        return checked([self.runner.run_job(job)] if job else [], self.runner.store.workdir)

    def close(self) -> None:
        pass


def _die_with(parent: int, pdeathsig: bool) -> None:
    """End this process when ``parent`` (the driver) is gone: a parent-death signal where the
    kernel has one (Linux; immediate, even while this process is busy in native code; only for a
    worker started by the driver's main thread, since the kernel sends it when the starting
    *thread* ends), and a thread that checks, every :data:`WATCH_S`, that the parent is still ours
    (everywhere)."""
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # no prctl: the thread below still does it

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_S)
        os._exit(1)  # the driver died (or was killed): nobody will read what this worker computes

    if os.getppid() != parent:  # it died before we got here
        os._exit(1)
    threading.Thread(target=watch, name="watch-driver", daemon=True).start()


def _worker_main(wid: int, workdir: str, device: str, threads: int, jobs: dict[str, Job], inbox, outbox,
                 progress: bool, parent: int | None = None, pdeathsig: bool = False) -> None:
    """A worker process: runs the jobs it is sent and sends back their records (never writes the store).
    It ignores Ctrl-C (the driver stops it) and exits when the driver ``parent`` dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent is not None:
        _die_with(parent, pdeathsig)
    import torch

    from .store import Store

    if threads:
        torch.set_num_threads(threads)
    runner = JobRunner(Store(workdir), jobs, torch.device(device), progress)
    while True:
        try:
            key = inbox.get(timeout=WATCH_S)
        except queue.Empty:
            if parent is not None and os.getppid() != parent:
                os._exit(1)
            continue
        if key is None:
            return
        rec = runner.run_job(jobs[key])
        outbox.put((wid, rec.model_dump()))
        if rec.status == "failed" and "CUDA error" in (rec.error or ""):
            os._exit(3)  # the CUDA context is unusable: the pool starts a fresh worker


@dataclass
class _Worker:
    wid: int
    device: str
    visible: str | None
    proc: Any = None
    inbox: Any = None
    job: Job | None = None
    started: float = 0.0
    holds: set[str] = field(default_factory=set)


class WorkerPool:
    """Long-lived worker processes, ``per_device`` on each of ``devices``.

    Args:
        workdir: the matrix's work directory (artifacts are read and written there).
        jobs: every job of the matrix, by key (sent once to each worker).
        devices: ``["cpu"]`` or CUDA device indices as strings (``["0", "1"]``).
        per_device: workers per device (several small 32x32 jobs can share a GPU).
        retries: how often a job whose worker died is run again before it is recorded failed.
    """

    def __init__(self, workdir: Path, jobs: dict[str, Job], devices: list[str], per_device: int = 1,
                 retries: int = 2, progress: bool = False, log=print):
        self.workdir, self.jobs, self.retries, self.progress, self.log = str(workdir), jobs, retries, progress, log
        self.ctx = mp.get_context("spawn")
        self.outbox = self.ctx.Queue()
        cpu = devices == ["cpu"]
        n = per_device * len(devices)
        self.threads = max(1, (os.cpu_count() or 1) // n) if cpu else 0
        self.workers = [_Worker(i, "cpu" if cpu else "cuda:0", None if cpu else devices[i // per_device])
                        for i in range(n)]
        self.attempts: dict[str, int] = {}
        for w in self.workers:
            self._start(w)

    def _start(self, w: _Worker) -> None:
        w.inbox = self.ctx.Queue()
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if w.visible is not None:  # the child sees one GPU, as cuda:0, from its first CUDA call
            os.environ["CUDA_VISIBLE_DEVICES"] = w.visible
        # a terminal's Ctrl-C goes to every process of the group: the worker starts with SIGINT
        # blocked (inherited through spawn; it then ignores it), so only the driver sees it
        masked = hasattr(signal, "pthread_sigmask")
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if masked else None
        try:
            w.proc = self.ctx.Process(target=_worker_main, daemon=True,
                                      args=(w.wid, self.workdir, w.device, self.threads, self.jobs, w.inbox,
                                            self.outbox, self.progress, os.getpid(),
                                            threading.current_thread() is threading.main_thread()))
            w.proc.start()
        finally:
            if masked:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            if w.visible is not None:
                if saved is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved
        w.job, w.holds = None, set()

    def where(self, w: _Worker) -> str:
        gpu = f"GPU {w.visible}" if w.visible is not None else "cpu"
        return f"worker {w.wid} ({gpu}, pid {w.proc.pid})"

    def free(self) -> int:
        return sum(w.job is None for w in self.workers)

    def submit(self, ready: list[Job], claim: Claim = lambda job: True) -> list[tuple[Job, str]]:
        """Give free workers ready jobs, each preferring one on a model it already holds."""
        started, ready = [], list(ready)
        for w in (w for w in self.workers if w.job is None):
            job = pick(ready, w.holds, claim)
            if job is None:
                break
            w.job, w.started = job, time.time()
            w.inbox.put(job.key)
            started.append((job, self.where(w)))
        return started

    def poll(self) -> list[JobRecord]:
        """Finished records; a worker found dead has its job retried or, past ``retries``, failed."""
        out = []
        try:
            wid, raw = self.outbox.get(timeout=POLL_S)
        except queue.Empty:
            pass
        else:
            w = self.workers[wid]
            rec = JobRecord.model_validate(raw)
            if w.job is not None and w.job.key == rec.key:
                w.holds.add(model_key(w.job))
                w.job = None
            out.append(rec)
        for w in self.workers:
            if w.job is not None and not w.proc.is_alive():
                out.extend(self._lost(w))
        return checked(out, self.workdir)

    def _lost(self, w: _Worker) -> list[JobRecord]:
        job, code = w.job, w.proc.exitcode
        n = self.attempts[job.key] = self.attempts.get(job.key, 0) + 1
        self._start(w)  # a fresh process in its place
        why = f"worker {w.wid} died (exit code {code}) while running it"
        if n <= self.retries:
            self.log(f"{job.label}: {why}; retry {n} of {self.retries} on a fresh worker")
            w.job, w.started = job, time.time()
            w.inbox.put(job.key)
            return []
        return [job_record(job, "failed", finished=now(), wall_s=0.0,
                           error=f"{why}, {n} times (retries: {self.retries})")]

    def close(self) -> None:
        """Stop the workers: an idle one finishes (its inbox says so); a busy one (the run is
        ending early: Ctrl-C, an error) is terminated, its job left unrecorded for the next run."""
        for w in self.workers:
            if w.proc.is_alive():
                if w.job is None:
                    w.inbox.put(None)
                else:
                    w.proc.terminate()
        for w in self.workers:
            w.proc.join(timeout=10)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.inbox.cancel_join_thread()  # what a stopped worker never read is not waited for


class RayExecutor:
    """The same jobs on a Ray cluster (``pip install backdoor-harness[ray]``): one actor per slot.

    Each actor holds a :class:`~backdoor_harness.handlers.JobRunner` (so, like a
    pool worker, it keeps the data and models it loaded) and asks Ray for
    ``1 / per_device`` of a GPU (fractional GPUs: several small jobs share
    one) or, without GPUs, one CPU. Actors read and write artifacts in the
    work directory, which must therefore be a path every node can read and
    write (a shared file system mounted at the same path). Only the driver
    opens the store (an SQLite database, which must not be shared across
    nodes): each call sends the records of the job's upstream jobs along. An
    actor lost with its node is restarted by Ray, and the job it ran is run
    again (``retries``), then recorded failed.

    Args:
        store: the driver's store (the upstream records are read from it).
        address: ``ray.init`` address (``"auto"`` joins a running cluster; None starts a local one).
        slots: how many actors (default: one per GPU times ``per_device``, else the cluster's CPUs).
    """

    def __init__(self, workdir: Path, jobs: dict[str, Job], store: Records, *, address: str | None = None,
                 per_device: int = 1, slots: int | None = None, retries: int = 2, log=print):
        try:
            import ray
        except ImportError:
            raise HarnessError("--executor ray needs Ray: pip install 'backdoor-harness[ray]'") from None
        self.ray, self.jobs, self.store, self.retries, self.log = ray, jobs, store, retries, log
        if not ray.is_initialized():
            # the actors see the driver's data, cache and plugin settings
            env = {k: os.environ[k] for k in ENV_PASSED if k in os.environ}
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env} if env else None)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        share = {"num_gpus": 1 / per_device, "num_cpus": 1} if gpus else {"num_cpus": 1}
        n = slots or (gpus * per_device if gpus else int(ray.cluster_resources().get("CPU", 1)))
        actor = ray.remote(max_restarts=-1)(_RayWorker).options(**share)  # Ray restarts a lost actor
        self.actors = [actor.remote(str(workdir), "cuda" if gpus else "cpu", jobs) for _ in range(n)]
        self.busy: dict[Any, tuple[int, Job]] = {}  # ObjectRef -> (actor index, job)
        self.later: dict[int, tuple[float, Job]] = {}  # actor index -> (when to call it again, job)
        self.holds: list[set[str]] = [set() for _ in self.actors]
        self.attempts: dict[str, int] = {}
        self.unavailable_since: dict[str, float] = {}
        # (older Rays have no such error: there a silent node's calls fail as a lost actor's)
        self.unavailable = getattr(ray.exceptions, "ActorUnavailableError", ())

    def _taken(self) -> set[int]:
        return {i for i, _ in self.busy.values()} | set(self.later)

    def free(self) -> int:
        return len(self.actors) - len(self._taken())

    def _call(self, i: int, job: Job) -> None:
        self.busy[self.actors[i].run.remote(job.key, self._upstream(job))] = (i, job)

    def _upstream(self, job: Job) -> dict[str, dict]:
        """The records of every job upstream of ``job`` (what it loads), for the actor."""
        out, todo = {}, list(job.deps)
        while todo:
            key = todo.pop()
            if key not in out and (rec := self.store.get(key)) is not None:
                out[key] = rec.model_dump()
                todo += self.jobs[key].deps
        return out

    def submit(self, ready: list[Job], claim: Claim = lambda job: True) -> list[tuple[Job, str]]:
        started, ready = [], list(ready)
        for i in [i for i in range(len(self.actors)) if i not in self._taken()]:
            job = pick(ready, self.holds[i], claim)
            if job is None:
                break
            self._call(i, job)
            started.append((job, f"ray actor {i}"))
        return started

    def poll(self) -> list[JobRecord]:
        """Finished records. A call that fails because its actor is lost is made again on the
        restarted actor: at once when Ray reports the actor died (a retry, ``retries`` at most),
        after a second when Ray only reports it unavailable (its node stopped answering and Ray
        has not yet declared it dead: no retry is counted, for up to ``UNAVAILABLE_S``)."""
        for i, (t, job) in list(self.later.items()):
            if time.time() >= t:
                del self.later[i]
                self._call(i, job)
        if not self.busy:
            time.sleep(POLL_S)
            return []
        done, _ = self.ray.wait(list(self.busy), num_returns=1, timeout=POLL_S)
        out = []
        for ref in done:
            i, job = self.busy.pop(ref)
            try:
                out.append(JobRecord.model_validate(self.ray.get(ref)))
                self.holds[i].add(model_key(job))
                checked(out[-1:], self.store.workdir)
                continue
            except self.unavailable as err:
                if job.key not in self.unavailable_since:
                    self.log(f"{job.label}: ray actor {i} unavailable (its node stopped answering); "
                             f"calling it again as Ray restarts it")
                first = self.unavailable_since.setdefault(job.key, time.time())
                if time.time() - first < UNAVAILABLE_S:
                    self.later[i] = (time.time() + 1.0, job)
                    continue
                why = f"unavailable for {UNAVAILABLE_S:.0f} s: {err}"
            except self.ray.exceptions.RayError as err:  # the actor (or its node) died mid-job
                why = f"{type(err).__name__}: {err}"
            self.unavailable_since.pop(job.key, None)
            self.holds[i] = set()
            n = self.attempts[job.key] = self.attempts.get(job.key, 0) + 1
            if n <= self.retries:
                self.log(f"{job.label}: ray actor {i} lost ({why.splitlines()[0][:120]}); "
                         f"retry {n} of {self.retries}")
                self._call(i, job)
                continue
            out.append(job_record(job, "failed", finished=now(), wall_s=0.0,
                                  error=f"ray actor {i} lost {n} times (retries: {self.retries}): {why}"))
        return out

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


class _RayWorker:
    """A Ray actor's state: a Runner over the shared work directory. It never opens the store
    (SQLite is not for databases shared across nodes): each call brings the records of the
    job's upstream jobs."""

    def __init__(self, workdir: str, device: str, jobs: dict[str, Job]):
        import torch

        self.jobs = jobs
        self.runner = JobRunner(Records(workdir), jobs, torch.device(device), False)

    def run(self, key: str, upstream: dict[str, dict]) -> dict:
        self.runner.store.update({k: JobRecord.model_validate(v) for k, v in upstream.items()})
        return self.runner.run_job(self.jobs[key]).model_dump()
