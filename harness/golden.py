"""Golden numbers: a small matrix's metrics, with tolerances measured from seed-to-seed spread.

A golden file (YAML, ``format: 2``) holds the matrix it was measured on, the
command that regenerates it, the seeds, the versions of the harness and of
every plugin involved, and checks of two kinds, one per (cell, metric, kind)::

    - {dataset: cifar10, model: tiny_cnn, attack: badnets, defense: none, metric: asr, kind: absolute,
       direction: min, ref: 0.9409, delta: 0.0733, values: [0.9267, 0.9511, 0.9689, 0.8956, 0.9622]}
    - {dataset: cifar10, model: tiny_cnn, attack: badnets, defense: ep, metric: asr, kind: paired,
       baseline: none, direction: max, ref: -0.6551, delta: 0.2778, values: [-0.6511, -0.4622, -0.6933, -0.7289, -0.74]}

``absolute``
    The cell's value itself. ``values`` are its values at the measured seeds.
``paired``
    The cell's value minus the value of the same metric in the baseline cell
    (the row whose defense returns the model as it is: :attr:`ResultCell.baseline
    <backdoor_harness.results.ResultCell>`; ``baseline`` names its defense) of the
    same data set, model, attack and seed. Seeds move the attacked model, and
    with it the undefended and the defended rows together: what a defense
    changes relative to the model it was given is steadier over seeds than
    either number alone, so its tolerance is tighter. ``values`` are the
    per-seed differences.

For both kinds ``values`` are listed in the order of ``seeds_measured`` (so a
paired check's values plus its baseline's absolute values give the cell's own
values, see :func:`value_spreads`) and rounded to 4 digits; ``ref`` is their
mean and ``delta`` their spread (max - min), at least :data:`MIN_DELTA`. The
direction says which way a drift is a regression:

- ``min``: the value must stay >= ref - delta (clean accuracy; an
  undefended attack's ASR: the attack must keep working);
- ``max``: the value must stay <= ref + delta (a defense's ASR);
- ``near``: |value - ref| <= delta (everything else).

A paired check has the direction of its cell's metric (a defense's ASR
difference may not rise, its clean-accuracy difference may not fall). The
direction comes from the metric's metadata in the records (its evaluator
declares it ``one_sided`` and which way is better) and the cell's ``baseline``
fact (the row without a defense, where a lower-is-better metric measures the
attack): see :func:`direction`.

:func:`make_golden` writes absolute checks for a baseline cell; for every other
cell a paired check of each metric (when the cell has a baseline cell that
measured the metric; an absolute check otherwise), and also the absolute check
where it is at least as tight (its delta <= the paired delta): a defense that
removes the backdoor at every seed keeps its absolute bound near 0.

A file without ``format`` (format 1: every check absolute, with ``spread:
[min, max]`` instead of ``values``) still loads and compares.

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

#: the format :func:`make_golden` writes (a file without ``format`` is format 1)
FORMAT = 2
#: the smallest tolerance a check gets, whatever the measured spread
MIN_DELTA = 0.01
CELL = ("dataset", "model", "attack", "defense")
KINDS = ("absolute", "paired")


def direction(info: Metric | None, baseline: bool) -> str:
    """Which way a drift of a metric (its metadata ``info``) in a cell is a regression: a one-sided
    metric may not fall if higher is better, nor, in a ``baseline`` cell (no defense: it measures the
    attack, which must keep working), if lower is better; a one-sided lower-is-better metric of a
    defended cell may not rise; any other metric may not drift either way."""
    if info is None or not info.one_sided:
        return "near"
    return "min" if info.higher_is_better or baseline else "max"


def kind(check: dict) -> str:
    """A check's kind (a format-1 check, which names none, is absolute)."""
    return check.get("kind", "absolute")


def check_value(check: dict, value: float) -> bool:
    """Whether ``value`` (for a paired check: the difference to the baseline) holds the check."""
    lo, hi = check["ref"] - check["delta"], check["ref"] + check["delta"]
    return {"min": value >= lo, "max": value <= hi, "near": lo <= value <= hi}[check["direction"]]


def bound(check: dict) -> str:
    ref, delta = check["ref"], check["delta"]
    return {"min": f">= {ref - delta:.4f}", "max": f"<= {ref + delta:.4f}",
            "near": f"in [{ref - delta:.4f}, {ref + delta:.4f}]"}[check["direction"]]


def seed_spread(check: dict) -> list[float]:
    """``[min, max]`` of the values the check was measured from."""
    if check.get("values"):
        return [min(check["values"]), max(check["values"])]
    return list(check.get("spread") or [])


