"""Re-run to verify: ``harness verify FILE --sample N`` re-computes randomly chosen evaluations of a
submission on this machine and compares them with the submitted numbers; ``harness leaderboard
--add FILE --verify N`` does it before accepting, and records the cells that held.

What is re-run
    ``N`` evaluate records of the submission, drawn with ``random.Random(seed).sample`` over their
    keys in sorted order (``--seed``; by default an unpredictable one, printed so that the draw can
    be repeated: a fixed default would tell a submitter which cells are never checked). For each,
    the harness rebuilds the typed job the record names from the published matrices (its config,
    seed and plugin versions are the record's: ``--add``'s checks make them so) and every job
    upstream of it (prepare, train, purify, the clean reference and other defenses an evaluator
    asks for), and runs them from scratch in a fresh work directory with the scheduler and the
    installed plugins, on ``--device``. Nothing of the submission but its numbers is used.
Tolerance per metric
    A re-run of the same seed differs from the claim only by floating-point nondeterminism (another
    device, another library build), which perturbs training as a change of seed does at most. So a
    metric may differ by the seed-to-seed spread a golden file measured for that very job's value (its
    absolute check's ``delta``, or the spread of its paired check's per-seed values added to its
    baseline's, when the job's key is in a golden file's matrix at a measured seed), and at
    least by :data:`~backdoor_harness.golden.MIN_DELTA` (0.01: one point of a rate), the floor
    golden checks use. A metric that is not a rate (``percent: false``: a count, a loss, an
    interpolation coefficient) gets that floor relative to its size: ``MIN_DELTA * max(1, |claim|)``.
    Curves are compared point by point. A claimed metric the re-run does not produce, or the
    reverse, is a mismatch; so is a re-run that fails.
Verified cells
    ``--add --verify N`` writes, beside the records file it appends to, ``<name>.verified.json``
    (e.g. ``leaderboard/records/submissions.verified.json``): a JSON object mapping each verified
    evaluate key to ``{label, claimed, rerun, tolerance, device, date, harness_version, seed}``
    (``claimed``, ``rerun``, ``tolerance``: metric -> value). Only cells whose every metric held are
    written; a mismatch refuses the whole submission.
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import HarnessError
from .golden import MIN_DELTA
from .jobs import EvaluateJob, Job
from .store import JobRecord, Metric

#: what ``--add --verify`` writes beside a records file ``<name>.jsonl``
VERIFIED_SUFFIX = ".verified.json"


@dataclass
class MetricCheck:
    """One metric of a re-run cell: the claim, the re-run's value, the tolerance, and whether it held."""

    name: str
    claimed: Any
    rerun: Any
    tolerance: float
    ok: bool


@dataclass
class CellCheck:
    """One re-run evaluation: its key and label, how the re-run ended, and each metric's check."""

    key: str
    label: str
    status: str
    reason: str = ""
    metrics: list[MetricCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "done" and bool(self.metrics) and all(m.ok for m in self.metrics)


@dataclass
class Verification:
    """The outcome of re-running a sample of a submission's evaluations."""

    path: Path
    seed: int
    device: str
    cells: list[CellCheck]
    date: str

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cells)

    def mismatches(self) -> list[str]:
        """One line per cell or metric that did not hold."""
        out = []
        for c in self.cells:
            if c.status != "done":
                out.append(f"{c.label}: the re-run is {c.status} ({c.reason})")
            out += [f"{c.label}: {m.name}: claimed {_fmt(m.claimed)}, re-run {_fmt(m.rerun)} "
                    f"(tolerance {m.tolerance:.4g})" for m in c.metrics if not m.ok]
        return out

    def table(self) -> str:
        """Every re-run metric: cell, metric, claimed, re-run, tolerance, verdict."""
        from tabulate import tabulate

        rows = []
        for c in self.cells:
            if c.status != "done":
                rows.append([c.label, "-", "-", c.status, "-", "MISMATCH"])
            rows += [[c.label, m.name, _fmt(m.claimed), _fmt(m.rerun), f"{m.tolerance:.4g}",
                      "ok" if m.ok else "MISMATCH"] for m in c.metrics]
        return tabulate(rows, headers=["cell", "metric", "claimed", "re-run", "tolerance", "verdict"],
                        tablefmt="simple")


def _fmt(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.4f}" for v in value[:4]) + (", ..." if len(value) > 4 else "") + "]"
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def tolerance(info: Metric | None, claimed: Any, golden_delta: float | None = None) -> float:
    """How far a re-run value of a metric may be from its claim (see the module's doc)."""
    floor = MIN_DELTA
    if info is not None and not info.percent:
        values = claimed if isinstance(claimed, list) else [claimed]
        size = max((abs(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)), default=1.0)
        floor = MIN_DELTA * max(1.0, size)
    return max(floor, golden_delta or 0.0)


def _close(claimed: Any, rerun: Any, tol: float) -> bool:
    if claimed is None or rerun is None:
        return False
    a = claimed if isinstance(claimed, list) else [claimed]
    b = rerun if isinstance(rerun, list) else [rerun]
    return (isinstance(claimed, list) == isinstance(rerun, list) and len(a) == len(b)
            and all(abs(float(x) - float(y)) <= tol for x, y in zip(a, b)))


def compare(job: EvaluateJob, claimed: JobRecord, rerun: JobRecord | None,
            golden: dict[str, float] | None = None) -> CellCheck:
    """The re-run record of ``job`` against the ``claimed`` one (``golden``: metric -> golden delta)."""
    if rerun is None or rerun.status != "done":
        reason = ((rerun.error or "").strip().splitlines() or [""])[-1] if rerun is not None else "not run"
        return CellCheck(job.key, job.label, rerun.status if rerun is not None else "missing", reason)
    checks = []
    for name in sorted(set(claimed.metrics) | set(rerun.metrics)):
        c, r = claimed.metrics.get(name), rerun.metrics.get(name)
        tol = tolerance(job.metrics.get(name), c, (golden or {}).get(name))
        checks.append(MetricCheck(name, c, r, tol, _close(c, r, tol)))
    return CellCheck(job.key, job.label, "done", metrics=checks)


