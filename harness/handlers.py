"""What each kind of job does: :class:`JobRunner` runs one typed job (:mod:`backdoor_harness.jobs`)
in this process and returns its record; it never writes the store (the scheduler does).

- prepare: the attack generates its resources (its ``state_dict``, saved as the job's artifact);
- train: a model on the cell's data set, poisoned by the attack (or clean);
- purify: the defense's :class:`~backdoor_harness.contracts.Purified` model and report;
- evaluate: the evaluator's metrics, each declared in its ``metrics``; the predictions it reads
  (``EvalContext.predict``) come from the work directory's prediction store
  (:mod:`backdoor_harness.predictions`: computed once per model checkpoint, test images and trigger,
  whichever job or process needs them first), and its record names the files it read.

A plugin that breaks its contract (a defense returning something else than
``Purified``, or changing the model it was given; an evaluator returning an
undeclared metric, a value that is not a finite number or one outside its
metric's declared ``range``; any plugin calling ``sys.exit``) fails the job with
a message saying so: it is never recorded done. A job that cannot
run in its cell raises :class:`Skip` and is recorded ``skipped``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import platform
import time
import traceback
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .contracts import DefenseContext, EvalContext, PrepareContext, Purified
from .data import DataSpec, ImageSet, load_dataset, reserve_indices
from .errors import HarnessError
from .jobs import EvaluateJob, Job, PrepareJob, PurifyJob, TrainJob
from .models import (Normalized, channel_stats, create_model, load_attack_state, load_checkpoint, model_family,
                     save_checkpoint)
from .predictions import SPLITS, PredictionStore
from .registry import create, instance
from .store import JobRecord, Records, job_record, now, sha256_file
from .train import Recipe, compile_mode, default_device, fit


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


def check_target(attack: Any, train: ImageSet, job: Job) -> None:
    """An attack's target must be a class of the cell's data set (checked before any training:
    matrix validation checks it only where the data set's class count is known unloaded)."""
    target = attack.config.target
    if not 0 <= target < train.num_classes:
        raise HarnessError(f"{job.label}: attack {attack.name!r} has target {target}, but the data set has "
                           f"{train.num_classes} classes (0 to {train.num_classes - 1}); set the attack's "
                           f"config.target in the matrix to one of them")


def _finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number (a bool is not one), else None."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # a 0-d tensor or numpy scalar
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _within(x: float, lo: float, hi: float) -> bool:
    """``lo <= x <= hi`` up to float rounding (a barrier of accuracies 1 and 1 may come out 1 + 2e-16)."""
    slack = 1e-9 * max(1.0, abs(lo), abs(hi))
    return lo - slack <= x <= hi + slack


def check_metrics(evaluator: Any, out: Any) -> dict[str, Any]:
    """What an evaluator returned, checked against its declared ``metrics`` and turned into
    plain floats (lists of them for curves). Raises HarnessError naming the evaluator, the
    metric and the value for: a result that is not a mapping, an undeclared metric, a value
    that is not a finite number (a curve: a list of them), or one outside the metric's
    declared ``range``. Declared metrics may be missing (a config that turns one off, or one
    without a value in this cell, such as an escape point that is never reached)."""
    name = evaluator.name
    if not isinstance(out, Mapping):
        raise HarnessError(f"evaluator {name!r} returned {type(out).__name__}; evaluate() must return a mapping "
                           f"of metric names to numbers")
    unknown = set(out) - set(evaluator.metrics)
    if unknown:
        raise HarnessError(f"evaluator {name!r} returned undeclared metrics {sorted(map(str, unknown))}; "
                           f"declare them in its `metrics`")
    checked: dict[str, Any] = {}
    for key, value in out.items():
        metric = evaluator.metrics[key]
        if metric.curve:
            raw = value.tolist() if hasattr(value, "tolist") else value
            if not isinstance(raw, (list, tuple)):
                raise HarnessError(f"evaluator {name!r}: curve metric {key!r} is {type(value).__name__} "
                                   f"{value!r:.80}, not a list of numbers")
            items = list(raw)
        else:
            items = [value]
        numbers_ = []
        for i, item in enumerate(items):
            where = f"{key!r}[{i}]" if metric.curve else repr(key)
            x = _finite_number(item)
            if x is None:
                raise HarnessError(f"evaluator {name!r}: metric {where} is {item!r:.80} "
                                   f"({type(item).__name__}), not a finite number; the evaluation is not recorded")
            if metric.range is not None and not _within(x, *metric.range):
                lo, hi = metric.range
                raise HarnessError(f"evaluator {name!r}: metric {where} is {x!r}, outside its declared range "
                                   f"[{lo}, {hi}]; the evaluation is not recorded")
            numbers_.append(x)
        checked[key] = numbers_ if metric.curve else numbers_[0]
    return checked


class JobRunner:
    """Runs jobs of one matrix in this process, caching the data, models and attacks it reuses.

    Args:
        store: the records of finished upstream jobs (a Store, or on a Ray actor the records the
            driver sent).
        jobs: every job of the matrix, by key (upstream jobs are looked up here).
        device: where to compute.
        progress: show a progress meter while training.
        compile: train through ``torch.compile``: False/None, True or a mode of
            :data:`~backdoor_harness.train.COMPILE_MODES`; by default from ``HARNESS_COMPILE``
            (``harness run --compile [MODE]``: ``1`` is the default mode).
    """

    def __init__(self, store: Records, jobs: dict[str, Job], device: torch.device | None = None,
                 progress: bool = True, compile: bool | str | None = None):
        self.store, self.jobs = store, jobs
        self.device = device if device is not None else default_device()
        self.progress = progress
        self.compile = compile_mode(os.environ.get("HARNESS_COMPILE")) if compile is None else compile
        self._data: dict[str, tuple[ImageSet, ImageSet]] = {}
        self._models: dict[str, Normalized] = {}
        self._attacks: dict[tuple[str, bool], Any] = {}
        self._poisoned_tests: dict[str, ImageSet] = {}
        self._predictions: PredictionStore | None = None
        self._read: dict[str, str] = {}  # "role:split" -> predictions file the running evaluation read

    # -- shared state ----------------------------------------------------------

    @property
    def predictions(self) -> PredictionStore:
        """The work directory's predictions (made on first use: a runner may have no store)."""
        if self._predictions is None:
            self._predictions = PredictionStore(self.store.workdir)
        return self._predictions

    def data(self, spec: dict) -> tuple[ImageSet, ImageSet]:
        key = json.dumps(spec, sort_keys=True)
        if key not in self._data:
            self._data[key] = load_dataset(DataSpec.model_validate(spec))
        return self._data[key]

    def train_job(self, job: Job) -> TrainJob | PrepareJob:
        """The job that holds ``job``'s data set: itself (train, prepare) or its attacked model's."""
        return job if isinstance(job, (TrainJob, PrepareJob)) else self.jobs[job.train]

    def fit(self, job: Job, *args: Any, **kwargs: Any) -> dict[str, float]:
        """:func:`~backdoor_harness.train.fit` with this runner's progress meter (labelled with the job)
        and compile setting, and the augmentation of the cell's data set, whatever set it trains on
        (an attacker's poisoned set, a defense's or an evaluator's own mix)."""
        augmentation = self.data(self.train_job(job).data)[0].augmentation
        return fit(*args, **{"progress": self.progress, "desc": job.label, "compile": self.compile,
                             "augmentation": augmentation, **kwargs})

    def new_model(self, train_job: TrainJob | PrepareJob) -> Normalized:
        train, _ = self.data(train_job.data)
        mean, std = channel_stats(train.images)
        return create_model(train_job.model, train.num_classes, train.image_size, mean, std)

    def model(self, key: str) -> Normalized:
        """The model an upstream train/purify job produced (loaded once, never mutated)."""
        if key not in self._models:
            model = load_checkpoint(self.new_model(self.train_job(self.jobs[key])), self.artifact(key))
            if len(self._models) >= 8:
                self._models.pop(next(iter(self._models)))
            self._models[key] = model.to(self.device).eval()
        return self._models[key]

    def reserve(self, train: ImageSet, job: PurifyJob | EvaluateJob) -> ImageSet:
        """The defender's clean reserve of a purify or evaluate job."""
        spec = DataSpec.model_validate({**self.jobs[job.train].data, **job.reserve})
        return train.subset(reserve_indices(train.labels, spec, job.seed))

    def artifact(self, key: str) -> Path:
        """The checked artifact file of a finished job."""
        rec = self.store.get(key)
        path = self.store.workdir / rec.artifact
        if rec.artifact_sha256 and sha256_file(path) != rec.artifact_sha256:
            raise HarnessError(f"checkpoint {path} does not match its recorded sha256; delete it and rerun")
        return path

    def attack(self, job: TrainJob | PrepareJob, trained: bool = True):
        """The attack of a train or prepare job, with the state its prepare job generated and
        (``trained``) the state it learned while training; one instance per job and state."""
        if job.attack is None:
            return None
        memo = (job.key, trained and self.store.is_final(job.key))
        if memo not in self._attacks:
            attack = create("attack", job.attack.name, **job.attack.config)
            state: dict[str, torch.Tensor] = {}
            if isinstance(job, TrainJob) and job.prepare:
                state.update(load_attack_state(self.artifact(job.prepare)))
            if memo[1] and isinstance(job, TrainJob):
                state.update(load_attack_state(self.artifact(job.key)))
            if state:
                attack.load_state_dict(state)
            if len(self._attacks) >= 16:
                self._attacks.pop(next(iter(self._attacks)))
            self._attacks[memo] = attack
        return self._attacks[memo]

    # -- the kinds of job ------------------------------------------------------------

    def run_prepare(self, job: PrepareJob) -> tuple[dict, None, dict]:
        train, _ = self.data(job.data)
        attack = self.attack(job)
        check_target(attack, train, job)
        ctx = PrepareContext(train=train, device=self.device, generator=seed_everything(job.seed), seed=job.seed,
                             fit=partial(self.fit, job), clean_model=self.model(job.clean) if job.clean else None)
        attack.prepare(ctx)
        state = attack.state_dict()
        if not state:
            raise HarnessError(f"attack {attack.name!r} prepared nothing: its state_dict() is empty after prepare()")
        return {"state_tensors": len(state), "state_numel": sum(v.numel() for v in state.values())}, None, state

    def run_train(self, job: TrainJob) -> tuple[dict, torch.nn.Module, dict]:
        train, _ = self.data(job.data)
        g = seed_everything(job.seed)
        model = self.new_model(job)
        recipe = Recipe(**job.recipe)
        attack = self.attack(job, trained=False)
        if attack is not None:
            check_target(attack, train, job)
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
        if job.prepare:
            metrics["prepare_wall_s"] = self.store.get(job.prepare).wall_s
        return metrics, model, (attack.state_dict() if attack is not None else {})

    def run_purify(self, job: PurifyJob) -> tuple[dict, torch.nn.Module]:
        train_job = self.jobs[job.train]
        defense = instance("defense", job.defense.name, job.defense.config)
        backdoored = self.model(train_job.key)
        family = model_family(backdoored)
        if not defense.supports(family):
            raise Skip(f"defense {defense.name!r} supports {sorted(defense.families)}, not {family!r}")
        train, _ = self.data(train_job.data)
        g = seed_everything(job.seed)
        attack = self.attack(train_job)
        oracle = "oracle_trigger" in defense.needs
        if oracle and attack is None:
            raise Skip(f"defense {defense.name!r} needs the attack's trigger and this model has none")
        reserve = self.reserve(train, job)
        ctx = DefenseContext(reserve=reserve, num_classes=train.num_classes, device=self.device, generator=g,
                             seed=job.seed, family=family, fit=partial(self.fit, job),
                             attack=attack if oracle else None)
        before = _param_fingerprint(backdoored)
        out = defense.purify(backdoored, ctx)
        if not isinstance(out, Purified) or not isinstance(out.model, torch.nn.Module):
            got = (f"Purified with a {type(out.model).__name__} as its model" if isinstance(out, Purified)
                   else type(out).__name__)
            raise HarnessError(f"defense {defense.name!r} returned {got}; purify() must return "
                               f"Purified(model, report) with the purified torch.nn.Module")
        if _param_fingerprint(backdoored) != before:
            raise HarnessError(f"defense {defense.name!r} modified the model it was given; "
                               f"it must copy it (copy.deepcopy) before changing weights")
        if getattr(defense, "baseline", False) and _param_fingerprint(out.model) != before:
            raise HarnessError(f"defense {defense.name!r} declares baseline = True (it returns the model as it is) "
                               f"but returned other weights; a defense that changes the model is not a baseline")
        metrics: dict[str, Any] = {"reserve_size": len(reserve)}
        if out.report:
            metrics["report"] = _plain(out.report)
        return metrics, out.model

    def run_evaluate(self, job: EvaluateJob) -> tuple[dict, None]:
        train_job = self.jobs[job.train]
        evaluator = instance("evaluator", job.evaluator.name, job.evaluator.config)
        attack = self.attack(train_job)
        if attack is None:
            raise Skip("evaluators need an attacked model")
        _, test = self.data(train_job.data)
        if train_job.key not in self._poisoned_tests:
            self._poisoned_tests = {train_job.key: attack.poison_test(test)}  # jobs come grouped by attack
        poisoned_test = self._poisoned_tests[train_job.key]
        roles = {"backdoored": job.train, "purified": job.purified}
        # a baseline defense's model is the attacked one (run_purify checks its weights): one set of predictions
        baseline = self.jobs[job.purified].plugin
        model_of = {**roles, "purified": job.train if baseline is not None and baseline.baseline else job.purified}
        if job.clean:
            roles["clean"] = model_of["clean"] = job.clean
        clean_split, poisoned_split = SPLITS
        splits = {clean_split: test, poisoned_split: poisoned_test}
        index = {clean_split: torch.arange(len(test)),
                 poisoned_split: poisoned_test.meta.get("index", torch.full((len(poisoned_test),), -1))}
        # what fixes the trigger: the attacked model's job, and the checkpoints the attack's state comes from
        sources = [k for k in (train_job.prepare, train_job.key) if k]
        trigger = {"train": train_job.key, "state_sha256": [self.store.get(k).artifact_sha256 for k in sources]}

        def predict_fn(role: str, split: str) -> torch.Tensor:
            if role not in roles or split not in splits:
                known = sorted(roles) + (["clean (declare needs_clean_model)"] if "clean" not in roles else [])
                raise HarnessError(f"evaluator {evaluator.name!r} asked for predict({role!r}, {split!r}); the roles "
                                   f"are {', '.join(known)} and the splits {', '.join(SPLITS)}")
            key = model_of[role]
            pred, path = self.predictions.get(
                model_key=key, model_sha256=self.store.get(key).artifact_sha256, images=train_job.data, split=split,
                trigger=trigger if split == poisoned_split else None, index=index[split],
                num_classes=test.num_classes, model=partial(self.model, key), inputs=splits[split].images,
                device=self.device)
            self._read[f"{role}:{split}"] = path
            return pred

        train, _ = self.data(train_job.data)
        ctx = EvalContext(backdoored=self.model(job.train), purified=self.model(job.purified),
                          clean_test=test, poisoned_test=poisoned_test, attack=attack, device=self.device,
                          predict=predict_fn, clean_model=self.model(job.clean) if job.clean else None,
                          defended={name: self.model(key) for name, key in job.defended},
                          train=train, reserve=self.reserve(train, job), seed=job.seed,
                          generator=seed_everything(job.seed), fit=partial(self.fit, job))
        return check_metrics(evaluator, evaluator.evaluate(ctx)), None

    # -- one job ----------------------------------------------------------------

    def run_job(self, job: Job) -> JobRecord:
        """Run one job; its artifact is on disk when this returns. The record is the caller's to store."""
        rec = job_record(job, "running", device=device_name(self.device))
        t0 = time.perf_counter()
        self._read = {}
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
        except SystemExit as exc:  # a plugin calling sys.exit() fails its cell; it never ends the run
            rec.status = "failed"
            rec.error = (traceback.format_exc() + f"SystemExit({exc.code!r}) raised inside the job: a plugin must "
                         f"not call sys.exit() or exit(); raise an exception instead")
        rec.predictions = dict(sorted(self._read.items()))
        rec.finished, rec.wall_s = now(), time.perf_counter() - t0
        return rec