def versions(spec: MatrixSpec) -> dict[str, str]:
    """The harness's version and every plugin version the matrix's jobs depend on."""
    out = {"harness": __version__}
    for job in expand(spec):
        for kind_, v in job.versions.items():
            ref = job.payload.get("data" if kind_ == "dataset" else kind_) or {}
            out[f"{kind_}:{ref.get('name', '?')}"] = v
    return dict(sorted(out.items()))


def _where(cell: ResultCell) -> tuple:
    return tuple(getattr(cell, k) for k in CELL)


def _stats(values: list[float]) -> dict[str, Any]:
    return {"ref": round(mean(values), 4), "delta": round(max(max(values) - min(values), MIN_DELTA), 4),
            "values": [round(v, 4) for v in values]}


def _baselines(runs: dict[int, list[ResultCell]]) -> dict[tuple, str]:
    """(data set, model, attack) -> the defense of its baseline cell (one per triple, the same at every seed)."""
    out: dict[tuple, str] = {}
    for seed in sorted(runs):
        for cell in runs[seed]:
            if not cell.baseline:
                continue
            triple, name = _where(cell)[:3], cell.defense
            if out.setdefault(triple, name) != name:
                raise HarnessError(f"{'/'.join(map(str, triple))} has two baseline rows ({out[triple]} and {name}); "
                                   f"paired golden checks need one: keep one baseline defense in the golden matrix")
    return out


def make_golden(runs: dict[int, list[ResultCell]], spec: MatrixSpec, command: str) -> dict[str, Any]:
    """A golden document (format 2) from the cells of one run per seed (``{seed: collect(records)}``)."""
    if len(runs) < 2:
        raise HarnessError("golden values need at least two seeds to measure the spread (e.g. --seeds 0 1 2 3 4)")
    seeds = sorted(runs)
    values: dict[tuple, list[float]] = {}
    directions: dict[tuple, str] = {}
    is_baseline: dict[tuple, bool] = {}
    for seed in seeds:
        for cell in runs[seed]:
            for metric, v in sorted(cell.metrics.items()):
                key = _where(cell) + (metric,)
                values.setdefault(key, []).append(v)
                directions.setdefault(key, direction(cell.metric_info.get(metric), cell.baseline))
                is_baseline.setdefault(key, cell.baseline)
    for key, vs in values.items():
        if len(vs) != len(seeds):
            raise HarnessError(f"cell {'/'.join(map(str, key))} has {len(vs)} of {len(seeds)} seeds; "
                               f"every seed's run must finish before golden values are written")
    baselines = _baselines(runs)
    checks = []
    for key, vs in values.items():
        cell = dict(zip(CELL + ("metric",), key))
        absolute = {**cell, "kind": "absolute", "direction": directions[key], **_stats(vs)}
        base = baselines.get(key[:3])
        base_values = values.get(key[:3] + (base, key[4])) if base is not None else None
        if is_baseline[key] or base_values is None:
            checks.append(absolute)
            continue
        paired = {**cell, "kind": "paired", "baseline": base, "direction": directions[key],
                  **_stats([v - b for v, b in zip(vs, base_values)])}
        if absolute["delta"] <= paired["delta"]:  # the absolute bound is the tighter one: keep it too
            checks.append(absolute)
        checks.append(paired)
    return {"format": FORMAT, "command": command, "date": _dt.date.today().isoformat(), "seeds_measured": seeds,
            "versions": versions(spec), "matrix": spec.model_dump(mode="json", exclude={"seeds"}),
            "checks": checks}


def write_golden(doc: dict[str, Any], path: str | Path) -> None:
    header = ("# Golden numbers (see backdoor_harness.golden), format 2. Each check is `absolute` (the cell's value)\n"
              "# or `paired` (the cell's value minus its baseline row's at the same seed); `values`: per seed of\n"
              "# seeds_measured, ref = their mean, delta = their spread (max - min, at least 0.01).\n"
              "# Regenerate with `command`.\n")
    Path(path).write_text(header + yaml.safe_dump(doc, sort_keys=False, width=1000))