def upstream_closure(keys: list[str], jobs: dict[str, Job]) -> list[Job]:
    """The jobs ``keys`` name and every job upstream of them, in the published order (upstream first)."""
    need, stack = set(), list(keys)
    while stack:
        key = stack.pop()
        if key not in need:
            need.add(key)
            stack += jobs[key].deps
    return [job for key, job in jobs.items() if key in need]


def golden_deltas(paths: list[Path], keys: set[str], log: Callable[[str], Any] = print) -> dict[str, dict[str, float]]:
    """Evaluate key -> metric -> the seed-to-seed spread of the value a golden file measured for that
    job (:func:`~backdoor_harness.golden.value_spreads`: an absolute check's ``delta``, or the spread
    a paired check's values give back with its baseline's), from the golden files ``paths`` (their
    matrices expanded at each measured seed). A file that cannot be read is skipped
    with a note: its jobs then get the floor tolerance, never a looser one."""
    from .golden import golden_spec, load_golden, value_spreads
    from .matrix import expand

    out: dict[str, dict[str, float]] = {}
    for path in paths:
        try:
            doc = load_golden(path)
            spreads = value_spreads(doc)
            for seed in doc.get("seeds_measured") or []:
                for job in expand(golden_spec(doc, seed)):
                    if job.key not in keys or not isinstance(job, EvaluateJob):
                        continue
                    cell = job.cell
                    folded = (lambda m: m) if cell.evaluator == job.evaluator.name else (
                        lambda m, label=cell.evaluator: f"{m}@{label}")
                    for m in job.metrics:
                        spread = spreads.get((cell.dataset, cell.model, cell.attack, cell.defense, folded(m)))
                        if spread is not None:
                            out.setdefault(job.key, {})[m] = spread
        except (HarnessError, KeyError, TypeError, ValueError) as err:
            log(f"golden file {path} not used for tolerances ({str(err).splitlines()[0]})")
    return out


def _device(device: str | None):
    import torch

    from .train import default_device

    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise HarnessError(f"--device {device!r}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"--device {device}: no CUDA device here; verify on a GPU machine or with --device cpu")
    return dev


def rerun(jobs: list[Job], workdir: Path, device: str | None = None, log: Callable[[str], Any] = print
          ) -> dict[str, JobRecord]:
    """Run ``jobs`` (upstream first) from scratch in ``workdir`` with the scheduler; their records by key."""
    from .executor import InProcess
    from .handlers import JobRunner
    from .scheduler import schedule
    from .store import RunLease, Store

    dev = _device(device)
    by_key = {j.key: j for j in jobs}
    counts = {"cached": 0, "done": 0, "failed": 0, "skipped": 0, "blocked": 0}
    with RunLease(workdir) as lease:
        store = Store(workdir)
        try:
            pool = InProcess(JobRunner(store, by_key, dev, progress=False))
            try:
                schedule(jobs, store, pool, counts, log, lease.id)
            finally:
                pool.close()
                store.release_all(lease.id)
            return {k: rec for k in by_key if (rec := store.get(k)) is not None}
        finally:
            store.close()


def verify_checked(checked, sample: int, seed: int | None = None, device: str | None = None,
                   workdir: str | Path | None = None, golden: list[Path] | None = None,
                   log: Callable[[str], Any] = print) -> Verification:
    """Re-run ``sample`` evaluations of a submission that passed ``--add``'s checks
    (:class:`backdoor_harness.submission.Checked`) and compare them with its claims."""
    from .handlers import device_name

    if sample < 1:
        raise HarnessError(f"--sample {sample}: re-run at least one evaluation")
    claims = {r.key: r for r in checked.records if r.kind == "evaluate"}
    if not claims:
        raise HarnessError(f"{checked.path}: no evaluations in it to re-run")
    seed = secrets.randbelow(2 ** 32) if seed is None else seed
    picked = random.Random(seed).sample(sorted(claims), min(sample, len(claims)))
    log(f"verifying {len(picked)} of {len(claims)} evaluations of {checked.path} (--seed {seed})")
    jobs = upstream_closure(picked, checked.jobs)
    if golden is None:
        folder = checked.folder.parent.parent / "tests" / "golden"
        golden = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    deltas = golden_deltas(golden, set(picked), log)
    dev = _device(device)
    with tempfile.TemporaryDirectory(prefix="harness-verify-") as tmp:
        where = Path(workdir) if workdir is not None else Path(tmp)
        records = rerun(jobs, where, str(dev), log)
    cells = [compare(checked.jobs[k], claims[k], records.get(k), deltas.get(k)) for k in picked]
    return Verification(checked.path, seed, device_name(dev), cells, _dt.date.today().isoformat())


def verified_path(records_file: str | Path) -> Path:
    """The verification file beside a records file: ``<name>.jsonl`` -> ``<name>.verified.json``."""
    records_file = Path(records_file)
    return records_file.with_name(records_file.with_suffix("").name + VERIFIED_SUFFIX)


def load_verified(records_file: str | Path) -> dict[str, dict[str, Any]]:
    """The verified cells recorded beside a records file (evaluate key -> entry; empty: none)."""
    path = verified_path(records_file)
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HarnessError(f"{path}: not JSON ({err}); restore it from git") from None
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise HarnessError(f"{path}: not a mapping of evaluate keys to verifications; restore it from git")
    return doc
