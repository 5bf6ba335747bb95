"""Running the job DAG: the scheduler and what each kind of job does.

The scheduler hands every job whose upstream jobs are done to an executor
(:mod:`backdoor_harness.executor`: this process, or a pool of worker
processes) and is the only writer of the store. A finished job (its record is
``done``) is never recomputed; a job that raises is recorded ``failed`` with
its traceback and the jobs downstream of it are recorded ``blocked``, while the
rest of the matrix goes on. Both are retried by the next run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .contracts import DefenseContext, EvalContext, PrepareContext
from .data import DataSpec, ImageSet, load_dataset, reserve_indices
from .errors import HarnessError
from .executor import POLL_S, InProcess, RayExecutor, WorkerPool
from .leaderboard.plots import write_curve_plots
from .matrix import Job, MatrixSpec, expand
from .models import (Normalized, channel_stats, create_model, load_attack_state, load_checkpoint, model_family,
                     save_checkpoint)
from .registry import create, get_class
from .status import save_matrix
from .store import FINISHED, JobRecord, Records, RunLease, Store, active_runs, job_record, now, sha256_file
from .train import Recipe, default_device, fit, predict


class Skip(Exception):
    """Raised by a job that cannot run in this cell (recorded as ``skipped`` with the reason)."""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _param_fingerprint(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().abs().sum() for p in model.state_dict().values() if p.is_floating_point()))


def _plain(value: Any) -> Any:
    """``value`` with tensors and numpy values turned into lists and numbers (what JSON holds)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return _plain(value.tolist())
    return value


