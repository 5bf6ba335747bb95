"""The leaderboard: a pure function of job records.

One board per (data set, model, poison rate). Rows are defenses: the
undefended model (``none``) first, then EP (the reference purification),
then the others in the order the records first name them (the matrix's
order). Per attack, the columns C-Acc, ASR (O-ASR), RA, DER, P-ASR
(retuning), the clean model's P-ASR, QRA's P-ASR, the clean model's ASR
(rates in percent) and the LMC escape point (a t in [0, 1]); a board shows
only the columns some cell of it has. Then the same columns averaged over
the attacks (only where every attack has the value), and the defense's cost:
mean wall seconds of its purify jobs and the device they ran on.

Every value is a mean over seeds. A cell that failed, was blocked or skipped
shows that status, never a number, and the reason is listed under the board;
a cell never run shows a dash. The best value of each column among the
defenses is marked; ``none`` (the reference) and the oracle rows (a defense
that needs the real trigger, e.g. EP, marked ``(oracle)``) are shown but never
marked best. Where a paper reports a number for the cell (``reported.yaml``
beside this module, each entry citing paper and table and naming its setup in
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

from .setups import SETUPS_FILE, cell_setup, differences, evaluator_setup, installed_revision, load_setups


@dataclass(frozen=True)
class Column:
    """A metric the leaderboard shows: its evaluator key, title and direction."""

    metric: str
    title: str
    higher_is_better: bool
    percent: bool = True


#: the metrics shown, in display order
COLUMNS = (
    Column("clean_acc", "C-Acc", True),
    Column("asr", "ASR", False),
    Column("robust_acc", "RA", True),
    Column("der", "DER", True),
    Column("retune_asr", "P-ASR", False),
    Column("retune_asr_clean_model", "P-ASR(clean)", False),
    Column("qra_p_asr", "QRA P-ASR", False),
    Column("lmc_escape_t", "LMC-esc t", False, percent=False),
    Column("clean_asr", "ASR(clean model)", False),
)
BY_METRIC = {c.metric: c for c in COLUMNS}
#: rows shown first, in this order: the undefended model, then the reference purification
FIRST_ROWS = ("none", "ep")
#: the row that is the reference, not a contender for "best"
REFERENCE_ROW = "none"
#: marks an attack whose trigger is a substitute (its plugin's ``substitute``), in headers and notes
SUBSTITUTE_MARK = "†"
#: the published numbers shipped with the leaderboard
REPORTED_FILE = Path(__file__).with_name("reported.yaml")


def _get(rec: Any, name: str) -> Any:
    return rec.get(name) if isinstance(rec, dict) else getattr(rec, name, None)


def column(key: str) -> Column:
    """The :class:`Column` of ``metric`` or ``metric@label``."""
    metric, _, label = key.partition("@")
    base = BY_METRIC[metric]
    return Column(key, base.title + (f" [{label}]" if label else ""), base.higher_is_better, base.percent)


def _poison_rate(rec: Any, by_key: dict[str, Any]) -> float | None:
    """The attack's configured poison rate: from the record's attrs, else from its train record, else
    (old records of a default-rate attack) the installed attack plugin's default."""
    rate = (_get(rec, "attrs") or {}).get("poison_rate")
    if rate is not None:
        return rate
    deps = _get(rec, "deps") or []
    train = by_key.get(deps[0]) if deps else None
    if train is None:
        return None
    attack = (_get(train, "config") or {}).get("attack") or {}
    rate = (attack.get("config") or {}).get("poison_rate", (_get(train, "metrics") or {}).get("poison_rate"))
    if rate is None and attack.get("name"):  # records from before rates were recorded: the plugin's default
        try:
            from ..registry import get_class

            rate = get_class("attack", attack["name"]).Config().poison_rate
        except Exception:
            rate = None
    return rate


def _needs_oracle(purify: Any) -> bool:
    """Whether the defense of a purify record needs the real trigger (``needs: oracle_trigger``)."""
    ref = (_get(purify, "config") or {}).get("defense") or {}
    try:
        from ..registry import create

        return "oracle_trigger" in create("defense", ref["name"], **(ref.get("config") or {})).needs
    except Exception:
        return False


