"""Scheduling overhead: 200 trivial jobs with the local executor, in this process and with 2 workers.

Each job is tiny (tiny_cnn of width 4, 20 training images, one optimizer
step; purify and evaluate jobs just as small), so a run's wall time is mostly
the harness: the DAG walk, the store, loading and saving checkpoints, and for
the worker pool, process start-up and the queues. Reported per executor:
wall seconds, the sum of the jobs' own wall seconds, the overhead per job
((wall - sum) / jobs; negative when workers overlap jobs), and the speed-up of
2 workers over one process.

Usage (prints a table)::

    OMP_NUM_THREADS=1 python benchmarks/scheduler.py

Run it on an otherwise idle machine: the numbers are wall times.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from backdoor_harness.matrix import MatrixSpec, expand
from backdoor_harness.scheduler import run_matrix
from backdoor_harness.store import Store

#: 7 jobs per seed (1 train, 2 purify, 4 evaluate); 29 seeds: 203 jobs
SEEDS = 29


def spec(seeds: int = SEEDS) -> MatrixSpec:
    return MatrixSpec.model_validate({
        "name": "scheduler-bench",
        "datasets": [{"name": "cifar10", "train_per_class": 2, "test_per_class": 2}],
        "models": [{"name": "tiny_cnn", "kwargs": {"width": 4}}],
        "attacks": [{"name": "badnets", "config": {"stamp": "after_augment"}}],
        "defenses": ["none", {"name": "ft", "config": {"epochs": 1}}],
        "evaluators": ["clean_acc", "asr"],
        "seeds": list(range(seeds)),
        "recipe": {"base": "cpu-quick", "epochs": 1},
    })


def measure(workers: int, root: Path) -> dict:
    workdir = root / f"w{workers}"
    t0 = time.perf_counter()
    counts = run_matrix(spec(), workdir, device="cpu", progress=False, log=lambda *a: None, workers=workers)
    wall = time.perf_counter() - t0
    store = Store(workdir)
    jobs = sum(r.wall_s or 0.0 for r in store.records())
    store.close()
    n = counts["done"]
    return {"executor": "this process" if workers == 1 else f"{workers} workers", "jobs": n, "wall_s": wall,
            "jobs_s": jobs, "overhead_ms": 1000 * (wall - jobs) / n}


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="scheduler-bench-"))
    try:
        print(f"{len(expand(spec()))} jobs per run", file=sys.stderr)
        rows = [measure(1, root), measure(2, root)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    speedup = rows[0]["wall_s"] / rows[1]["wall_s"]
    print(tabulate([[r["executor"], r["jobs"], f"{r['wall_s']:.1f}", f"{r['jobs_s']:.1f}",
                     f"{r['overhead_ms']:.0f}"] for r in rows],
                   headers=["executor", "jobs", "wall s", "sum of job wall s", "overhead per job (ms)"]))
    print(f"speed-up of 2 workers over one process: {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
