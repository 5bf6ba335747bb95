"""Curve plots: a pure function of job records, like the tables.

Any evaluator metric declared as a curve (``Metric(curve=True)``) whose name
shares a prefix with a ``<prefix>_t`` grid (``lmc_t`` + ``lmc_asr``, ...) is
drawn per (data set, model, attack, metric), one line per defense, as PNG and
SVG; a curve belongs to the grid with the longest matching prefix
(``lmc_clean_to_purified_asr`` to ``lmc_clean_to_purified_t``, not ``lmc_t``). Seeds are
averaged point-wise.

Only a curve of finite numbers as long as its grid is drawn, and only seeds on the same grid are
averaged; anything else a record holds there is left out, never a crash. A plot's file name is
made of its metric, data set, model and attack, with any character but letters, digits, ``.``,
``_``, ``+`` and ``-`` replaced (and a short hash of the names added then, so two cells never share
a file); labels are drawn as plain text (no mathtext, no control characters).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from backdoor_harness.store import JobRecord

from .render import plain

#: what a plot's file name keeps as it is (anything else is replaced by ``_``)
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
#: the longest file name stem written (bytes): file systems take 255 with the extension
MAX_STEM = 200


def _typed(records: Iterable[Any]) -> list[JobRecord]:
    return [r if isinstance(r, JobRecord) else JobRecord.model_validate(r) for r in records]


def _numbers(value: Any) -> list[float] | None:
    """A recorded curve as floats: a non-empty list of finite numbers, else None."""
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    try:
        out = [float(v) for v in value]
    except OverflowError:
        return None
    return out if all(math.isfinite(v) for v in out) else None


def curves(records: Iterable[Any]) -> dict[tuple, dict[str, tuple[list[float], list[float]]]]:
    """``(dataset, model, attack, metric) -> {defense: (t, mean y)}``."""
    acc: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    grids: dict[tuple, list[float]] = {}
    for rec in _typed(records):
        if rec.kind != "evaluate" or rec.status != "done":
            continue
        a = rec.attrs
        m = {name: _numbers(v) for name, v in rec.metrics.items() if isinstance(v, list)}
        grid_names = [g for g in m if g.endswith("_t")]
        for name, ys in m.items():
            if name in grid_names or ys is None:
                continue
            owners = [g for g in grid_names if name.startswith(g[:-1])]
            grid = m[max(owners, key=len)] if owners else None
            if grid is None:
                continue
            key = (a.dataset, a.model, a.attack, name)
            # a seed on another grid (or a curve not as long as its grid) is not averaged with the first one
            if len(ys) != len(grid) or grids.setdefault(key + (a.defense,), grid) != grid:
                continue
            acc[key][a.defense].append(ys)
    return {key: {d: (grids[key + (d,)], np.mean(ys, axis=0).tolist()) for d, ys in by_def.items()}
            for key, by_def in acc.items()}


def write_curve_plots(records: Iterable[Any], folder: str | Path,
                      axis_labels: dict[str, str] | None = None) -> list[Path]:
    """Write one PNG and one SVG per curve group into ``folder``; returns the paths.

    ``axis_labels`` maps a metric name to its axis label (default: each curve metric's ``doc`` in
    the records' metric metadata, else the name).
    """
    records = _typed(records)
    labels = axis_labels if axis_labels is not None else {
        name: info.doc or name for rec in records for name, info in rec.metric_info.items() if info.curve}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for (dataset, model, attack, metric), by_def in curves(records).items():
        with plt.rc_context({"text.parse_math": False, "text.usetex": False}):
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for defense, (t, y) in by_def.items():
                name = plain(defense)  # (a legend hides a label that starts with "_")
                ax.plot(t, y, marker="o", markersize=3, label=" " + name if name.startswith("_") else name)
            grid = next((g for g in sorted(labels, key=len, reverse=True)
                         if g.endswith("_t") and metric.startswith(g[:-1])), None)
            ax.set_xlabel(plain(labels.get(grid, "t")))
            ax.set_ylabel(plain(metric))
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{plain(dataset)} / {plain(model)} / {plain(attack)}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
        stem = folder / file_stem(metric, dataset, model, attack)
        for ext in ("png", "svg"):  # via a private file and a rename: concurrent runs never mix two plots
            tmp = Path(f"{stem}.{os.getpid()}.tmp.{ext}")
            fig.savefig(tmp)
            tmp.replace(f"{stem}.{ext}")
            written.append(Path(f"{stem}.{ext}"))
        plt.close(fig)
    return written


def file_stem(*names: Any) -> str:
    """The file name (without extension) of a plot of these names: joined by ``-``, ``/`` as ``_``
    as ever; where any other character had to be replaced, or the name is too long, a hash of the
    names keeps it apart from every other."""
    joined = "-".join(str(n) for n in names).replace("/", "_")
    safe = _UNSAFE.sub("_", joined)
    if safe == joined and len(safe) <= MAX_STEM and not safe.startswith("."):
        return safe
    digest = hashlib.sha256("\0".join(repr(n) for n in names).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{safe.lstrip('.')[:MAX_STEM - 13]}-{digest}"
