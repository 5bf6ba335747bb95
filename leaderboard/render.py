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

A text board fits a width (:data:`WIDTH` columns unless told otherwise; a markdown board, meant for
files, keeps its one wide table unless given a width): when the wide table is wider, the board shows
one block per attack (the defenses, that attack's metrics, cost and device) and then one of the
averages, the device said once under the board when every row ran on the same one (:func:`layout`);
where even those are too wide, the narrowest of them, never cut. Its title, notes and legend are
wrapped to the width at spaces. :func:`guide` reads a board aloud for a new user: per attack, the
undefended row's attack success and what each defense leaves of it, from the columns' metadata.

Every text a record brings (labels, devices, reasons, titles, file names) is shown as plain
text: control characters (ANSI escapes, C0 and C1 controls, bidi overrides) are dropped and line
breaks become spaces (:func:`plain`) in every format, and the markdown board escapes what
markdown would read as syntax (:func:`md`). A metric whose value is not a finite number shows
as its status (``nan``, ``inf``, ``-inf``), never as a number; a field a record lacks, as a dash.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
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


#: libyaml's safe loader where PyYAML was built with it (the same documents, 7x faster on reported.yaml's 400 kB)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: shown for a field a record does not have
DASH = "—"
#: terminal escape sequences: CSI (ESC [ or the C1 CSI), OSC (to BEL or ST), and two-character ESC sequences
_ESCAPES = re.compile(r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?|\x1b\][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?|\x1b[ -~]?")
#: what breaks a line (anywhere: terminals, markdown, ``str.splitlines``): shown as a space
_BREAKS = re.compile("[\t\n\v\f\r\x1c-\x1e\x85\u2028\u2029]")
#: the other control characters (C0, DEL, C1) and the bidirectional overrides that reorder a line: dropped
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
#: halves of a UTF-16 pair alone (JSON can spell them; no UTF-8 text can hold them): shown as U+FFFD
_SURROGATES = re.compile("[\ud800-\udfff]")
#: what markdown reads as syntax anywhere in a line (``&``: an entity); ``_`` apart (see :func:`md`)
_MD_INLINE = re.compile(r"([\\`*\[\]<>|~&])")
#: a run of underscores
_UNDERSCORES = re.compile(r"_+")
#: what markdown reads as syntax at the start of a line: a heading, list item, setext underline or block quote
_MD_START = re.compile(r"^(\s*)(?:([#+=-])|(\d+)([.)]))")


def plain(text: Any) -> str:
    """A record's text as one plain line: escape sequences and control characters dropped, line
    breaks turned into spaces; None (a field the record lacks) is a dash."""
    if text is None:
        return DASH
    return _SURROGATES.sub("\ufffd", _CONTROLS.sub("", _BREAKS.sub(" ", _ESCAPES.sub("", str(text)))))


def md(text: Any) -> str:
    """A record's text for a markdown board (a table cell, a heading, a list item): :func:`plain`,
    with backslash, ``|``, ``<``, ``>``, brackets, emphasis and code marks (``_`` but inside a word),
    ``~`` and ``&`` escaped, and a leading ``#``, ``-``, ``+``, ``=`` or ``1.`` too, so it shows as
    written and never as a column, a tag, a link, a heading or a list."""
    escaped = _UNDERSCORES.sub(_underscores, _MD_INLINE.sub(r"\\\1", plain(text)))
    return _MD_START.sub(lambda m: m[1] + (f"\\{m[2]}" if m[2] else f"{m[3]}\\{m[4]}"), escaped, count=1)


def _underscores(m: re.Match) -> str:
    """A run of ``_`` escaped, unless it sits between two letters or digits (``tiny_cnn``), where
    markdown never reads it as emphasis (CommonMark's flanking rules for ``_``)."""
    s, i, j = m.string, m.start(), m.end()
    if 0 < i and j < len(s) and s[i - 1].isalnum() and s[j].isalnum():
        return m[0]
    return m[0].replace("_", "\\_")


def shown(text: Any, fmt: str = "text") -> str:
    """A record's text as the format ``fmt`` shows it: escaped for ``markdown``, else :func:`plain`
    (the HTML page escapes that itself)."""
    return md(text) if fmt == "markdown" else plain(text)


def non_finite(value: float) -> str | None:
    """What a number that is not finite shows instead (``nan``, ``inf``, ``-inf``); None for a finite one."""
    if math.isfinite(value):
        return None
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def column(key: str, info: Metric) -> Column:
    """The :class:`Column` of ``metric`` or ``metric@label`` (titled ``<title> [label]``)."""
    metric, _, label = key.partition("@")
    return Column(key, (info.title or metric) + (f" [{label}]" if label else ""), info.higher_is_better,
                  info.percent, info.board if info.board is not None else 0)


def column_title(col: Column, fmt: str = "text") -> str:
    """A column's title as ``fmt`` shows it: the metric's title and its evaluator's label (both
    from the records: :func:`shown`) in the brackets :func:`column` puts around it."""
    label = col.metric.partition("@")[2]
    suffix = f" [{label}]"
    if label and col.title.endswith(suffix):
        return f"{shown(col.title[:-len(suffix)], fmt)} [{shown(label, fmt)}]"
    return shown(col.title, fmt)


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
    for entry in yaml.load(Path(path).read_text(), Loader=_YAML_LOADER) or []:
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


def _entry(cell: ResultCell | None, col: Column, reported: tuple[float, str] | None,
           verified: bool = False) -> dict[str, Any]:
    entry: dict[str, Any] = {"metric": col.metric, "percent": col.percent, "value": None, "status": None,
                             "reported": None, "source": None, "best": False, "verified": verified}
    if reported:
        entry["reported"], entry["source"] = reported
    if cell is None:
        return entry
    if col.metric in cell.metrics:
        value = cell.metrics[col.metric]
        entry["status"] = non_finite(value)  # NaN or an infinity: shown as what it is, never as a number
        entry["value"] = value if entry["status"] is None else None
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


def is_verified(cell: ResultCell | None, verified: set[str] | frozenset[str]) -> bool:
    """Whether every done evaluation of ``cell`` was re-run and matched (``harness verify``)."""
    return bool(cell is not None and cell.evaluations and all(k in verified for k in cell.evaluations))


def boards(records: Iterable[Any], reported: Iterable[dict] = (), sources: list[str] | None = None,
           verified: set[str] | frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """The leaderboard as data: one board per (data set, model, poison rate), and per source
    when ``sources`` names each record's (see :func:`~backdoor_harness.results.collect`; the board
    then has ``source``).

    Each board: ``dataset, model, poison_rate, seeds, attacks, columns`` (the :class:`Column` s shown),
    ``rows`` (per defense: ``cells[attack][metric]`` and ``avg[metric]`` entries of
    ``{metric, percent, value, status, reported, source, best, verified}``, ``cost_s`` (mean over attacks),
    ``cell_cost_s[attack]``, ``device``, ``oracle``, ``baseline``), ``substitutes`` (attack -> what
    replaces its reference trigger) and ``notes`` (why a cell has no number, and which fields keep a
    paper's number from a cell). ``verified``: the evaluate keys that ``harness verify`` re-ran and
    found matching; a cell all of whose evaluations are among them is marked verified."""
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
                    row["cells"][atk][col.metric] = entry = _entry(cell, col, rep, is_verified(cell, verified))
                    if cell is not None and col.metric in cell.metrics and entry["status"]:
                        notes.append(f"{d} / {atk} / {col.metric}: {entry['status']}: not a finite number")
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


def title(board: dict, fmt: str = "text") -> str:
    """A board's title; the records' text in it as ``fmt`` shows it (:func:`shown`)."""
    rate = board["poison_rate"]
    rate_s = f"poison rate {100 * rate:g}%" if rate is not None else "poison rate ?"
    seeds = ", ".join(map(str, board["seeds"])) or "-"
    where = f"{shown(board['source'], fmt)}: " if board.get("source") else ""
    model = shown(board["model"], fmt)
    if board.get("installed_revision") is not None and board.get("model_revision") != board["installed_revision"]:
        model += (f" [architecture revision {shown(board.get('model_revision') or 1, fmt)}, not the installed "
                  f"{shown(board['installed_revision'], fmt)}]")
    return f"{where}{shown(board['dataset'], fmt)} / {model} / {rate_s} (seeds {seeds}; rates in %)"


def fmt_value(value: float | None, percent: bool = True) -> str:
    if value is None:
        return DASH
    return f"{100 * value:.2f}" if percent else f"{value:.2f}"


def fmt_cost(cost: float | None) -> str:
    """A cost in seconds (a dash: none recorded)."""
    return DASH if cost is None else f"{cost:.1f}"


def fmt_entry(entry: dict, fmt: str = "text") -> str:
    """One cell as text: the measured value (or the status), the best marked, the reported number beside it."""
    if entry["value"] is None:
        text = entry["status"] or "—"
    else:
        text = fmt_value(entry["value"], entry["percent"])
        if entry["best"]:
            text = f"**{text}**" if fmt == "markdown" else f"{text}*"
        if entry.get("verified"):
            text += VERIFIED_MARK
    if entry["reported"] is not None:
        text += f" ({fmt_value(entry['reported'], entry['percent'])})"
    return text


def group_name(board: dict, group: str | None, fmt: str = "text") -> str:
    """An attack's column group, marked when its trigger is a substitute (the note says which)."""
    return shown(group, fmt) + (SUBSTITUTE_MARK if group in board.get("substitutes", {}) else "")


def row_name(row: dict, fmt: str = "text") -> str:
    """A row's defense, marked when it is an oracle (it uses the real trigger: never "best")."""
    return shown(row["defense"], fmt) + (" (oracle)" if row.get("oracle") else "")


def devices(row: dict, fmt: str = "text") -> str:
    """The devices a row's purify jobs ran on (a dash: none recorded)."""
    return ", ".join(shown(d, fmt) for d in row["device"]) or DASH


def long_table(board: dict, fmt: str = "text", device: bool = True) -> tuple[list[str], list[list[str]]]:
    """One row per (attack, defense) cell, the metrics as columns (no averages): the board
    for few defenses and many attacks, e.g. an attack table with only ``none``. ``device``: False
    leaves out the device column (:func:`layout`, when every row's is the same)."""
    headers = ["attack", "defense"] + [column_title(c, fmt) for c in board["columns"]] + ["cost (s)"]
    headers += ["device"] if device else []
    rows = []
    for atk in board["attacks"]:
        for row in board["rows"]:
            rows.append([group_name(board, atk, fmt), row_name(row, fmt)]
                        + [fmt_entry(row["cells"][atk][c.metric], fmt) for c in board["columns"]]
                        + [fmt_cost(row["cell_cost_s"].get(atk))] + ([devices(row, fmt)] if device else []))
    return headers, rows


def attack_table(board: dict, which: int, fmt: str = "text", device: bool = True
                 ) -> tuple[list[str], list[list[str]]]:
    """One block of a board split per attack: the attack ``board["attacks"][which]`` (its cells'
    cost), or with ``which == len(board["attacks"])`` the averages over the attacks (the mean cost);
    a row per defense, the metrics as columns. ``device``: as for :func:`long_table`."""
    avg = which == len(board["attacks"])
    headers = ["defense"] + [column_title(c, fmt) for c in board["columns"]] + ["cost (s)"]
    headers += ["device"] if device else []
    rows = []
    for row in board["rows"]:
        source = row["avg"] if avg else row["cells"][board["attacks"][which]]
        cost = row["cost_s"] if avg else row["cell_cost_s"].get(board["attacks"][which])
        rows.append([row_name(row, fmt)] + [fmt_entry(source[c.metric], fmt) for c in board["columns"]]
                    + [fmt_cost(cost)] + ([devices(row, fmt)] if device else []))
    return headers, rows


def table(board: dict, fmt: str = "text") -> tuple[list[str], list[list[str]]]:
    """Headers and rows of one board for tabulate."""
    groups = board["attacks"] + (["avg"] if len(board["attacks"]) > 1 else [])
    names = [shown(g, fmt) if g == "avg" and i == len(board["attacks"]) else group_name(board, g, fmt)
             for i, g in enumerate(groups)]
    headers = ["defense"] + [f"{name} {column_title(c, fmt)}" for name in names for c in board["columns"]]
    headers += ["cost (s)", "device"]
    rows = []
    for row in board["rows"]:
        line = [row_name(row, fmt)]
        for i, g in enumerate(groups):
            source = row["avg"] if i == len(board["attacks"]) else row["cells"][g]
            line += [fmt_entry(source[c.metric], fmt) for c in board["columns"]]
        line += [fmt_cost(row["cost_s"]), devices(row, fmt)]
        rows.append(line)
    return headers, rows


#: the columns a text board fits by default (``harness leaderboard --width``)
WIDTH = 100
#: the heading of the block of averages when a board is split per attack
AVG_HEADING = "avg over the attacks"


@dataclass(frozen=True)
class Block:
    """One table of a board as a format shows it: its ``heading`` (None: the board's only table,
    under the board's title), its ``headers`` and ``rows`` of cells (text, as tabulate gets them)."""

    heading: str | None
    headers: list[str]
    rows: list[list[str]]


def common_device(board: dict) -> list[str] | None:
    """The devices every row of ``board`` ran on, when they are the same for all (None when not)."""
    seen = {tuple(row["device"]) for row in board["rows"]}
    return list(seen.pop()) if len(seen) == 1 else None


def per_attack(board: dict, fmt: str = "text", device: bool = True) -> list[Block]:
    """``board`` split per attack: a block per attack headed by its name (:func:`group_name`), then,
    with several attacks, the block of averages (:data:`AVG_HEADING`)."""
    n = len(board["attacks"])
    blocks = [Block("attack " + group_name(board, atk, fmt), *attack_table(board, i, fmt, device))
              for i, atk in enumerate(board["attacks"])]
    if n > 1:
        blocks.append(Block(AVG_HEADING, *attack_table(board, n, fmt, device)))
    return blocks


def tables(blocks: list[Block], fmt: str = "text") -> str:
    """The blocks as ``fmt`` shows them: each heading (a markdown sub-heading) above its table."""
    tablefmt = {"text": "simple", "markdown": "github"}[fmt]
    parts = []
    for b in blocks:
        table_text = tabulate(b.rows, headers=b.headers, tablefmt=tablefmt, disable_numparse=True)
        if b.heading is None:
            parts.append(table_text)
        else:
            parts.append((f"#### {b.heading}\n\n" if fmt == "markdown" else f"{b.heading}\n") + table_text)
    return "\n\n".join(parts)


def columns_of(text: str) -> int:
    """The columns ``text`` takes: its longest line."""
    return max((len(line) for line in text.splitlines()), default=0)


def layout(board: dict, fmt: str = "text", width: int = 0, long: bool = False) -> tuple[list[Block], list[str]]:
    """The tables of ``board`` within ``width`` columns, and the notes that layout adds to the board's.

    ``width`` 0: the one wide table (:func:`table`; :func:`long_table` with ``long``), whatever its
    width. Otherwise the first of two forms whose lines all fit: that table as it is; then the board
    per attack (:func:`per_attack`; with ``long``: the long table again), without the device column
    when every row's is the same (a note says it once). When neither fits, the narrower: never cut.
    (The long table is no fallback for a block too wide: it has a block's columns and the attack's.)"""
    if width <= 0:
        return [Block(None, *(long_table if long else table)(board, fmt))], []
    common = common_device(board)
    said = [f"device of every row: {', '.join(common) or DASH}"] if common is not None else []
    forms: list[tuple[list[Block], list[str]]] = [([Block(None, *(long_table if long else table)(board, fmt))], [])]
    if long:
        if common is not None:
            forms.append(([Block(None, *long_table(board, fmt, device=False))], said))
    else:
        forms.append((per_attack(board, fmt, device=common is None), said))
    widths = [columns_of(tables(blocks, fmt)) for blocks, _ in forms]
    fits = [n for n, w in enumerate(widths) if w <= width]
    return forms[fits[0] if fits else widths.index(min(widths))]


def wrap(text: str, width: int, indent: str = "") -> str:
    """``text`` in lines of at most ``width`` columns (0: as it is), broken at spaces only, so no
    word or number is ever cut (a longer word keeps its own line); later lines indented by ``indent``."""
    if width <= 0:
        return text
    return textwrap.fill(text, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def _percent(entry: dict | None) -> str:
    """A metric's value in a sentence: the number (``%`` when a percentage), else its status or ``not run``."""
    if entry is None or entry["value"] is None:
        return (entry or {}).get("status") or "not run"
    return fmt_value(entry["value"], entry["percent"]) + ("%" if entry["percent"] else "")


def guide(data: list[dict], fmt: str = "text", width: int = 0) -> str:
    """What a new user should look at first, read from the boards themselves: per attack, the
    undefended (baseline) row's attack success rate and what each other defense leaves of it (it
    "brings it to" a value at most half the undefended one), with the clean accuracy before and
    after. The attack success rate is the first column that is a percentage where lower is better,
    the clean accuracy the first where higher is better (the lowest board position): both known
    from the metrics' metadata alone. Then two sentences on how to read a board."""
    lines, asr_titles, acc_titles = [], [], []
    for board in data:
        asr = next((c for c in board["columns"] if not c.higher_is_better and c.percent), None)
        acc = next((c for c in board["columns"] if c.higher_is_better), None)
        if len(data) > 1:
            lines.append(f"{title(board, fmt)}:")
        if asr is None:
            lines.append("- no column here is a rate where lower is better (an attack success rate) to read")
            continue
        asr_title = column_title(asr, fmt)
        acc_title = column_title(acc, fmt) if acc is not None else None
        asr_titles.append(asr_title)
        if acc_title is not None:
            acc_titles.append(acc_title)
        base = next((r for r in board["rows"] if r["baseline"]), None)
        for atk in board["attacks"]:
            ref = base["cells"][atk][asr.metric] if base is not None else None
            ref_acc = base["cells"][atk][acc.metric] if base is not None and acc is not None else None
            if base is not None:
                said = [f"{group_name(board, atk, fmt)}: undefended {asr_title} {_percent(ref)}"]
            else:
                said = [f"{group_name(board, atk, fmt)}: no undefended row to compare with (no defense that "
                        f"leaves the model as it is ran)"]
            for row in board["rows"]:
                if row is base:
                    continue
                entry = row["cells"][atk][asr.metric]
                halved = (entry["value"] is not None and ref is not None and ref["value"] is not None
                          and entry["value"] <= ref["value"] / 2)
                if entry["value"] is None:
                    text = f"{row_name(row, fmt)}: {_percent(entry)}"
                else:
                    text = f"{row_name(row, fmt)} {'brings it to' if halved else 'leaves'} {_percent(entry)}"
                if acc is not None:
                    after = _percent(row["cells"][atk][acc.metric])
                    text += f" ({acc_title} {_percent(ref_acc)} -> {after})" if ref_acc is not None else \
                        f" ({acc_title} {after})"
                said.append(text)
            lines.append("- " + "; ".join(said))
    if not lines:
        return ""
    asr_name = " / ".join(dict.fromkeys(asr_titles)) or "attack success rate"
    acc_name = " / ".join(dict.fromkeys(acc_titles))
    keeps = f" while its {acc_name} stays near the undefended row's" if acc_name else ""
    closing = (f"A defense works when its {asr_name} falls to near the level of a model never trained on poisoned "
               f"data{keeps}. A row marked (oracle) knows the real trigger, so it shows what is possible rather "
               f"than what a defender could do.")
    head = "What to look at first:"
    body = [wrap(line, width, "  ") for line in lines]
    return "\n".join([head] + body) + "\n\n" + wrap(closing, width)


#: marks a value that ``harness verify`` re-ran here and found within tolerance
VERIFIED_MARK = "\u2713"
LEGEND = ("best value of a column among the defenses marked {best} (the undefended row and oracle rows, which "
          "use the real trigger, are never marked); an attack marked " + SUBSTITUTE_MARK + " runs a substitute "
          "trigger (the notes say what replaces the paper's); a number in parentheses is the one a paper reports for the "
          "cell, shown only where the cell ran that paper's setup (sources: leaderboard/reported.yaml, setups: "
          "leaderboard/setups.yaml; the notes under a board name the fields that differ); cost = mean wall seconds "
          "of the defense's purify jobs{verified}")


def verified_legend(data: list[dict]) -> str:
    """The legend's sentence on verified values, when a board marks one."""
    marked = any(e.get("verified") for b in data for r in b["rows"] for c in r["cells"].values() for e in c.values())
    return f"; a value marked {VERIFIED_MARK} was re-run by `harness verify` and matched" if marked else ""


def render(records: Iterable[Any], fmt: str = "text", reported: Iterable[dict] | None = None,
           long: bool = False, sources: list[str] | None = None,
           verified: set[str] | frozenset[str] = frozenset(), width: int | None = None,
           explain: bool = False) -> str:
    """Render records as ``text``, ``markdown``, ``html`` (one self-contained page) or ``json``
    (the cells of :func:`collect`). ``reported`` defaults to the numbers shipped in ``reported.yaml``;
    ``long``: text and markdown boards with a row per (attack, defense) (:func:`long_table`);
    ``sources``: each record's source name, boards kept apart per name (see :func:`boards`);
    ``verified``: evaluate keys re-run and matched by ``harness verify`` (their cells are marked);
    ``width``: the columns text and markdown boards fit (:func:`layout`; 0: the one wide table; None:
    :data:`WIDTH` for text, 0 for markdown); ``explain``: text and markdown end with :func:`guide`."""
    records = list(records)
    if fmt == "json":  # strict JSON: a number that is not finite is written as what it is, a string
        return json.dumps(_finite([c.model_dump(mode="json") for c in collect(records, sources)]), indent=2,
                          sort_keys=True, allow_nan=False)
    reported = load_reported() if reported is None else list(reported)
    data = boards(records, reported, sources, verified)
    if fmt == "html":
        from .html import page

        return page(data, records)
    if width is None:
        width = WIDTH if fmt == "text" else 0
    prose = width if fmt == "text" else 0  # markdown reflows its own paragraphs
    parts = []
    for board in data:
        blocks, said = layout(board, fmt, width, long)
        heading = f"### {title(board, fmt)}" if fmt == "markdown" else wrap(title(board, fmt), prose, "  ")
        part = heading + "\n\n" + tables(blocks, fmt)
        notes = said + board["notes"]
        if notes:
            part += "\n\n" + "\n".join(wrap(f"- {shown(n, fmt)}", prose, "  ") for n in notes)
        parts.append(part)
    if not parts:
        return "(no evaluation results yet)"
    legend = LEGEND.format(best="**bold**" if fmt == "markdown" else "with *", verified=verified_legend(data))
    out = "\n\n".join(parts) + "\n\n" + wrap(legend, prose)
    reading = guide(data, fmt, prose) if explain else ""
    return out + "\n\n" + reading if reading else out


def _finite(data: Any) -> Any:
    """``data`` with every float that is not finite replaced by its name (``nan``, ``inf``, ``-inf``)."""
    if isinstance(data, float):
        return non_finite(data) or data
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_finite(v) for v in data]
    return data