def _as_dict(rec: Any) -> dict[str, Any] | None:
    if rec is None or isinstance(rec, dict):
        return rec
    return {k: getattr(rec, k, None) for k in ("config", "versions", "attrs", "kind")}


def collect(records: Iterable[Any], sources: list[str] | None = None) -> list[dict[str, Any]]:
    """Fold evaluate records into cells, one per (data set, model, poison rate, attack, defense):
    metrics averaged over seeds, the statuses of unfinished evaluations, and the defense's cost
    (mean wall seconds and devices of the cell's purify jobs), whether its defense is an oracle,
    and what it ran with (``setup``, from its train and purify records, and per metric the
    evaluator that produced it, ``evaluator_of``; see :mod:`.setups`).

    ``sources`` (the name of each record's source, e.g. its records file, in the order of
    ``records``): cells of different sources stay apart, and each cell then has its ``source``."""
    records = list(records)
    if sources is not None and len(sources) != len(records):
        raise ValueError(f"{len(sources)} sources for {len(records)} records")
    by_key = {_get(r, "key"): r for r in records if _get(r, "key")}
    cells: dict[tuple, dict[str, Any]] = {}
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    costs: dict[tuple, list[tuple[float, str]]] = defaultdict(list)
    for rec, source in zip(records, sources or [None] * len(records)):
        kind, a = _get(rec, "kind"), _get(rec, "attrs") or {}
        if kind == "purify" and _get(rec, "status") == "done":
            costs[(source, a["dataset"], a["model"], a["attack"], a["defense"])].append(
                (_get(rec, "wall_s") or 0.0, _get(rec, "device") or "?"))
        if kind != "evaluate":
            continue
        deps = _get(rec, "deps") or []
        train, purify = (by_key.get(deps[i]) if len(deps) > i else None for i in (0, 1))
        revision = (_get(train, "versions") or {}).get("model") if train is not None else None
        # two revisions of one architecture never share a cell
        key = (source, a["dataset"], a["model"], _poison_rate(rec, by_key), a["attack"], a["defense"], revision)
        cell = cells.get(key)
        if cell is None:  # what the cell ran with: read once, from its first evaluation's upstream records
            cell = cells[key] = {
                "model_revision": revision, "dataset": key[1], "model": key[2], "poison_rate": key[3],
                "attack": key[4], "defense": key[5], "metrics": {}, "seeds": set(), "status": {},
                "oracle": purify is not None and _needs_oracle(purify),
                "setup": cell_setup(_as_dict(train), _as_dict(purify)), "evaluator_of": {},
                **({"source": key[0]} if key[0] is not None else {})}
        status = _get(rec, "status")
        label = a.get("evaluator", "?")
        plugin = ((_get(rec, "config") or {}).get("evaluator") or {}).get("name", label)
        if status == "done":
            cell["seeds"].add(a["seed"])
            produced_by = evaluator_setup(_as_dict(rec))
            for m, v in (_get(rec, "metrics") or {}).items():
                if isinstance(v, (int, float)):  # curves stay in the store
                    name = m if label == plugin else f"{m}@{label}"
                    values[key][name].append(float(v))
                    cell["evaluator_of"][name] = produced_by
        else:
            reason = (_get(rec, "error") or "").strip().splitlines()[-1:] or [""]
            cell["status"][label] = {"status": status, "reason": reason}
    out = []
    for key, cell in cells.items():
        cell["metrics"] = {m: mean(v) for m, v in values[key].items()}
        cell["seeds"] = sorted(cell["seeds"])
        spent = costs.get((key[0], key[1], key[2], key[4], key[5]), [])
        cell["cost"] = {"wall_s": mean(w for w, _ in spent) if spent else None,
                        "device": sorted({d for _, d in spent})}
        out.append(cell)
    return out


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


