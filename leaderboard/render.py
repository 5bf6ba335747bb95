"""The leaderboard: a pure function of job records, read through :mod:`backdoor_harness.results`.

One board per (data set, model, poison rate). Rows are defenses: the
baseline (a defense that returns the model as it is: the undefended row)
first, then the oracle defenses (they use the real trigger, marked
``(oracle)``), then the others in the order the records first name them (the
matrix's order); both facts come from the purify records. The columns are the
metrics whose evaluators declare a board position (``Metric.board``), in that
order, titled, directed and formatted (percent or not) as declared, per attack
and then averaged over the attacks (only where every attack has the value); a
board shows only the columns some cell of it has. Then the defense's cost:
mean wall seconds of its purify jobs and the device they ran on.

Every value is a mean over seeds. A cell that failed, was blocked or skipped
shows that status, never a number, and the reason is listed under the board;
a cell never run shows a dash. The best value of each column among the
defenses is marked; baseline and oracle rows are shown but never marked best.
Where a paper reports a number for the cell (``reported.yaml`` beside this
module, each entry citing paper and table and naming its setup in
``setups.yaml``), it is shown beside the measured one only when the cell's
recorded configs are that setup (:mod:`.setups`); otherwise the board's notes
say which fields differ.

An evaluator listed under its own ``label`` (``{name: qra, label: qra_kl}``)
keeps its metrics apart: they are folded as ``<metric>@<label>`` and shown in
their own columns (``QRA P-ASR [qra_kl]``), never averaged with the entry of
the same plugin under its plain name.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any, Iterable

import yaml
from tabulate import tabulate

from backdoor_harness.results import ResultCell, collect
from backdoor_harness.store import Metric

from .setups import SETUPS_FILE, differences, load_setups


@dataclass(frozen=True)
class Column:
    """A metric a board shows: its key (``metric`` or ``metric@label``), title and direction, from
    the metric's metadata as its evaluator declared it (``Metric``)."""

    metric: str
    title: str
    higher_is_better: bool
    percent: bool = True
    board: int = 0


#: marks an attack whose trigger is a substitute (its plugin's ``substitute``), in headers and notes
SUBSTITUTE_MARK = "†"
#: the published numbers shipped with the leaderboard
REPORTED_FILE = Path(__file__).with_name("reported.yaml")


def column(key: str, info: Metric) -> Column:
    """The :class:`Column` of ``metric`` or ``metric@label`` (titled ``<title> [label]``)."""
    metric, _, label = key.partition("@")
    return Column(key, (info.title or metric) + (f" [{label}]" if label else ""), info.higher_is_better,
                  info.percent, info.board if info.board is not None else 0)


def _columns(group: list[ResultCell]) -> list[Column]:
    """A board's columns: every board metric (``Metric.board`` set) some cell has a value of, or
    else every one its cells' evaluators declare, in board order (a metric's labelled variants
    after it, by label)."""
    info: dict[str, Metric] = {}
    for c in group:
        for m, i in c.metric_info.items():
            if i.board is not None:
                info.setdefault(m, i)
    present = [m for m in info if any(m in c.metrics for c in group)] or list(info)
    first = {m.partition("@")[0]: n for n, m in reversed(list(enumerate(info)))}

    def order(key: str) -> tuple:
        metric, _, label = key.partition("@")
        return info[key].board, first[metric], metric, bool(label), label

    return [column(m, info[m]) for m in sorted(present, key=order)]


def load_reported(path: str | Path | None = REPORTED_FILE, setups: str | Path | None = SETUPS_FILE
                  ) -> list[dict[str, Any]]:
    """The published numbers: a YAML list of ``{dataset, model, poison_rate, attack, defense,
    metric, value, source, setup}``, with each ``setup`` name resolved to its mapping in
    ``setups`` (a name it lacks stays a name, and matches no cell). No file, no numbers."""
    if path is None or not Path(path).exists():
        return []
    known = load_setups(setups)
    out = []
    for entry in yaml.safe_load(Path(path).read_text()) or []:
        if isinstance(entry.get("setup"), str) and entry["setup"] in known:
            entry = {**entry, "setup_name": entry["setup"], "setup": known[entry["setup"]]}
        out.append(entry)
    return out


