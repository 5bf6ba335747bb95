"""Curve plots: a pure function of job records, like the tables.

Any evaluator metric declared as a curve (``Metric(curve=True)``) whose name
shares a prefix with a ``<prefix>_t`` grid (``lmc_t`` + ``lmc_asr``, ...) is
drawn per (data set, model, attack, metric), one line per defense, as PNG and
SVG; a curve belongs to the grid with the longest matching prefix
(``lmc_clean_to_purified_asr`` to ``lmc_clean_to_purified_t``, not ``lmc_t``). Seeds are
averaged point-wise.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from backdoor_harness.store import JobRecord


def _typed(records: Iterable[Any]) -> list[JobRecord]:
    return [r if isinstance(r, JobRecord) else JobRecord.model_validate(r) for r in records]


def curves(records: Iterable[Any]) -> dict[tuple, dict[str, tuple[list[float], list[float]]]]:
    """``(dataset, model, attack, metric) -> {defense: (t, mean y)}``."""
    acc: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    grids: dict[tuple, list[float]] = {}
    for rec in _typed(records):
        if rec.kind != "evaluate" or rec.status != "done":
            continue
        a, m = rec.attrs, rec.metrics
        grid_names = [g for g, v in m.items() if g.endswith("_t") and isinstance(v, list)]
        for name, ys in m.items():
            if name in grid_names or not isinstance(ys, list):
                continue
            owners = [g for g in grid_names if name.startswith(g[:-1])]
            if not owners:
                continue
            grid = m[max(owners, key=len)]
            if len(ys) != len(grid):
                continue
            key = (a.dataset, a.model, a.attack, name)
            acc[key][a.defense].append(ys)
            grids[key + (a.defense,)] = grid
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
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for defense, (t, y) in by_def.items():
            ax.plot(t, y, marker="o", markersize=3, label=defense)
        grid = next((g for g in sorted(labels, key=len, reverse=True)
                     if g.endswith("_t") and metric.startswith(g[:-1])), None)
        ax.set_xlabel(labels.get(grid, "t"))
        ax.set_ylabel(metric)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{dataset} / {model} / {attack}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        stem = folder / f"{metric}-{dataset}-{model}-{attack}".replace("/", "_")
        for ext in ("png", "svg"):  # via a private file and a rename: concurrent runs never mix two plots
            tmp = Path(f"{stem}.{os.getpid()}.tmp.{ext}")
            fig.savefig(tmp)
            tmp.replace(f"{stem}.{ext}")
            written.append(Path(f"{stem}.{ext}"))
        plt.close(fig)
    return written