def _match(entries: list[dict], cell: dict | None, metric: str) -> tuple[tuple[float, str] | None, list[str]]:
    """The reported (value, source) of the first entry whose setup the cell is, else the differences
    from the setup of the cell's plain entry (one without its own attack/defense config)."""
    if not entries or cell is None:
        return None, []
    found, why = [], None
    for r in entries:
        setup = r.get("setup") if isinstance(r.get("setup"), dict) else None
        diff = differences(setup, cell.get("setup"), cell.get("evaluator_of", {}).get(metric), r)
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


def _order(defenses: list[str]) -> list[str]:
    return [d for d in FIRST_ROWS if d in defenses] + [d for d in defenses if d not in FIRST_ROWS]


def _entry(cell: dict | None, metric: str, reported: tuple[float, str] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"value": None, "status": None, "reported": None, "source": None, "best": False}
    if reported:
        entry["reported"], entry["source"] = reported
    if cell is None:
        return entry
    if metric in cell["metrics"]:
        entry["value"] = cell["metrics"][metric]
        return entry
    label = metric.partition("@")[2]
    statuses = sorted({s["status"] for ev, s in cell["status"].items() if not label or ev == label})
    entry["status"] = "/".join(statuses) or None
    return entry


def _mark_best(rows: list[dict], get) -> None:
    """Mark the best value of one column among the contenders: not the reference row, not an
    oracle row (ties: all of them)."""
    scored = [(row, get(row)) for row in rows if row["defense"] != REFERENCE_ROW and not row["oracle"]]
    scored = [(row, e) for row, e in scored if e is not None and e["value"] is not None]
    if len(scored) < 2:
        return
    col = column(scored[0][1]["metric"])
    best = (max if col.higher_is_better else min)(e["value"] for _, e in scored)
    for _, e in scored:
        e["best"] = abs(e["value"] - best) < 1e-12


def boards(records: Iterable[Any], reported: Iterable[dict] = (), sources: list[str] | None = None
           ) -> list[dict[str, Any]]:
    """The leaderboard as data: one board per (data set, model, poison rate), and per source
    when ``sources`` names each record's (see :func:`collect`; the board then has ``source``).

    Each board: ``dataset, model, poison_rate, seeds, attacks, columns`` (metric keys shown),
    ``rows`` (per defense: ``cells[attack][metric]`` and ``avg[metric]`` entries of
    ``{value, status, reported, source, best}``, ``cost_s`` (mean over attacks), ``cell_cost_s[attack]``,
    ``device``, ``oracle``), ``substitutes`` (attack -> what replaces its reference trigger) and ``notes``
    (why a cell has no number, and which fields keep a paper's number from a cell)."""
    cells = collect(records, sources)
    index_reported = _reported_index(reported)
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c.get("source"), c["dataset"], c["model"], c["poison_rate"], c["model_revision"]),
                          []).append(c)
    out = []
    for (source, dataset, model, rate, revision), group in groups.items():
        attacks = list(dict.fromkeys(c["attack"] for c in group))
        defenses = _order(list(dict.fromkeys(c["defense"] for c in group)))
        index = {(c["defense"], c["attack"]): c for c in group}
        present = {m for c in group for m in c["metrics"]}
        shown = [k for col in COLUMNS for k in [col.metric] + sorted(p for p in present
                                                                      if p.startswith(col.metric + "@"))
                 if k in present] or [c.metric for c in COLUMNS[:4]]
        rows, notes = [], []
        unmatched: dict[tuple[str, ...], list[str]] = {}
        for d in defenses:
            row: dict[str, Any] = {"defense": d, "cells": {}, "avg": {}, "cost_s": None, "device": [],
                                   "cell_cost_s": {}, "oracle": any(index[(d, a)]["oracle"] for a in attacks
                                                                    if (d, a) in index)}
            for atk in attacks:
                cell = index.get((d, atk))
                row["cells"][atk] = {}
                for m in shown:
                    entries = index_reported.get((dataset, model, float(rate) if rate is not None else None,
                                                  atk, d, m.partition("@")[0]), [])
                    rep, why = _match(entries, cell, m)
                    if why:
                        unmatched.setdefault(tuple(why), [])
                        if f"{atk}/{d}" not in unmatched[tuple(why)]:
                            unmatched[tuple(why)].append(f"{atk}/{d}")
                    row["cells"][atk][m] = {"metric": m, **_entry(cell, m, rep)}
                if cell is not None:
                    if cell["cost"]["wall_s"] is not None:
                        row.setdefault("_costs", []).append(cell["cost"]["wall_s"])
                        row["cell_cost_s"][atk] = cell["cost"]["wall_s"]
                    row["device"] = sorted(set(row["device"]) | set(cell["cost"]["device"]))
                    for ev, s in cell["status"].items():
                        notes.append(f"{d} / {atk} / {ev}: {s['status']}: {s['reason'][0] if s['reason'] else ''}"
                                     .rstrip(": "))
            for m in shown:
                vals = [row["cells"][atk][m]["value"] for atk in attacks]
                row["avg"][m] = {"metric": m, "value": mean(vals) if all(v is not None for v in vals) else None,
                                 "status": None, "reported": None, "source": None, "best": False}
            costs = row.pop("_costs", [])
            row["cost_s"] = mean(costs) if costs else None
            rows.append(row)
        for m in shown:
            for atk in attacks:
                _mark_best(rows, lambda r, atk=atk, m=m: r["cells"][atk][m])
            if len(attacks) > 1:
                _mark_best(rows, lambda r, m=m: r["avg"][m])
        substitutes = {c["attack"]: c["setup"]["attack_substitute"] for c in group
                       if c.get("setup") and c["setup"].get("attack_substitute")}
        for atk, what in substitutes.items():
            notes.append(f"{atk}{SUBSTITUTE_MARK}: a substitute trigger: {what}")
        for why, where in unmatched.items():
            notes.append(f"paper numbers not shown for {', '.join(where)}: different setup: {'; '.join(why)}")
        seeds = sorted({s for c in group for s in c["seeds"]})
        out.append({"substitutes": substitutes, "dataset": dataset, "model": model, "model_revision": revision,
                    "installed_revision": installed_revision(model), "poison_rate": rate, "seeds": seeds,
                    "attacks": attacks,
                    "columns": shown, "rows": rows, "notes": notes, **({"source": source} if source else {})})
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


