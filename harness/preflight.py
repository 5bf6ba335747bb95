"""The preflight: every registered attack, defense and evaluator in one tiny job each, on the device at hand.

    python -m backdoor_harness.preflight --device cuda --budget-s 60 --out DIR
    harness preflight --device cpu --out DIR

Run it before any long GPU work: a bug that shows only on CUDA (say a CPU
``torch.Generator`` drawing into a CUDA tensor, which once cost a GPU run 18
jobs) then costs one minute of a lease, not a grid.

What runs: the harness's own run path (a :class:`~backdoor_harness.matrix.MatrixSpec`
built in memory, :func:`~backdoor_harness.matrix.expand`, a
:class:`~backdoor_harness.store.Store` in a temporary work directory, the
:class:`~backdoor_harness.handlers.JobRunner` and so the trainer's CUDA paths, bf16
autocast and channels_last, whenever the device is CUDA) on tiny inputs:

- data: 100 random uint8 32x32 training images and 50 test images in 10
  classes, made in memory (no download, nothing read from disk), carrying the
  CIFAR-10 source's augmentation; the defender's reserve is 2 images per class;
- model: ``tiny_cnn`` (width 8), recipe ``cpu-quick`` at one epoch;
- every plugin at :func:`quick_config`: each integer loop count (``epochs``,
  ``*_epochs``, ``rounds``, ``*_steps``, ``iterations``, ``*_iters``, ...) at 1,
  nested configs included, and a trigger generator at its narrowest.

Each attack runs its train job (after its prepare job, if it has one, and the
clean model that prepare needs); each defense purifies the model of the first
attack that passed (an oracle defense gets that attack); each evaluator
evaluates the pair of that model and the first defense that passed (with the
clean reference model when it asks for one). Plugins are found through the
registry only, in ``harness list`` order; nothing here names one.

Budget: no job starts once ``--budget-s`` seconds (default 60) have passed
since the start; the plugins left are reported ``skip`` (budget). A job already
running is not interrupted. On CUDA each job ends with a device synchronize, so
an asynchronous CUDA error is charged to the job that caused it. On the CPU the
run uses one thread (restored afterwards): for jobs this small more threads
only contend.

Exit status: 0 when every plugin (and the shared clean model) passed; 1 when
any failed or was skipped, each failure printed as one line ``FAIL <kind>
<name>: <ExceptionType>: <message>`` (its traceback in ``DIR/preflight.log``)
and each skip as ``SKIP <kind> <name>: <why>``; 2 on bad arguments (one line
on stderr). The last line printed is a one-line summary. ``DIR/preflight.json``
holds one entry per plugin (kind, name, status pass/fail/skip, seconds, error,
the labels of the jobs it ran), the shared clean reference model as kind
``core``, name ``clean_model``; ``DIR/preflight.log`` every job with its time.

On the CPU the run also audits devices (:class:`DeviceAudit`, ``--no-audit``
turns it off): the jobs run on the device ``cpu:0``, which the audit treats as
an accelerator, and a CPU generator drawing into a tensor that lives there
fails the job the way CUDA would. It catches CPU-generator draws into model
weights, into tensors moved with ``.to(device)`` or created with
``device=ctx.device``, and into anything computed from those; it cannot see a
draw whose ``device=`` comes from another tensor's ``.device`` (CPU tensors do
not keep the index), nor tensors of two devices mixed in one operation. The
GPU preflight catches those.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from pydantic import BaseModel
from torch.overrides import TorchFunctionMode

from .errors import HarnessError

#: The integer config fields that count loop iterations (a field is one when it is named so, or ends in
#: ``_<name>``): the preflight and the contract tests set them to 1.
BUDGET = ("epochs", "rounds", "iterations", "iters", "steps")

#: the preflight's tiny data set: images per class in the train and test sets, and in the defender's reserve
TRAIN_PER_CLASS, TEST_PER_CLASS, RESERVE_PER_CLASS, NUM_CLASSES, IMAGE_SIZE = 10, 5, 2, 10, 32
MODEL = {"name": "tiny_cnn", "kwargs": {"width": 8}}
RECIPE = {"base": "cpu-quick", "epochs": 1}
#: the device the CPU audit runs on: a CPU device with an index, which tensors created on it do not keep
AUDIT_DEVICE = torch.device("cpu", 0)

#: seconds after which no job starts (one minute of a GPU lease; on one CPU thread the run takes about 10 s)
DEFAULT_BUDGET_S = 60.0


def _shrunk(model: type[BaseModel], default: BaseModel | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    for k, f in model.model_fields.items():
        if f.annotation is int and any(k == b or k.endswith("_" + b) for b in BUDGET):
            cfg[k] = 1
        elif isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) and default is not None:
            inner = getattr(default, k, None)
            sub = _shrunk(f.annotation, inner if isinstance(inner, BaseModel) else None)
            if sub and isinstance(inner, BaseModel):  # the field's own default, with its loops shrunk
                cfg[k] = {**inner.model_dump(), **sub}
    if "generator_width" in model.model_fields:  # a trigger generator (BTI-DBF's U-Net by default) at its narrowest
        cfg["generator_width"] = 4
    return cfg


def quick_config(name: str, kind: str = "defense") -> dict[str, Any]:
    """A plugin at its smallest: every integer loop count (``epochs``, ``*_epochs``, ``rounds``,
    ``*_steps``, ``iterations``, ``*_iters``) set to 1, also inside nested configs (e.g. an
    evaluator's own retuning config), and ``generator_width`` (a trigger generator) set to 4."""
    from .registry import get_class

    cls = get_class(kind, name)
    try:
        default = cls.Config()
    except Exception:  # a config with required fields: its nested defaults are unknown
        default = None
    return _shrunk(cls.Config, default)


def synthetic_data(seed: int = 0) -> tuple[Any, Any]:
    """The preflight's train and test sets: random uint8 32x32 images, labels ``arange(n) % 10``,
    with the default augmentation (random crop and flip, so the trainer's crop and flip run)."""
    from .data import Augmentation, ImageSet

    g = torch.Generator().manual_seed(seed)
    classes = [str(i) for i in range(NUM_CLASSES)]
    augmentation = Augmentation()
    sets = []
    for per_class in (TRAIN_PER_CLASS, TEST_PER_CLASS):
        n = per_class * NUM_CLASSES
        images = torch.randint(0, 256, (n, 3, IMAGE_SIZE, IMAGE_SIZE), generator=g, dtype=torch.uint8)
        sets.append(ImageSet(images, torch.arange(n) % NUM_CLASSES, classes, augmentation=augmentation))
    return sets[0], sets[1]


def stand_in_dataset() -> str:
    """The data-set source the synthetic images stand in for: the first installed one that needs no
    options. Only its name and version enter the preflight's job keys; its files are never read."""
    from .errors import HarnessError
    from .registry import instance, names

    for name in names("dataset"):
        try:
            instance("dataset", name)
        except HarnessError:
            continue
        return name
    raise HarnessError("no installed data-set source works without options; the preflight needs one to "
                       "label its synthetic data (install backdoor-harness's built-in data sets)")


def tiny_spec(attack: dict, defense: dict | None = None, evaluator: dict | None = None):
    """A one-cell matrix on the synthetic data: ``attack`` x ``defense`` x ``evaluator`` (plugin refs
    ``{name, config}``; a missing defense or evaluator is filled with the first registered one, whose
    jobs are not run)."""
    from .matrix import MatrixSpec
    from .registry import names

    return MatrixSpec.model_validate({
        "name": "preflight",
        "datasets": [{"name": stand_in_dataset(), "label": "synthetic", "reserve_per_class": RESERVE_PER_CLASS}],
        "models": [MODEL], "attacks": [attack],
        "defenses": [defense or names("defense")[0]], "evaluators": [evaluator or names("evaluator")[0]],
        "recipe": RECIPE, "seeds": [0]})


# --------------------------------------------------------------------------
# The device audit (CPU)
# --------------------------------------------------------------------------


class DeviceAudit(TorchFunctionMode):
    """Treat ``device`` (a CPU device with an index, :data:`AUDIT_DEVICE`) as an accelerator and fail
    every draw of a CPU ``torch.Generator`` into a tensor that lives there, as CUDA does
    ("Expected a 'cuda' device type for generator but found 'cpu'").

    A tensor lives on the device when its storage came from ``.to(device)`` (so a module moved there),
    from a factory called with ``device=device``, or from an operation on such tensors (a copy, a
    view, a deep copy, an activation); ``.cpu()`` and ``.to("cpu")`` bring it back (as a copy, as
    CUDA would). A draw is a call with a ``generator=`` argument: an in-place method on a tensor
    there (``uniform_``, ``normal_``, ``nn.init.*``), a factory with ``device=device``, or a
    sampling function of tensors there (``bernoulli``, ``multinomial``, ``normal``). Findings are
    kept in ``violations`` and raised as ``RuntimeError``.

    Not seen: ``device=x.device`` (the index is not kept on CPU tensors, so the value reads
    ``cpu``) and operations mixing tensors of two devices; the GPU preflight sees those.
    """

    def __init__(self, device: torch.device = AUDIT_DEVICE):
        super().__init__()
        if device.type != "cpu" or device.index is None:
            raise HarnessError(f"DeviceAudit needs a CPU device with an index (e.g. cpu:0), got {device}")
        self.device = device
        self.violations: list[str] = []
        self.draws = 0  # draws from a CPU generator it checked
        self._there: dict[int, weakref.ref] = {}  # id(storage) -> storage (PyObject-preserved: lives as long)

    # -- where tensors live ------------------------------------------------------

    @staticmethod
    def _storage(t: torch.Tensor):
        try:
            s = t.untyped_storage()
        except Exception:  # sparse, nested or meta tensors carry no plain storage
            return None
        return s if s.nbytes() else None

    def lives_there(self, t: Any) -> bool:
        """Whether tensor ``t`` lives on the audited device."""
        if not isinstance(t, torch.Tensor):
            return False
        s = self._storage(t)
        ref = self._there.get(id(s)) if s is not None else None
        return ref is not None and ref() is s

    def _mark(self, out: Any) -> None:
        for t in _tensors(out):
            s = self._storage(t)
            if s is not None and id(s) not in self._there:
                key = id(s)
                self._there[key] = weakref.ref(s, lambda _, key=key: self._there.pop(key, None))

    def _is_here(self, device: Any) -> bool:
        if isinstance(device, (str, int)):
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError):
                return False
        return isinstance(device, torch.device) and device == self.device

    @staticmethod
    def _to_device(args: tuple, kwargs: dict) -> tuple[Any, bool]:
        """The device argument of ``Tensor.to(...)`` and whether one was given."""
        if "device" in kwargs:
            return kwargs["device"], True
        if len(args) > 1 and isinstance(args[1], (torch.device, str, int)) and not isinstance(args[1], bool):
            return args[1], True
        if len(args) > 1 and isinstance(args[1], torch.Tensor):  # .to(other): other's device
            return args[1], True
        return None, False

    # -- the mode ----------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gen = kwargs.get("generator")
        if isinstance(gen, torch.Generator) and gen.device.type == "cpu":
            self.draws += 1
            self._check_draw(func, args, kwargs)
        if func is torch.Tensor.to:
            return self._to(func, args, kwargs)
        if func is torch.Tensor.cpu:
            out = func(*args, **kwargs)
            return out.clone() if self.lives_there(out) else out  # a copy on the host, as from CUDA
        out = func(*args, **kwargs)
        if args and out is args[0]:  # in place (or returns self): where it lives does not change
            return out
        if kwargs.get("device") is not None:  # made where it says
            there = self._is_here(kwargs["device"])
        else:  # computed from tensors: where they live
            there = any(self.lives_there(t) for t in _tensors((args, kwargs)))
        if there:
            self._mark(out)
        return out

    def _to(self, func, args, kwargs):
        src = args[0]
        device, given = self._to_device(args, kwargs)
        if isinstance(device, torch.Tensor):
            there = self.lives_there(device)
        elif given:
            there = self._is_here(device)
        else:  # a dtype or memory-format change: stays where it is
            there = self.lives_there(src)
        if there and self.lives_there(src):  # already there: CUDA returns it (or a converted copy)
            if given:
                args, kwargs = _to_host(args, kwargs)
            out = func(*args, **kwargs)
            self._mark(out)
            return out
        out = func(*args, **kwargs)
        if there:
            if out is src or self._storage(out) is self._storage(src):  # never mark the tensor it came from
                out = out.clone()
            self._mark(out)
        elif self.lives_there(out):  # to the host: a copy, as from CUDA
            out = out.clone()
        return out

    def _check_draw(self, func, args, kwargs) -> None:
        name = getattr(func, "__name__", None) or repr(func)
        targets = list(_tensors((args, kwargs)))  # nn.init.* pass their tensor by keyword
        if self._is_here(kwargs.get("device")) or any(self.lives_there(t) for t in targets):
            msg = (f"device audit: {name} draws from a CPU torch.Generator into a tensor on the device "
                   f"({self.device}, standing in for CUDA, where this raises \"Expected a 'cuda' device type for "
                   f"generator but found 'cpu'\"); draw on the CPU and move the result, e.g. "
                   f"torch.rand(shape, generator=g).to(device)")
            self.violations.append(msg)
            raise RuntimeError(msg)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _to_host(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``Tensor.to``'s arguments with its device argument replaced by plain ``cpu`` (where the tensor
    really is): a no-op unless the dtype changes, as ``.to(device)`` of a tensor already there."""
    if "device" in kwargs:
        return args, {**kwargs, "device": "cpu"}
    if isinstance(args[1], torch.Tensor):  # .to(other, non_blocking, copy): other's device and dtype
        return (args[0], "cpu", args[1].dtype, *args[2:]), kwargs
    return (args[0], "cpu", *args[2:]), kwargs


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


@dataclass
class Outcome:
    """One plugin's (or the shared clean model's) result."""

    kind: str
    name: str
    status: str = "pass"  # pass | fail | skip
    seconds: float = 0.0
    error: str | None = None
    jobs: list[str] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "status": self.status, "seconds": round(self.seconds, 3),
                "error": self.error, "jobs": self.jobs}


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _runner_class():
    from .handlers import JobRunner

    class PreflightRunner(JobRunner):
        """The runner on the synthetic data, remembering the exception a job raised."""

        def __init__(self, store, device: torch.device, synthetic: tuple):
            super().__init__(store, {}, device, progress=False, compile=False)
            self.synthetic = synthetic
            self.last_exception: BaseException | None = None

        def data(self, spec: dict):
            return self.synthetic

        def _remember(self, method: Callable, job):
            try:
                return method(job)
            except Exception as exc:
                self.last_exception = exc
                raise

        def run_prepare(self, job):
            return self._remember(super().run_prepare, job)

        def run_train(self, job):
            return self._remember(super().run_train, job)

        def run_purify(self, job):
            return self._remember(super().run_purify, job)

        def run_evaluate(self, job):
            return self._remember(super().run_evaluate, job)

    return PreflightRunner


class Preflight:
    """One preflight run on ``device`` within ``budget_s`` seconds; ``log`` takes the log's lines."""

    def __init__(self, device: torch.device, budget_s: float, workdir: Path, log: Callable[[str], None],
                 say: Callable[[str], None] = print, started: float | None = None):
        from .store import Store

        self.device, self.budget_s, self.log, self.say = device, budget_s, log, say
        self.t0 = time.monotonic() if started is None else started
        self.store = Store(workdir)
        self.runner = _runner_class()(self.store, device, synthetic_data())
        self.outcomes: list[Outcome] = []
        self._clean: Outcome | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _over(self) -> bool:
        return self.elapsed() >= self.budget_s

    def _skip(self, out: Outcome, why: str) -> Outcome:
        out.status, out.error = "skip", why
        self.say(f"SKIP {out.kind} {out.name}: {why}")
        self.log(f"SKIP {out.kind} {out.name}: {why}")
        return out

    def _fail(self, out: Outcome, exc: BaseException | None, tb: str, where: str) -> Outcome:
        head = f"{type(exc).__name__}: {_one_line(str(exc))}" if exc is not None else _one_line(tb.splitlines()[-1])
        out.status, out.error = "fail", head
        self.say(f"FAIL {out.kind} {out.name}: {head}")
        self.log(f"FAIL {out.kind} {out.name} ({where}): {head}\n{tb.rstrip()}")
        return out

    def _run(self, out: Outcome, job) -> bool:
        """Run one job of ``out``'s plugin; False (with ``out`` failed or skipped) when it did not pass."""
        if self.store.is_final(job.key):
            return True
        old = self.store.get(job.key)
        if old is not None:  # it ran for another plugin and did not pass: not this plugin's failure
            self._skip(out, f"upstream {job.label} {old.status}")
            return False
        if self._over():
            self._skip(out, f"budget ({self.budget_s:g} s) spent before {job.kind} {job.label} could start")
            return False
        self.runner.jobs[job.key] = job
        self.runner.last_exception = None
        rec = self.runner.run_job(job)
        if rec.status == "done" and self.device.type == "cuda":
            try:  # an asynchronous CUDA error belongs to the job that launched it, not to the next one
                torch.cuda.synchronize(self.device)
            except Exception as exc:
                self.runner.last_exception = exc
                rec.status, rec.error = "failed", traceback.format_exc()
        self.store.put(rec)
        out.seconds += rec.wall_s or 0.0
        out.jobs.append(job.label)
        self.log(f"{rec.status:8s} {rec.wall_s:7.2f}s  {job.label}")
        if rec.status == "done":
            return True
        if rec.status == "skipped":
            self._skip(out, f"{job.kind} job skipped: {rec.error}")
        else:
            self._fail(out, self.runner.last_exception, rec.error or "", job.label)
        return False

    def _unit(self, kind: str, name: str, build: Callable[[], tuple[Any, dict]] | None,
              blocked: str = "") -> Outcome:
        """Run a plugin's target job (and its upstream jobs not run yet), or skip it (the budget is
        spent; no ``build``: ``blocked`` says why). The clean model, shared by several plugins, is
        its own outcome (``core clean_model``)."""
        out = Outcome(kind, name)
        self.outcomes.append(out)
        if self._over():
            return self._skip(out, f"budget ({self.budget_s:g} s) spent")
        if not build:
            return self._skip(out, blocked)
        try:
            target, jobs = build()
        except Exception as exc:  # its config does not validate, or expand() fails on it
            return self._fail(out, exc, traceback.format_exc(), "building its jobs")
        for job in _upstream(target, jobs):
            if job.kind == "train" and job.attack is None:  # the clean reference model
                if self._clean is None:
                    self._clean = Outcome("core", "clean_model")
                    self.outcomes.insert(len(self.outcomes) - 1, self._clean)
                    self._run(self._clean, job)
                if self._clean.status != "pass":
                    return self._skip(out, f"the clean model it needs did not pass ({self._clean.status})")
                continue
            if not self._run(out, job):
                return out
        self.log(f"PASS {kind} {name} ({out.seconds:.2f}s)")
        return out

    def run(self) -> list[Outcome]:
        from .matrix import expand
        from .registry import names

        def ref(kind: str, name: str) -> dict:
            return {"name": name, "config": quick_config(name, kind)}

        def build(kind: str, **refs) -> Callable[[], tuple[Any, dict]]:
            def make():
                jobs = {j.key: j for j in expand(tiny_spec(**refs))}
                if kind == "attack":
                    target = next(j for j in jobs.values() if j.kind == "train" and j.attack)
                else:
                    target = next(j for j in jobs.values() if j.kind == {"defense": "purify",
                                                                         "evaluator": "evaluate"}[kind])
                return target, jobs
            return make

        attacks = {name: self._unit("attack", name, build("attack", attack=ref("attack", name)))
                   for name in names("attack")}
        host = next((n for n, o in attacks.items() if o.status == "pass"), None)
        defenses = {}
        for name in names("defense"):
            defenses[name] = self._unit("defense", name, host and build(
                "defense", attack=ref("attack", host), defense=ref("defense", name)),
                "no attack passed: no attacked model to purify")
        row = next((n for n, o in defenses.items() if o.status == "pass"), None)
        for name in names("evaluator"):
            self._unit("evaluator", name, host and row and build(
                "evaluator", attack=ref("attack", host), defense=ref("defense", row),
                evaluator=ref("evaluator", name)), "no attack and defense passed: nothing to evaluate")
        return self.outcomes