@dataclass
class Runner:
    """Runs jobs of one matrix in this process, caching data and models it reuses."""

    store: Records  # a Store, or (on a Ray actor) the records the driver sent
    device: torch.device = field(default_factory=default_device)
    progress: bool = True
    _jobs: dict[str, Job] = field(default_factory=dict)
    _data: dict[str, tuple[ImageSet, ImageSet]] = field(default_factory=dict)
    _models: dict[str, Normalized] = field(default_factory=dict)
    _preds: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict)
    _poisoned_tests: dict[str, ImageSet] = field(default_factory=dict)
    #: train through torch.compile (``harness run --compile``, i.e. ``HARNESS_COMPILE=1``)
    compile: bool = field(default_factory=lambda: os.environ.get("HARNESS_COMPILE") == "1")

    # -- shared state ----------------------------------------------------------

    def data(self, spec: dict) -> tuple[ImageSet, ImageSet]:
        key = json.dumps(spec, sort_keys=True)
        if key not in self._data:
            self._data[key] = load_dataset(DataSpec.model_validate(spec))
        return self._data[key]

    def fit(self, job: Job, *args: Any, **kwargs: Any) -> dict[str, float]:
        """:func:`~backdoor_harness.train.fit` with this runner's progress meter (labelled with the job)
        and compile setting, and the augmentation of the cell's data set, whatever set it trains on
        (an attacker's poisoned set, a defense's or an evaluator's own mix)."""
        data_job = job if "data" in job.payload else self._jobs[job.deps[0]]
        augmentation = self.data(data_job.payload["data"])[0].augmentation
        return fit(*args, **{"progress": self.progress, "desc": job.label, "compile": self.compile,
                             "augmentation": augmentation, **kwargs})

    def new_model(self, train_job: Job) -> Normalized:
        train, _ = self.data(train_job.payload["data"])
        mean, std = channel_stats(train.images)
        return create_model(train_job.payload["model"], train.num_classes, train.image_size, mean, std)

    def model(self, key: str) -> Normalized:
        """The model an upstream train/purify job produced (loaded once, never mutated)."""
        if key not in self._models:
            job = self._jobs[key]
            train_job = job if job.kind == "train" else self._jobs[job.deps[0]]
            model = load_checkpoint(self.new_model(train_job), self.artifact(key)).to(self.device).eval()
            if len(self._models) >= 8:
                self._models.pop(next(iter(self._models)))
            self._models[key] = model
        return self._models[key]

    def reserve(self, train: ImageSet, train_job: Job, job: Job) -> ImageSet:
        """The defender's clean reserve of a purify or evaluate job."""
        spec = DataSpec.model_validate({**train_job.payload["data"], **job.payload["reserve"]})
        return train.subset(reserve_indices(train.labels, spec, job.payload["seed"]))

    def artifact(self, key: str) -> Path:
        """The checked artifact file of a finished job."""
        rec = self.store.get(key)
        path = self.store.workdir / rec.artifact
        if rec.artifact_sha256 and sha256_file(path) != rec.artifact_sha256:
            raise HarnessError(f"checkpoint {path} does not match its recorded sha256; delete it and rerun")
        return path

    def attack(self, job: Job, trained: bool = True):
        """The attack of a train or prepare job, with the state its prepare job
        generated and (``trained``) the state it learned while training."""
        ref = job.payload["attack"]
        if ref is None:
            return None
        attack = create("attack", ref["name"], **ref["config"])
        state: dict[str, torch.Tensor] = {}
        if job.kind == "train" and attack.prepares():
            state.update(load_attack_state(self.artifact(job.deps[0])))
        if trained and job.kind == "train" and self.store.is_final(job.key):
            state.update(load_attack_state(self.artifact(job.key)))
        if state:
            attack.load_state_dict(state)
        return attack

    # -- the kinds of job ------------------------------------------------------------

    def run_prepare(self, job: Job) -> tuple[dict, None, dict]:
        train, _ = self.data(job.payload["data"])
        seed = job.payload["seed"]
        attack = self.attack(job)
        ctx = PrepareContext(train=train, device=self.device, generator=seed_everything(seed), seed=seed,
                             fit=partial(self.fit, job),
                             clean_model=self.model(job.deps[0]) if job.deps else None)
        attack.prepare(ctx)
        state = attack.state_dict()
        if not state:
            raise HarnessError(f"attack {attack.name!r} prepared nothing: its state_dict() is empty after prepare()")
        return {"state_tensors": len(state), "state_numel": sum(v.numel() for v in state.values())}, None, state

    def run_train(self, job: Job) -> tuple[dict, torch.nn.Module, dict]:
        train, _ = self.data(job.payload["data"])
        g = seed_everything(job.payload["seed"])
        model = self.new_model(job)
        recipe = Recipe(**job.payload["recipe"])
        attack = self.attack(job, trained=False)
        metrics: dict[str, Any] = {}
        if attack is None:
            stats = self.fit(job, model, train, recipe, device=self.device, generator=g)
        elif attack.training_controlled:  # it poisons round(rate * B) images of every batch itself
            metrics.update(poison_rate=attack.config.poison_rate, stamp="in_training_step")
            stats = self.fit(job, model, train, recipe, device=self.device, generator=g,
                             loss_fn=attack.training_loss)
        else:
            poisoned = attack.poison(train, g)
            n = int(poisoned.poison_mask.sum())
            metrics.update(poison_count=n, poison_rate=n / len(train), stamp=poisoned.stamp)
            stats = self.fit(job, model, poisoned, recipe, device=self.device, generator=g)
        metrics.update(stats)
        if job.deps:
            metrics["prepare_wall_s"] = self.store.get(job.deps[0]).wall_s
        return metrics, model, (attack.state_dict() if attack is not None else {})

    def run_purify(self, job: Job) -> tuple[dict, torch.nn.Module]:
        train_job = self._jobs[job.deps[0]]
        ref = job.payload["defense"]
        defense = create("defense", ref["name"], **ref["config"])
        backdoored = self.model(train_job.key)
        family = model_family(backdoored)
        if not defense.supports(family):
            raise Skip(f"defense {defense.name!r} supports {sorted(defense.families)}, not {family!r}")
        train, _ = self.data(train_job.payload["data"])
        seed = job.payload["seed"]
        g = seed_everything(seed)
        attack = self.attack(train_job)
        if "oracle_trigger" in defense.needs and attack is None:
            raise Skip(f"defense {defense.name!r} needs the attack's trigger and this model has none")
        reserve = self.reserve(train, train_job, job)
        ctx = DefenseContext(reserve=reserve, num_classes=train.num_classes, device=self.device, generator=g,
                             seed=seed, family=family,
                             fit=partial(self.fit, job),
                             attack=attack if "oracle_trigger" in defense.needs else None)
        before = _param_fingerprint(backdoored)
        purified = defense.purify(backdoored, ctx)
        if _param_fingerprint(backdoored) != before:
            raise HarnessError(f"defense {defense.name!r} modified the model it was given; "
                               f"it must copy it (copy.deepcopy) before changing weights")
        metrics: dict[str, Any] = {"reserve_size": len(reserve)}
        if defense.last_report:
            metrics["report"] = _plain(defense.last_report)
        return metrics, purified

    def run_evaluate(self, job: Job) -> tuple[dict, None]:
        train_job = self._jobs[job.deps[0]]
        ref = job.payload["evaluator"]
        evaluator = create("evaluator", ref["name"], **ref["config"])
        attack = self.attack(train_job)
        if attack is None:
            raise Skip("evaluators need an attacked model")
        _, test = self.data(train_job.payload["data"])
        if train_job.key not in self._poisoned_tests:
            self._poisoned_tests = {train_job.key: attack.poison_test(test)}  # jobs come grouped by attack
        poisoned_test = self._poisoned_tests[train_job.key]
        roles = {"backdoored": job.deps[0], "purified": job.deps[1]}
        if evaluator.needs_clean_model:
            roles["clean"] = job.deps[2]
        refs = job.deps[len(roles):]
        defended = {ref["name"]: self.model(key) for ref, key in zip(evaluator.needs_defenses, refs)}
        splits = {"clean": test, "poisoned": poisoned_test}

        def predict_fn(role: str, split: str) -> torch.Tensor:
            memo = (roles[role], split, train_job.key)
            if memo not in self._preds:
                if len(self._preds) > 64:
                    self._preds.clear()
                self._preds[memo] = predict(self.model(roles[role]), splits[split].images, self.device)
            return self._preds[memo]

        train, _ = self.data(train_job.payload["data"])
        seed = job.payload["seed"]
        reserve = self.reserve(train, train_job, job)
        ctx = EvalContext(backdoored=self.model(roles["backdoored"]), purified=self.model(roles["purified"]),
                          clean_test=test, poisoned_test=poisoned_test, attack=attack, device=self.device,
                          predict=predict_fn, clean_model=self.model(roles["clean"]) if "clean" in roles else None,
                          defended=defended,
                          train=train, reserve=reserve, seed=seed, generator=seed_everything(seed),
                          fit=partial(self.fit, job))
        metrics = evaluator.evaluate(ctx)
        unknown = set(metrics) - set(evaluator.metrics)
        if unknown:
            raise HarnessError(f"evaluator {evaluator.name!r} returned undeclared metrics {sorted(unknown)}; "
                               f"declare them in its `metrics`")
        return {k: [float(x) for x in v] if evaluator.metrics[k].curve else float(v)
                for k, v in metrics.items()}, None

    # -- one job ----------------------------------------------------------------

    def run_job(self, job: Job) -> JobRecord:
        """Run one job; its artifact is on disk when this returns. The record is the caller's to store."""
        rec = job_record(job, "running", device=device_name(self.device))
        t0 = time.perf_counter()
        try:
            metrics, model, *state = getattr(self, f"run_{job.kind}")(job)
            attack_state = state[0] if state else None
            if model is not None or attack_state:
                path = self.store.artifact_path(job.key)
                save_checkpoint(model, path, attack_state)
                rec.artifact = str(path.relative_to(self.store.workdir))
                rec.artifact_sha256 = sha256_file(path)
            rec.metrics, rec.status = metrics, "done"
        except Skip as why:
            rec.status, rec.error = "skipped", str(why)
        except Exception:  # a failing cell must not stop the matrix
            rec.status, rec.error = "failed", traceback.format_exc()
        rec.finished, rec.wall_s = now(), time.perf_counter() - t0
        return rec


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
            runner = Runner(store, torch.device(device) if device else default_device(), progress)
            runner._jobs = by_key
            pool, where = InProcess(runner), f"device {device_name(runner.device)}"
        log(f"matrix {spec.name!r}: {len(jobs)} jobs, workdir {workdir}, {where}")
        others = [who for run, who in active_runs(workdir).items() if run != lease.id]
        if others:
            log(f"{len(others)} other `harness run` on this work directory ({'; '.join(others)}): "
                f"sharing the work, each job runs in one of them")
        try:
            _schedule(jobs, store, pool, counts, log, lease.id)
        finally:
            pool.close()
            store.release_all(lease.id)
        labels = {name: m.doc or name for ref in spec.evaluators
                  for name, m in get_class("evaluator", ref.name).metrics.items() if m.curve}
        plots = write_curve_plots(store.records("evaluate"), store.artifacts / "plots", labels)
        if plots:
            log(f"curve plots: {len(plots) // 2} in {store.artifacts / 'plots'}")
        store.close()
    log(" ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def _schedule(jobs: list[Job], store: Store, executor, counts: dict[str, int], log, run: str | None = None
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
