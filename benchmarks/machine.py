"""The device the benchmarks time on, its name, and the slug that names its baseline folder.

CUDA when available, else the CPU. The CPU's name carries the architecture, the
CPU model and torch's thread count (``OMP_NUM_THREADS``), since timings taken
with a different thread count are not comparable; a GPU's name is
``torch.cuda.get_device_name()``.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else ``platform.processor()``; may be empty)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def device_name(dev: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3``-style for CUDA; ``cpu-x86_64-AMD EPYC-1threads`` for the CPU."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    parts = ["cpu", platform.machine(), cpu_model(), f"{torch.get_num_threads()}threads"]
    return "-".join(p for p in parts if p)


def slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``: a folder name."""
    return re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-")


def sync(dev: torch.device) -> None:
    """Wait for queued GPU work, so a timer around the call measures it (no-op on the CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def use_compile(mode: str | bool | None) -> str | None:
    """Train the harness runs of this process, and of the workers it starts, through
    ``torch.compile`` in ``mode`` (``None``/``False``: not at all), as ``harness run --compile MODE``
    does (:func:`backdoor_harness.train.export_compile_mode`; the job runner reads it back, tested in
    tests/core/test_recipe.py). Returns the mode."""
    from backdoor_harness.train import export_compile_mode

    return export_compile_mode(mode)