def _upstream(target, jobs: dict) -> list:
    """``target`` and every job it depends on, upstream first."""
    order: list = []
    seen: set[str] = set()

    def visit(job) -> None:
        if job.key in seen:
            return
        seen.add(job.key)
        for dep in job.deps:
            visit(jobs[dep])
        order.append(job)

    visit(target)
    return order


# --------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------

USAGE = "--device {cpu,cuda[:N]} [--budget-s S] --out DIR [--no-audit]"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"preflight: error: {message} (usage: {self.prog} {USAGE})\n")


def build_parser(prog: str = "python -m backdoor_harness.preflight") -> argparse.ArgumentParser:
    """The preflight's arguments (``harness preflight`` and ``python -m backdoor_harness.preflight``)."""
    p = _Parser(prog=prog, description="Run every registered attack, defense and evaluator in one tiny job "
                                       "each on a device, within a wall-clock budget.")
    p.add_argument("--device", required=True, help="cuda, cuda:N or cpu")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"no job starts after this many seconds (default {DEFAULT_BUDGET_S:g})")
    p.add_argument("--out", required=True, help="folder for preflight.json and preflight.log (created)")
    p.add_argument("--no-audit", action="store_true",
                   help="on the CPU: run on plain cpu, without the device audit (see the preflight module's doc)")
    return p