def _reported_index(reported: Iterable[dict]) -> dict[tuple, list[dict]]:
    """(dataset, model, rate, attack, defense, metric) -> the reported entries of that cell, in file
    order. An entry for a data set's samples-per-class setting (``reserve: spc10``) belongs to the
    data set labelled ``cifar10-spc10``."""
    index: dict[tuple, list[dict]] = defaultdict(list)
    for r in reported:
        dataset = f"{r['dataset']}-{r['reserve']}" if r.get("reserve") else r["dataset"]
        index[(dataset, r["model"], float(r["poison_rate"]), r["attack"], r["defense"], r["metric"])].append(r)
    return index


def _match(entries: list[dict], cell: ResultCell | None, metric: str) -> tuple[tuple[float, str] | None, list[str]]:
    """The reported (value, source) of the first entry whose setup the cell is, else the differences
    from the setup of the cell's plain entry (one without its own attack/defense config)."""
    if not entries or cell is None:
        return None, []
    found, why = [], None
    for r in entries:
        setup = r.get("setup") if isinstance(r.get("setup"), dict) else None
        diff = differences(setup, cell.setup, cell.evaluator_of.get(metric), r)
        if not diff:
            found.append(r)
        elif why is None and not (r.get("attack_config") or r.get("defense_config")):
            why = diff
    if not found:
        return None, why or []
    values = list(dict.fromkeys(float(r["value"]) for r in found))
    source = found[0].get("source", "")
    for r in found[1:]:  # where papers disagree on a cell, the first value shows, the source names every one
        if float(r["value"]) != values[0]:
            source += f"; also {100 * float(r['value']):.2f} in {r.get('source', '')}"
    return (values[0], source), []


def _order(group: list[ResultCell]) -> list[str]:
    """The rows: baseline defenses (the undefended model) first, then the oracle ones (they use the
    real trigger), then the rest, each in the order the records first name them."""
    defenses = list(dict.fromkeys(c.defense for c in group))
    baseline = {c.defense for c in group if c.baseline}
    oracle = {c.defense for c in group if c.oracle} - baseline
    return ([d for d in defenses if d in baseline] + [d for d in defenses if d in oracle]
            + [d for d in defenses if d not in baseline and d not in oracle])


def _entry(cell: ResultCell | None, col: Column, reported: tuple[float, str] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"metric": col.metric, "percent": col.percent, "value": None, "status": None,
                             "reported": None, "source": None, "best": False}
    if reported:
        entry["reported"], entry["source"] = reported
    if cell is None:
        return entry
    if col.metric in cell.metrics:
        entry["value"] = cell.metrics[col.metric]
        return entry
    label = col.metric.partition("@")[2]
    statuses = sorted({s.status for ev, s in cell.status.items() if not label or ev == label})
    entry["status"] = "/".join(statuses) or None
    return entry


def _mark_best(rows: list[dict], col: Column, get) -> None:
    """Mark the best value of one column among the contenders: not a baseline row, not an oracle
    row (ties: all of them)."""
    scored = [(row, get(row)) for row in rows if not row["baseline"] and not row["oracle"]]
    scored = [(row, e) for row, e in scored if e is not None and e["value"] is not None]
    if len(scored) < 2:
        return
    best = (max if col.higher_is_better else min)(e["value"] for _, e in scored)
    for _, e in scored:
        e["best"] = abs(e["value"] - best) < 1e-12


