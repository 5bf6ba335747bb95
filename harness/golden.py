"""Golden numbers: a small matrix's metrics, with tolerances measured from seed-to-seed spread.

A golden file (YAML) holds the matrix it was measured on, the command, the
seeds, the versions of the harness and of every plugin involved, and one
check per (cell, metric)::

    - {dataset: cifar10, model: tiny_cnn, attack: badnets, defense: ep, metric: asr,
       direction: max, ref: 0.031, delta: 0.024, spread: [0.012, 0.036]}

``ref`` is the mean over the measured seeds and ``delta`` the spread
(max - min) over them, at least :data:`MIN_DELTA`. The direction says which
way a drift is a regression:

- ``min``: the value must stay >= ref - delta (clean accuracy; an
  undefended attack's ASR: the attack must keep working);
- ``max``: the value must stay <= ref + delta (a defense's ASR);
- ``near``: |value - ref| <= delta (everything else).

The direction comes from the metric's metadata in the records (its evaluator
declares it ``one_sided`` and which way is better) and the cell's ``baseline``
fact (the row without a defense, where a lower-is-better metric measures the
attack): see :func:`direction`.

:func:`compare` checks the cells of a run (:func:`backdoor_harness.results.collect`)
against a golden file; the pytest plugin (:mod:`backdoor_harness.pytest_plugin`)
wraps it in fixtures; ``harness golden`` writes a file.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from statistics import mean
from typing import Any, Iterable

import yaml

from . import __version__
from .errors import HarnessError
from .matrix import MatrixSpec, expand
from .results import ResultCell
from .store import Metric

#: the smallest tolerance a check gets, whatever the measured spread
MIN_DELTA = 0.01
CELL = ("dataset", "model", "attack", "defense")


def direction(info: Metric | None, baseline: bool) -> str:
    """Which way a drift of a metric (its metadata ``info``) in a cell is a regression: a one-sided
    metric may not fall if higher is better, nor, in a ``baseline`` cell (no defense: it measures the
    attack, which must keep working), if lower is better; a one-sided lower-is-better metric of a
    defended cell may not rise; any other metric may not drift either way."""
    if info is None or not info.one_sided:
        return "near"
    return "min" if info.higher_is_better or baseline else "max"


def check_value(check: dict, value: float) -> bool:
    lo, hi = check["ref"] - check["delta"], check["ref"] + check["delta"]
    return {"min": value >= lo, "max": value <= hi, "near": lo <= value <= hi}[check["direction"]]


def bound(check: dict) -> str:
    ref, delta = check["ref"], check["delta"]
    return {"min": f">= {ref - delta:.4f}", "max": f"<= {ref + delta:.4f}",
            "near": f"in [{ref - delta:.4f}, {ref + delta:.4f}]"}[check["direction"]]


def versions(spec: MatrixSpec) -> dict[str, str]:
    """The harness's version and every plugin version the matrix's jobs depend on."""
    out = {"harness": __version__}
    for job in expand(spec):
        for kind, v in job.versions.items():
            ref = job.payload.get("data" if kind == "dataset" else kind) or {}
            out[f"{kind}:{ref.get('name', '?')}"] = v
    return dict(sorted(out.items()))


def _where(cell: ResultCell) -> tuple:
    return tuple(getattr(cell, k) for k in CELL)


def make_golden(runs: dict[int, list[ResultCell]], spec: MatrixSpec, command: str) -> dict[str, Any]:
    """A golden document from the cells of one run per seed (``{seed: collect(records)}``)."""
    if len(runs) < 2:
        raise HarnessError("golden values need at least two seeds to measure the spread (e.g. --seeds 0 1 2 3 4)")
    values: dict[tuple, list[float]] = {}
    directions: dict[tuple, str] = {}
    for cells in runs.values():
        for cell in cells:
            for metric, v in sorted(cell.metrics.items()):
                key = _where(cell) + (metric,)
                values.setdefault(key, []).append(v)
                directions.setdefault(key, direction(cell.metric_info.get(metric), cell.baseline))
    checks = []
    for key, vs in values.items():
        if len(vs) != len(runs):
            raise HarnessError(f"cell {'/'.join(map(str, key))} has {len(vs)} of {len(runs)} seeds; "
                               f"every seed's run must finish before golden values are written")
        cell = dict(zip(CELL + ("metric",), key))
        checks.append({**cell, "direction": directions[key],
                       "ref": round(mean(vs), 4), "delta": round(max(max(vs) - min(vs), MIN_DELTA), 4),
                       "spread": [round(min(vs), 4), round(max(vs), 4)]})
    return {"command": command, "date": _dt.date.today().isoformat(), "seeds_measured": sorted(runs),
            "versions": versions(spec), "matrix": spec.model_dump(mode="json", exclude={"seeds"}),
            "checks": checks}


def write_golden(doc: dict[str, Any], path: str | Path) -> None:
    header = ("# Golden numbers (see backdoor_harness.golden): ref = mean over seeds_measured,\n"
              "# delta = their spread (max - min, at least 0.01). Regenerate with `command`.\n")
    Path(path).write_text(header + yaml.safe_dump(doc, sort_keys=False, width=120))


def load_golden(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise HarnessError(f"{path}: no such golden file; write one with `harness golden SPEC --out {path}`")
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or not {"matrix", "checks"} <= set(doc):
        raise HarnessError(f"{path}: a golden file is a mapping with `matrix` and `checks` "
                           f"(write one with `harness golden`)")
    return doc


def golden_spec(doc: dict[str, Any], seed: int = 0) -> MatrixSpec:
    """The golden file's matrix, for one seed."""
    return MatrixSpec.model_validate({**doc["matrix"], "seeds": [seed]})


def compare(cells: Iterable[ResultCell], doc: dict[str, Any]) -> list[str]:
    """Every check of ``doc`` the cells fail, as one line each (empty: all hold). A check keeps the
    direction stored in the file."""
    index = {_where(c): c for c in cells}
    failures = []
    for check in doc["checks"]:
        cell = index.get(tuple(check[k] for k in CELL))
        where = "/".join(str(check[k]) for k in CELL) + f" {check['metric']}"
        if cell is None or check["metric"] not in cell.metrics:
            status = "; ".join(f"{ev}: {s.status}" for ev, s in (cell.status if cell else {}).items())
            failures.append(f"{where}: no value ({status or 'cell missing'})")
            continue
        value = cell.metrics[check["metric"]]
        if not check_value(check, value):
            failures.append(f"{where}: {value:.4f}, expected {bound(check)} "
                            f"(ref {check['ref']:.4f} +- {check['delta']:.4f}, seeds spread {check['spread']})")
    return failures
