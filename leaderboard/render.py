"""The leaderboard: a pure function of job records.

Per (data set, model): one row per defense (in the order the records first
name them, i.e. the matrix's order), and per attack the columns C-Acc, ASR,
RA, DER, P-ASR (retuning), the clean model's P-ASR, QRA's P-ASR (rates in
percent) and the LMC escape point (a t in [0, 1]); those no cell has are left
out; each is averaged over
seeds. A cell that failed, was blocked or skipped shows that status, never a
number.

An evaluator listed under its own ``label`` (``{name: qra, label: qra_kl}``)
keeps its metrics apart: they are folded as ``<metric>@<label>`` and shown in
their own columns (``QRA P-ASR [qra_kl]``), never averaged with the entry of
the same plugin under its plain name.
"""

from __future__ import annotations

import json
from collections import defaultdict
from statistics import mean
from typing import Any, Iterable

from tabulate import tabulate

#: metric key -> column title, in display order; a table shows the columns
#: that some cell of it has
COLUMNS = {"clean_acc": "C-Acc", "asr": "ASR", "robust_acc": "RA", "der": "DER", "retune_asr": "P-ASR",
           "retune_asr_clean_model": "P-ASR(clean)", "qra_p_asr": "QRA P-ASR", "lmc_escape_t": "LMC-esc t"}

#: columns that are not rates: shown as they are (2 decimals), not in percent
PLAIN = {"lmc_escape_t"}


def _get(rec: Any, name: str) -> Any:
    return rec.get(name) if isinstance(rec, dict) else getattr(rec, name)


def collect(records: Iterable[Any]) -> list[dict[str, Any]]:
    """Fold evaluate records into cells: one per (dataset, model, attack, defense),
    metrics averaged over seeds; a cell with any unfinished record carries its status."""
    cells: dict[tuple, dict[str, Any]] = {}
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        if _get(rec, "kind") != "evaluate":
            continue
        a = _get(rec, "attrs")
        key = (a["dataset"], a["model"], a["attack"], a["defense"])
        cell = cells.setdefault(key, {"dataset": key[0], "model": key[1], "attack": key[2], "defense": key[3],
                                      "metrics": {}, "seeds": set(), "status": {}})
        status = _get(rec, "status")
        label = a.get("evaluator", "?")
        plugin = ((_get(rec, "config") or {}).get("evaluator") or {}).get("name", label)
        if status == "done":
            cell["seeds"].add(a["seed"])
            for m, v in (_get(rec, "metrics") or {}).items():
                if isinstance(v, (int, float)):  # curves stay in the store
                    values[key][m if label == plugin else f"{m}@{label}"].append(float(v))
        else:
            cell["status"][label] = {"status": status, "reason": (_get(rec, "error") or "").strip()
                                                        .splitlines()[-1:] or [""]}
    out = []
    for key, cell in cells.items():
        cell["metrics"] = {m: mean(v) for m, v in values[key].items()}
        cell["seeds"] = sorted(cell["seeds"])
        out.append(cell)
    return out


def _fmt(cell: dict | None, metric: str) -> str:
    """A metric in percent; a cell whose evaluation did not finish shows that
    status (failed / blocked / skipped); a cell never run shows a dash."""
    if cell is None:
        return "—"
    if metric in cell["metrics"]:
        value = cell["metrics"][metric]
        return f"{value:.2f}" if metric.partition("@")[0] in PLAIN else f"{100 * value:.2f}"
    label = metric.partition("@")[2]
    statuses = sorted({s["status"] for ev, s in cell["status"].items() if not label or ev == label})
    return "/".join(statuses) if statuses else "—"


def _title(column: str) -> str:
    metric, _, label = column.partition("@")
    return COLUMNS[metric] + (f" [{label}]" if label else "")


def tables(records: Iterable[Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, headers, rows)`` per (data set, model)."""
    cells = collect(records)
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["dataset"], c["model"]), []).append(c)
    out = []
    for (dataset, model), group in groups.items():
        attacks = list(dict.fromkeys(c["attack"] for c in group))
        defenses = list(dict.fromkeys(c["defense"] for c in group))
        index = {(c["defense"], c["attack"]): c for c in group}
        seeds = sorted({s for c in group for s in c["seeds"]})
        present = {m for c in group for m in c["metrics"]}
        shown = [c for m in COLUMNS for c in [m] + sorted(p for p in present if p.startswith(m + "@"))
                 if c in present] or list(COLUMNS)[:4]
        headers = ["defense"] + [f"{atk} {_title(m)}" for atk in attacks for m in shown]
        rows = [[d] + [_fmt(index.get((d, atk)), m) for atk in attacks for m in shown] for d in defenses]
        out.append((f"{dataset} / {model} (seeds {', '.join(map(str, seeds)) or '-'}; rates in %)", headers, rows))
    return out


def render(records: Iterable[Any], fmt: str = "text") -> str:
    """Render records as ``text``, ``markdown`` or ``json``."""
    records = list(records)
    if fmt == "json":
        return json.dumps(collect(records), indent=2, sort_keys=True)
    tablefmt = {"text": "simple", "markdown": "github"}[fmt]
    parts = []
    for title, headers, rows in tables(records):
        heading = f"### {title}" if fmt == "markdown" else title
        parts.append(heading + "\n\n" + tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True))
    return "\n\n".join(parts) if parts else "(no evaluation results yet)"