def check_args(args: argparse.Namespace) -> tuple[torch.device, float, Path]:
    """The device, budget and output folder, or a HarnessError saying what is wrong."""
    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError):
        raise HarnessError(f"--device {args.device!r} is not a torch device; use cuda, cuda:N or cpu") from None
    if device.type not in ("cuda", "cpu"):
        raise HarnessError(f"--device {args.device!r}: the preflight runs on cuda or cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HarnessError(f"--device {args.device}: no CUDA device is visible here "
                               f"(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HarnessError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.index is not None:
        raise HarnessError(f"--device {args.device!r}: give the CPU as plain cpu")
    budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S
    if not 0 < budget < float("inf"):
        raise HarnessError(f"--budget-s {args.budget_s}: give a positive number of seconds")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise HarnessError(f"--out {out}: exists and is not a folder")
    return device, budget, out


def _execute(device: torch.device, run_device: torch.device, budget: float, log_path: Path, t0: float,
             audit: bool) -> tuple[str, list[Outcome], DeviceAudit | None]:
    from .handlers import device_name

    where = device_name(device)
    with open(log_path, "w") as log_file, tempfile.TemporaryDirectory(prefix="preflight-") as workdir:
        def log(line: str) -> None:
            log_file.write(line + "\n")
            log_file.flush()

        log(f"preflight on {device} ({where}); torch {torch.__version__}; budget {budget:g} s; "
            f"device audit {'on (jobs on ' + str(run_device) + ')' if audit else 'off'}")
        pre = Preflight(run_device, budget, Path(workdir), log, started=t0)
        auditor = DeviceAudit(run_device) if audit else None
        try:
            if auditor is not None:
                with auditor:
                    outcomes = pre.run()
                log(f"device audit: {auditor.draws} draws from CPU generators checked, "
                    f"{len(auditor.violations)} into tensors on the device")
            else:
                outcomes = pre.run()
        finally:
            pre.store.close()
    return where, outcomes, auditor


def run(args: argparse.Namespace) -> int:
    """Run the preflight of parsed arguments; the exit status (0 all passed, 1 not, 2 bad arguments)."""
    t0 = time.monotonic()
    try:
        device, budget, out_dir = check_args(args)
    except HarnessError as err:
        print(f"preflight: error: {err}", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    audit = device.type == "cpu" and not args.no_audit
    run_device = AUDIT_DEVICE if audit else device
    threads = torch.get_num_threads()
    if device.type == "cpu":  # tiny jobs: more threads only contend (3-5x slower on 2 busy cores)
        torch.set_num_threads(1)
    try:
        where, outcomes, auditor = _execute(device, run_device, budget, out_dir / "preflight.log", t0, audit)
    finally:
        torch.set_num_threads(threads)
    wall = time.monotonic() - t0
    counts = {s: sum(o.status == s for o in outcomes) for s in ("pass", "fail", "skip")}
    budget_skips = sum(o.status == "skip" and (o.error or "").startswith("budget") for o in outcomes)
    report = {"device": str(device), "device_name": where, "torch": torch.__version__, "budget_s": budget,
              "wall_s": round(wall, 3), "counts": counts,
              "device_audit": None if auditor is None else {"device": str(run_device), "draws_checked": auditor.draws,
                                                            "violations": auditor.violations},
              "plugins": [o.json() for o in outcomes]}
    (out_dir / "preflight.json").write_text(json.dumps(report, indent=2) + "\n")
    ok = counts["fail"] == 0 and counts["skip"] == 0
    skip_note = f" ({budget_skips} for the budget)" if budget_skips else ""
    summary = (f"preflight {'PASSED' if ok else 'FAILED'} on {device} ({where}): {len(outcomes)} checks, "
               f"{counts['pass']} pass, {counts['fail']} fail, {counts['skip']} skip{skip_note} in {wall:.1f} s "
               f"(budget {budget:g} s); {out_dir / 'preflight.json'}")
    with open(out_dir / "preflight.log", "a") as log_file:
        log_file.write(summary + "\n")
    print(summary)
    return 0 if ok else 1


def main(argv: list[str] | None = None, prog: str = "python -m backdoor_harness.preflight") -> int:
    return run(build_parser(prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
