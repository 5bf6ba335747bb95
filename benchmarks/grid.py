"""Aggregate training images/s of a real grid with k jobs per GPU, for several k.

    python benchmarks/grid.py                              # GPU: PreAct-ResNet-18, k = 1 2 4
    python benchmarks/grid.py --k 1 2 4 8 --compile        # through torch.compile (default mode)
    python benchmarks/grid.py --model tiny_cnn --per-class 20 --test-per-class 5 --reserve-per-class 5 \\
        --epochs 1 --defense-epochs 1 --seeds 1 --k 1 2   # a CPU smoke run (tests/core/test_benchmarks_smoke.py)

The grid is a matrix run through ``harness run``'s own path (``run_matrix`` with
``workers=k``: k worker processes per GPU, each taking the next job that is
ready; k = 1 runs the jobs in this process, as ``harness run`` does): CIFAR-10,
``--model``, BadNets and Blended at 10% poisoning, ``--seeds`` seeds (each seed
its own attacked models: 2 x seeds train jobs can run side by side), the
defenses none, FT and EP (``--defense-epochs`` each on the 5% reserve), and
``clean_acc`` and ``asr``; the recipe is BackdoorBench's at ``--epochs`` epochs
and ``--batch``, its lr 0.01 at batch 128 scaled linearly to the batch size
(the recipe's ``lr_scale``). Each k runs the whole grid afresh in
``WORKDIR/k<k>`` (removed first: nothing is cached).

Reported per k: the jobs, the wall time of the whole run (worker start-up,
every job, purification and evaluation included), the training images of the
train jobs (epochs x images, from their records), the aggregate images/s (those
images / the wall time: what a grid gets out of the GPU), the same over the
train phase only (first train job's start to the last one's end), the peak
memory of one job (the largest ``peak_mem_mib`` of the train records: torch's
allocation in that worker) and of the whole GPU (``nvidia-smi``'s memory.used
sampled every 0.5 s: every worker's CUDA context and cache included), and
whether issue 16's target (>= 50,000 images/s aggregate) is met.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from tabulate import tabulate

import machine
from backdoor_harness.errors import HarnessError
from backdoor_harness.matrix import MatrixSpec, expand
from backdoor_harness.scheduler import run_matrix
from backdoor_harness.store import Store

#: issue 16's target: aggregate images/s of a grid on one GPU
TARGET_IMAGES_S = 50_000


def spec(args: argparse.Namespace) -> MatrixSpec:
    data = {"name": "cifar10"}
    for field, value in (("train_per_class", args.per_class), ("test_per_class", args.test_per_class),
                         ("reserve_per_class", args.reserve_per_class)):
        if value:
            data[field] = value
    return MatrixSpec.model_validate({
        "name": "grid-bench", "datasets": [data], "models": [args.model],
        "attacks": [{"name": "badnets", "config": {"poison_rate": 0.1}},
                    {"name": "blended", "config": {"poison_rate": 0.1}}],
        "defenses": ["none", {"name": "ft", "config": {"epochs": args.defense_epochs}},
                     {"name": "ep", "config": {"epochs": args.defense_epochs}}],
        "evaluators": ["clean_acc", "asr"], "seeds": list(range(args.seeds)),
        "recipe": {"base": "backdoorbench", "epochs": args.epochs, "batch_size": args.batch, "lr": 0.01,
                   "lr_scale": "linear", "lr_ref_batch": 128}})


class GpuMemory:
    """Peak of ``nvidia-smi``'s memory.used (MiB, summed over the GPUs) while the block runs; ``None``
    without CUDA or nvidia-smi."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak, self._stop = cuda and shutil.which("nvidia-smi") is not None, None, threading.Event()

    @staticmethod
    def used() -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return sum(int(v) for v in out.split())
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def _sample(self) -> None:
        while True:
            used = self.used()
            if used is not None:
                self.peak = max(self.peak or 0, used)
            if self._stop.wait(0.5):
                return

    def __enter__(self) -> "GpuMemory":
        if self.cuda:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._stop.set()
            self._thread.join()


def fresh(workdir: Path) -> Path:
    """``workdir``, emptied: removed first when it is a harness work directory of an earlier run."""
    if workdir.exists():
        if not (workdir / "results.sqlite").exists() and any(workdir.iterdir()):
            raise SystemExit(f"{workdir} exists and is not a harness work directory; give another --workdir")
        shutil.rmtree(workdir)
    return workdir