def boards(records: Iterable[Any], reported: Iterable[dict] = (), sources: list[str] | None = None
           ) -> list[dict[str, Any]]:
    """The leaderboard as data: one board per (data set, model, poison rate), and per source
    when ``sources`` names each record's (see :func:`~backdoor_harness.results.collect`; the board
    then has ``source``).

    Each board: ``dataset, model, poison_rate, seeds, attacks, columns`` (the :class:`Column` s shown),
    ``rows`` (per defense: ``cells[attack][metric]`` and ``avg[metric]`` entries of
    ``{metric, percent, value, status, reported, source, best}``, ``cost_s`` (mean over attacks),
    ``cell_cost_s[attack]``, ``device``, ``oracle``, ``baseline``), ``substitutes`` (attack -> what
    replaces its reference trigger) and ``notes`` (why a cell has no number, and which fields keep a
    paper's number from a cell)."""
    cells = collect(records, sources)
    index_reported = _reported_index(reported)
    groups: dict[tuple, list[ResultCell]] = {}
    for c in cells:
        groups.setdefault((c.source, c.dataset, c.model, c.poison_rate, c.model_revision), []).append(c)
    out = []
    for (source, dataset, model, rate, revision), group in groups.items():
        attacks = list(dict.fromkeys(c.attack for c in group))
        index = {(c.defense, c.attack): c for c in group}
        shown = _columns(group)
        rows, notes = [], []
        unmatched: dict[tuple[str, ...], list[str]] = {}
        for d in _order(group):
            mine = [index[(d, a)] for a in attacks if (d, a) in index]
            row: dict[str, Any] = {"defense": d, "cells": {}, "avg": {}, "cost_s": None, "device": [],
                                   "cell_cost_s": {}, "oracle": any(c.oracle for c in mine),
                                   "baseline": any(c.baseline for c in mine)}
            for atk in attacks:
                cell = index.get((d, atk))
                row["cells"][atk] = {}
                for col in shown:
                    entries = index_reported.get((dataset, model, float(rate) if rate is not None else None,
                                                  atk, d, col.metric.partition("@")[0]), [])
                    rep, why = _match(entries, cell, col.metric)
                    if why:
                        unmatched.setdefault(tuple(why), [])
                        if f"{atk}/{d}" not in unmatched[tuple(why)]:
                            unmatched[tuple(why)].append(f"{atk}/{d}")
                    row["cells"][atk][col.metric] = _entry(cell, col, rep)
                if cell is not None:
                    if cell.cost.wall_s is not None:
                        row.setdefault("_costs", []).append(cell.cost.wall_s)
                        row["cell_cost_s"][atk] = cell.cost.wall_s
                    row["device"] = sorted(set(row["device"]) | set(cell.cost.device))
                    for ev, s in cell.status.items():
                        notes.append(f"{d} / {atk} / {ev}: {s.status}: {s.reason}".rstrip(": "))
            for col in shown:
                vals = [row["cells"][atk][col.metric]["value"] for atk in attacks]
                row["avg"][col.metric] = {**_entry(None, col, None),
                                          "value": mean(vals) if all(v is not None for v in vals) else None}
            costs = row.pop("_costs", [])
            row["cost_s"] = mean(costs) if costs else None
            rows.append(row)
        for col in shown:
            for atk in attacks:
                _mark_best(rows, col, lambda r, atk=atk, m=col.metric: r["cells"][atk][m])
            if len(attacks) > 1:
                _mark_best(rows, col, lambda r, m=col.metric: r["avg"][m])
        substitutes = {c.attack: c.setup.attack_substitute for c in group
                       if c.setup is not None and c.setup.attack_substitute}
        for atk, what in substitutes.items():
            notes.append(f"{atk}{SUBSTITUTE_MARK}: a substitute trigger: {what}")
        for why, where in unmatched.items():
            notes.append(f"paper numbers not shown for {', '.join(where)}: different setup: {'; '.join(why)}")
        seeds = sorted({s for c in group for s in c.seeds})
        out.append({"substitutes": substitutes, "dataset": dataset, "model": model, "model_revision": revision,
                    "installed_revision": group[0].installed_revision, "poison_rate": rate, "seeds": seeds,
                    "attacks": attacks, "columns": shown, "rows": rows, "notes": notes,
                    **({"source": source} if source else {})})
    return out


def title(board: dict) -> str:
    rate = board["poison_rate"]
    rate_s = f"poison rate {100 * rate:g}%" if rate is not None else "poison rate ?"
    seeds = ", ".join(map(str, board["seeds"])) or "-"
    where = f"{board['source']}: " if board.get("source") else ""
    model = board["model"]
    if board.get("installed_revision") is not None and board.get("model_revision") != board["installed_revision"]:
        model += (f" [architecture revision {board.get('model_revision') or 1}, not the installed "
                  f"{board['installed_revision']}]")
    return f"{where}{board['dataset']} / {model} / {rate_s} (seeds {seeds}; rates in %)"


def fmt_value(value: float | None, percent: bool = True) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.2f}" if percent else f"{value:.2f}"