def fmt_value(value: float | None, key: str) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.2f}" if column(key).percent else f"{value:.2f}"


def fmt_entry(entry: dict, fmt: str = "text") -> str:
    """One cell as text: the measured value (or the status), the best marked, the reported number beside it."""
    if entry["value"] is None:
        text = entry["status"] or "—"
    else:
        text = fmt_value(entry["value"], entry["metric"])
        if entry["best"]:
            text = f"**{text}**" if fmt == "markdown" else f"{text}*"
    if entry["reported"] is not None:
        text += f" ({fmt_value(entry['reported'], entry['metric'])})"
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
    headers = ["attack", "defense"] + [column(m).title for m in board["columns"]] + ["cost (s)", "device"]
    rows = []
    for atk in board["attacks"]:
        for row in board["rows"]:
            cost = row["cell_cost_s"].get(atk)
            rows.append([group_name(board, atk), row_name(row)] + [fmt_entry(row["cells"][atk][m], fmt) for m in board["columns"]]
                        + [f"{cost:.1f}" if cost is not None else "—", ", ".join(row["device"]) or "—"])
    return headers, rows


def table(board: dict, fmt: str = "text") -> tuple[list[str], list[list[str]]]:
    """Headers and rows of one board for tabulate."""
    groups = board["attacks"] + (["avg"] if len(board["attacks"]) > 1 else [])
    headers = ["defense"] + [f"{group_name(board, g)} {column(m).title}" for g in groups for m in board["columns"]]
    headers += ["cost (s)", "device"]
    rows = []
    for row in board["rows"]:
        line = [row_name(row)]
        for g in groups:
            source = row["avg"] if g == "avg" else row["cells"][g]
            line += [fmt_entry(source[m], fmt) for m in board["columns"]]
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
        return json.dumps(collect(records, sources), indent=2, sort_keys=True)
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
