"""Run the timing benchmarks with a stored baseline per machine and device (``make bench``).

Baselines live in ``benchmarks/baselines/<device slug>/<python id>/NNNN_<name>.json``
(pytest-benchmark's file storage; the python id, e.g. ``Linux-CPython-3.11-64bit``,
is pytest-benchmark's own machine id). Every run is compared against the latest
baseline of this device when one exists; a device's first run is saved as its
baseline. ``--save [NAME]`` saves this run as a new baseline (NAME default:
pytest-benchmark's autosave name, commit id and date).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/run.py [--save [NAME]] [--no-compare] [-- PYTEST ARGS]

Arguments after ``--`` go to pytest, e.g. ``-- -k train`` or
``-- --benchmark-compare-fail=median:25%``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import machine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: Short runs: 3 rounds at least, fast functions repeated for at most 0.5 s.
TIMING = ["--benchmark-min-rounds=3", "--benchmark-max-time=0.5",
          "--benchmark-columns=min,max,mean,stddev,median,rounds"]


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--save", nargs="?", const="", default=None, metavar="NAME",
                    help="save this run as a new baseline (NAME: default pytest-benchmark's autosave name)")
    ap.add_argument("--no-compare", action="store_true", help="do not compare with the latest baseline")
    return ap.parse_args(own), extra


def python_id() -> str:
    """pytest-benchmark's machine id (``Linux-CPython-3.11-64bit``): its sub-folder of the storage."""
    from pytest_benchmark.utils import get_machine_id

    return get_machine_id()


def latest_baseline(storage: Path) -> Path | None:
    """The newest ``NNNN_*.json`` of this python id in ``storage`` (what ``--benchmark-compare`` loads)."""
    files = sorted((storage / python_id()).glob("[0-9][0-9][0-9][0-9]_*.json"))
    return files[-1] if files else None


def storage_args(storage: Path, save: str | None, compare: bool) -> list[str]:
    """Storage, compare and save options; prints what is compared and where it is saved."""
    args = [f"--benchmark-storage={storage.relative_to(ROOT)}"]  # relative: no absolute path in the JSON
    latest = latest_baseline(storage)
    if compare and latest is not None:
        print(f"comparing with: {latest.relative_to(ROOT)}")
        args.append(f"--benchmark-compare={latest.name.split('_', 1)[0]}")
    elif compare:
        print("comparing with: nothing (no baseline of this device yet); saving this run as its first baseline")
        save = "" if save is None else save
    if save is not None:
        print(f"saving to:      {storage.relative_to(ROOT)}/{python_id()}/")
        args.append(f"--benchmark-save={save}" if save else "--benchmark-autosave")
    return args


def main(argv: list[str]) -> int:
    opts, extra = parse(argv)
    dev = machine.device()
    name = machine.device_name(dev)
    storage = HERE / "baselines" / machine.slug(name)
    print(f"device:         {name}")
    print(f"storage:        {storage.relative_to(ROOT)}")
    cmd = [sys.executable, "-m", "pytest", str(HERE / "test_timing.py"), "-q", "-p", "no:cacheprovider",
           "--benchmark-enable", "--benchmark-only", *TIMING,
           *storage_args(storage, opts.save, not opts.no_compare), *extra]
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