def fmt_entry(entry: dict, fmt: str = "text") -> str:
    """One cell as text: the measured value (or the status), the best marked, the reported number beside it."""
    if entry["value"] is None:
        text = entry["status"] or "—"
    else:
        text = fmt_value(entry["value"], entry["percent"])
        if entry["best"]:
            text = f"**{text}**" if fmt == "markdown" else f"{text}*"
    if entry["reported"] is not None:
        text += f" ({fmt_value(entry['reported'], entry['percent'])})"
    return text


def group_name(board: dict, group: str) -> str:
    """An attack's column group, marked when its trigger is a substitute (the note says which)."""
    return group + (SUBSTITUTE_MARK if group in board.get("substitutes", {}) else "")


def row_name(row: dict) -> str:
    """A row's defense, marked when it is an oracle (it uses the real trigger: never "best")."""
    return f"{row['defense']} (oracle)" if row.get("oracle") else row["defense"]


def long_table(board: dict, fmt: str = "text") -> tuple[list[str], list[list[str]]]:
    """One row per (attack, defense) cell, the metrics as columns (no averages): the board
    for few defenses and many attacks, e.g. an attack table with only ``none``."""
    headers = ["attack", "defense"] + [c.title for c in board["columns"]] + ["cost (s)", "device"]
    rows = []
    for atk in board["attacks"]:
        for row in board["rows"]:
            cost = row["cell_cost_s"].get(atk)
            rows.append([group_name(board, atk), row_name(row)] + [fmt_entry(row["cells"][atk][c.metric], fmt) for c in board["columns"]]
                        + [f"{cost:.1f}" if cost is not None else "—", ", ".join(row["device"]) or "—"])
    return headers, rows


def table(board: dict, fmt: str = "text") -> tuple[list[str], list[list[str]]]:
    """Headers and rows of one board for tabulate."""
    groups = board["attacks"] + (["avg"] if len(board["attacks"]) > 1 else [])
    headers = ["defense"] + [f"{group_name(board, g)} {c.title}" for g in groups for c in board["columns"]]
    headers += ["cost (s)", "device"]
    rows = []
    for row in board["rows"]:
        line = [row_name(row)]
        for g in groups:
            source = row["avg"] if g == "avg" else row["cells"][g]
            line += [fmt_entry(source[c.metric], fmt) for c in board["columns"]]
        line += [f"{row['cost_s']:.1f}" if row["cost_s"] is not None else "—", ", ".join(row["device"]) or "—"]
        rows.append(line)
    return headers, rows


LEGEND = ("best value of a column among the defenses marked {best} (the undefended row and oracle rows, which "
          "use the real trigger, are never marked); an attack marked " + SUBSTITUTE_MARK + " runs a substitute "
          "trigger (the notes say what replaces the paper's); a number in parentheses is the one a paper reports for the "
          "cell, shown only where the cell ran that paper's setup (sources: leaderboard/reported.yaml, setups: "
          "leaderboard/setups.yaml; the notes under a board name the fields that differ); cost = mean wall seconds "
          "of the defense's purify jobs")


def render(records: Iterable[Any], fmt: str = "text", reported: Iterable[dict] | None = None,
           long: bool = False, sources: list[str] | None = None) -> str:
    """Render records as ``text``, ``markdown``, ``html`` (one self-contained page) or ``json``
    (the cells of :func:`collect`). ``reported`` defaults to the numbers shipped in ``reported.yaml``;
    ``long``: text and markdown boards with a row per (attack, defense) (:func:`long_table`);
    ``sources``: each record's source name, boards kept apart per name (see :func:`boards`)."""
    records = list(records)
    if fmt == "json":
        return json.dumps([c.model_dump(mode="json") for c in collect(records, sources)], indent=2, sort_keys=True)
    reported = load_reported() if reported is None else list(reported)
    data = boards(records, reported, sources)
    if fmt == "html":
        from .html import page

        return page(data, records)
    tablefmt = {"text": "simple", "markdown": "github"}[fmt]
    parts = []
    for board in data:
        headers, rows = (long_table if long else table)(board, fmt)
        heading = f"### {title(board)}" if fmt == "markdown" else title(board)
        part = heading + "\n\n" + tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)
        if board["notes"]:
            part += "\n\n" + "\n".join(f"- {n}" for n in board["notes"])
        parts.append(part)
    if not parts:
        return "(no evaluation results yet)"
    legend = LEGEND.format(best="**bold**" if fmt == "markdown" else "with *")
    return "\n\n".join(parts) + "\n\n" + legend