def load_golden(path: str | Path) -> dict[str, Any]:
    """A golden file (format 1 or 2), its checks validated."""
    path = Path(path)
    if not path.exists():
        raise HarnessError(f"{path}: no such golden file; write one with `harness golden SPEC --out {path}`")
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or not {"matrix", "checks"} <= set(doc):
        raise HarnessError(f"{path}: a golden file is a mapping with `matrix` and `checks` "
                           f"(write one with `harness golden`)")
    fmt = doc.get("format", 1)
    if fmt not in (1, FORMAT):
        raise HarnessError(f"{path}: golden file format {fmt!r}; this harness reads formats 1 and {FORMAT} "
                           f"(regenerate it with its `command`, or upgrade backdoor-harness)")
    for i, check in enumerate(doc["checks"] or []):
        where = f"{path}: check {i + 1}"
        if not isinstance(check, dict):
            raise HarnessError(f"{where} is not a mapping; regenerate the file with its `command`")
        missing = [k for k in CELL + ("metric", "direction", "ref", "delta") if k not in check]
        if kind(check) not in KINDS:
            raise HarnessError(f"{where}: kind {kind(check)!r}, expected one of {', '.join(KINDS)}")
        if kind(check) == "paired" and "baseline" not in check:
            missing.append("baseline")
        if check.get("direction") not in (None, "min", "max", "near"):
            raise HarnessError(f"{where}: direction {check['direction']!r}, expected min, max or near")
        if missing:
            raise HarnessError(f"{where} lacks {', '.join(missing)}; regenerate the file with its `command`")
    return doc


def golden_spec(doc: dict[str, Any], seed: int = 0) -> MatrixSpec:
    """The golden file's matrix, for one seed."""
    return MatrixSpec.model_validate({**doc["matrix"], "seeds": [seed]})


def _no_value(cell: ResultCell | None) -> str:
    status = "; ".join(f"{ev}: {s.status}" for ev, s in (cell.status if cell else {}).items())
    return status or ("cell missing" if cell is None else "metric missing")


def compare(cells: Iterable[ResultCell], doc: dict[str, Any]) -> list[str]:
    """Every check of ``doc`` the cells fail, as one line each (empty: all hold). A check keeps the
    direction stored in the file; a paired check takes the difference to the baseline cell of the
    same data set, model and attack (the cell that says ``baseline``, of the defense the check names)."""
    cells = list(cells)
    index = {_where(c): c for c in cells}
    failures = []
    for check in doc["checks"]:
        metric = check["metric"]
        where = "/".join(str(check[k]) for k in CELL) + f" {metric}"
        paired = kind(check) == "paired"
        label = f" (paired: minus the undefended {metric} of the same seed)" if paired else " (absolute)"
        tolerance = f"(ref {check['ref']:.4f} +- {check['delta']:.4f}, seeds spread {seed_spread(check)})"
        cell = index.get(tuple(check[k] for k in CELL))
        if cell is None or metric not in cell.metrics:
            failures.append(f"{where}{label}: no value ({_no_value(cell)})")
            continue
        value = cell.metrics[metric]
        shown = f"{value:.4f}"
        if paired:
            triple = tuple(check[k] for k in CELL[:3])
            base = index.get(triple + (check["baseline"],))
            base_where = "/".join(map(str, triple + (check["baseline"],)))
            if base is None or not base.baseline or metric not in base.metrics:
                why = "not a baseline row" if base is not None and not base.baseline else _no_value(base)
                failures.append(f"{where}{label}: no value of its baseline cell {base_where} ({why})")
                continue
            shown = f"{value - base.metrics[metric]:.4f} (= {value:.4f} - {base.metrics[metric]:.4f})"
            value -= base.metrics[metric]
        if not check_value(check, value):
            failures.append(f"{where}{label}: {shown}, expected {bound(check)} {tolerance}")
    return failures


def value_spreads(doc: dict[str, Any]) -> dict[tuple, float]:
    """(data set, model, attack, defense, metric) -> the seed-to-seed spread (``delta``) of the cell's
    own value: an absolute check's delta or, for a cell with a paired check only, the spread of its
    paired values plus its baseline's absolute values seed by seed (at least :data:`MIN_DELTA`). A
    cell whose values cannot be rebuilt so (a format-1 file, seeds missing) has none."""
    out: dict[tuple, float] = {}
    absolute = {tuple(c[k] for k in CELL + ("metric",)): c for c in doc["checks"] if kind(c) == "absolute"}
    for key, check in absolute.items():
        out[key] = float(check["delta"])
    n = len(doc.get("seeds_measured") or [])
    for check in doc["checks"]:
        key = tuple(check[k] for k in CELL + ("metric",))
        if kind(check) != "paired" or key in out:
            continue
        base = absolute.get(key[:3] + (check["baseline"], key[4]))
        own, others = check.get("values") or [], (base or {}).get("values") or []
        if n and len(own) == len(others) == n:
            sums = [a + b for a, b in zip(own, others)]
            out[key] = round(max(max(sums) - min(sums), MIN_DELTA), 4)
    return out