def measure(grid: MatrixSpec, workdir: Path, k: int, device: str | None, log) -> dict:
    """One run of ``grid`` with ``k`` jobs per GPU; its row (see the module docstring)."""
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    with GpuMemory(cuda) as gpu:
        t0 = time.perf_counter()
        counts = run_matrix(grid, workdir, device=device, progress=False, workers=k, log=log)
        wall = time.perf_counter() - t0
    store = Store(workdir)
    recs = [r for r in (store.get(j.key) for j in expand(grid)) if r is not None]
    store.close()
    train = [r for r in recs if r.kind == "train" and r.status == "done"]
    images = sum(round(r.metrics["images_per_s"] * r.metrics["wall_s"]) for r in train)
    span = (max(r.finished for r in train) - min(r.started for r in train)) if train else float("nan")
    mems = [r.metrics["peak_mem_mib"] for r in train if "peak_mem_mib" in r.metrics]
    return {"k": k, "jobs": len(recs), "failed": counts["failed"] + counts["blocked"], "wall": wall,
            "images": images, "ips": images / wall, "train_ips": images / span if span > 0 else float("nan"),
            "job_mib": max(mems) if mems else None, "gpu_mib": gpu.peak}


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/core/test_queue.py parses the GPU queue's commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="jobs per GPU to try (default 1 2 4)")
    parser.add_argument("--model", default="preact_resnet18")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each attacked model (default 2)")
    parser.add_argument("--batch", type=int, default=512, help="batch size (default 512; lr scaled linearly)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds: 2 x seeds train jobs (default 4)")
    parser.add_argument("--defense-epochs", type=int, default=5, help="epochs of FT and EP (default 5)")
    parser.add_argument("--per-class", type=int, help="training images per class (default: all 5,000)")
    parser.add_argument("--test-per-class", type=int, help="test images per class (default: all 1,000)")
    parser.add_argument("--reserve-per-class", type=int, help="reserve images per class (default: 5%% of train)")
    parser.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                        help="train through torch.compile in MODE (default without MODE)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--workdir", default="runs/grid-bench", help="each k runs in WORKDIR/k<k>")
    parser.add_argument("--quiet", action="store_true", help="no job log on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.k) < 1:
        parser.error("--k: at least 1 job per GPU")
    try:
        mode = machine.use_compile(args.compile)
    except HarnessError as err:
        parser.error(str(err))
    grid = spec(args)
    dev = torch.device(args.device) if args.device else machine.device()
    name = machine.device_name(dev)
    n_jobs = len(expand(grid))
    print(f"device {name}, torch {torch.__version__}; grid: {args.model}, BadNets + Blended x {args.seeds} seed(s), "
          f"none / FT / EP ({args.defense_epochs} epochs), {args.epochs} epoch(s) at batch {args.batch} "
          f"(lr {grid.recipe.effective_lr:g}), {n_jobs} jobs; torch.compile: {mode or 'off'}", flush=True)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    rows = []
    for k in args.k:
        row = measure(grid, fresh(Path(args.workdir) / f"k{k}"), k, args.device, log)
        rows.append(row)
        if row["failed"]:
            print(f"k={k}: {row['failed']} job(s) failed or blocked; see `harness status --workdir "
                  f"{Path(args.workdir) / f'k{k}'}`", file=sys.stderr)
            return 1
    met = {True: "met", False: "NOT met"}
    mib = lambda v: f"{v:,}" if v is not None else "-"  # noqa: E731
    print()
    print(tabulate([[r["k"], r["jobs"], f"{r['wall']:.1f}", f"{r['images']:,}", f"{r['ips']:,.0f}",
                     f"{r['train_ips']:,.0f}", mib(r["job_mib"]), mib(r["gpu_mib"]),
                     met[r["ips"] >= TARGET_IMAGES_S]] for r in rows],
                   headers=["k (jobs per GPU)", "jobs", "wall s", "train images", "images/s (aggregate)",
                            "images/s (train phase)", "peak MiB (one job)", "peak MiB (GPU, nvidia-smi)",
                            f">= {TARGET_IMAGES_S:,} images/s"],
                   tablefmt="github", disable_numparse=True))
    best = max(rows, key=lambda r: r["ips"])
    print(f"\ntarget (issue 16; aggregate images/s over a grid, on {name}): >= {TARGET_IMAGES_S:,} images/s: "
          f"{met[best['ips'] >= TARGET_IMAGES_S]} (best: k={best['k']}, {best['ips']:,.0f} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
