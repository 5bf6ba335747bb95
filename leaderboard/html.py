"""The leaderboard as one self-contained HTML page (``harness leaderboard --format html``).

Per board (data set, model, poison rate), the page shows:

* the table of :func:`render.table`: a row per defense; per attack (and averaged over the attacks) the
  metric columns; the defense's cost and device. The best value of a column is highlighted, the number
  the defense's paper reports sits small beside the measured one (its source in the tooltip), a cell that
  failed, was blocked or skipped shows that status (the reasons are listed under the table), a cell never
  run shows a dash. Clicking a header sorts the rows by that column (best first; again to reverse);
  cells without a number sort last either way.
* C-Acc against ASR: one point per (defense, attack) cell that has both, coloured per defense, shaped
  per attack.
* O-ASR against P-ASR (the ASR after purification and after retuning the purified model): two bars per
  (attack, defense) cell that has both; a defense whose P-ASR bar towers over its O-ASR bar only looks safe
  (superficial safety). Left out when no cell has a P-ASR.

Then the ASR curves of :func:`plots.curves` along the linear path between two models (LMC: from the
backdoored model, or the clean one for a ``*clean_to_purified*`` curve, at t = 0 to the purified one at t = 1), one
plot per (data set, model, attack, curve), a line per defense.

The page needs nothing from the network: the style, the plots (SVG drawn here) and the sorting script
are inline. Every text from the records is shown as plain text (:func:`render.plain`: no control
characters) and escaped, in elements and attributes alike; a plot draws only finite numbers, clipped to
its frame. :func:`page` is a pure function of its arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Any, Iterable

from .plots import curves
from .render import (DASH, LEGEND, VERIFIED_MARK, fmt_cost, fmt_value, group_name, non_finite, plain, title,
                     verified_legend)

#: colours of the defenses, in order of first appearance on the page: Tableau 10, then the rest of
#: Tableau 20 (so 20 defenses before a colour repeats)
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac", "#a0cbe8", "#ffbe7d", "#8cd17d", "#f1ce63", "#499894", "#ff9d9a", "#d4a6c8", "#d7b5a6",
           "#79706e", "#d37295")
#: marker shapes of the attacks in the scatter plots
SHAPES = ("circle", "square", "triangle", "diamond")
#: bar colours of the O-ASR / P-ASR plot
O_ASR_COLOUR, P_ASR_COLOUR = "#4e79a7", "#e15759"

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #222;
       margin: 1.5rem 2rem; }
h1 { font-size: 1.5rem; margin: 0 0 1rem; }
h2 { font-size: 1.15rem; margin: 2rem 0 .6rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: .25rem .5rem; border: 1px solid #e3e3e3; white-space: nowrap; }
thead th { background: #f4f5f7; font-weight: 600; }
th.grp { text-align: center; }
th[data-col] { cursor: pointer; user-select: none; position: relative; padding-right: .9em; }
th[data-col]:hover { background: #e8ecf3; }
th[data-col]::after { content: "\\25B2"; visibility: hidden; font-size: .65em; position: absolute; right: .2em;
                      bottom: .45em; }
th[data-col]:hover::after { visibility: visible; color: #aaa; }
th[aria-sort=ascending]::after { content: "\\25B2"; visibility: visible; color: #333; }
th[aria-sort=descending]::after { content: "\\25BC"; visibility: visible; color: #333; }
td { text-align: right; }
td.text { text-align: left; }
tbody tr:nth-child(even) { background: #fafafa; }
tbody tr:hover { background: #f0f4fa; }
.best { background: #dff3e4; font-weight: 700; }
td.status { color: #b3261e; font-style: italic; }
td.missing { color: #999; }
small.rep { color: #777; font-size: .8em; margin-left: .25em; cursor: help; }
.swatch { display: inline-block; width: .7em; height: .7em; border-radius: 2px; margin-right: .35em; }
ul.notes { color: #555; font-size: .9em; margin: .5rem 0; }
.plots { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; margin-top: 1rem; }
figure { margin: 0; max-width: 100%; overflow-x: auto; }
figcaption { font-weight: 600; font-size: .95em; margin-bottom: .2rem; }
.legend { font-size: .85em; color: #444; max-width: 460px; }
.legend span { margin-right: .9em; white-space: nowrap; }
svg { display: block; }
svg text { font-size: 11px; fill: #333; font-family: inherit; }
svg .grid { stroke: #e6e6e6; }
svg .frame { stroke: #888; fill: none; }
footer { margin-top: 2.5rem; padding-top: .6rem; border-top: 1px solid #ddd; color: #555; font-size: .9em; }
"""

#: sorting: a click on a header sorts the rows by that column: first best first (data-first), then reversed;
#: numbers from data-v, text from the cell; a cell without one sorts last either way
JS = """
function sortBy(th) {
  const table = th.closest("table"), col = +th.dataset.col, body = table.tBodies[0];
  const now = th.getAttribute("aria-sort");
  const dir = now ? (now === "ascending" ? "descending" : "ascending") : th.dataset.first;
  table.querySelectorAll("th[data-col]").forEach(h => h.removeAttribute("aria-sort"));
  th.setAttribute("aria-sort", dir);
  const key = tr => {
    const c = tr.cells[col];
    if (c.dataset.v !== undefined) return +c.dataset.v;
    return th.dataset.type === "text" && !c.classList.contains("missing") ? c.textContent : null;
  };
  const sign = dir === "ascending" ? 1 : -1;
  const rows = Array.from(body.rows).map(tr => [key(tr), tr]);
  rows.sort(([x], [y]) => (x === null || y === null) ? (x === null) - (y === null) : sign * ((x > y) - (x < y)));
  rows.forEach(([, tr]) => body.appendChild(tr));
}
document.querySelectorAll("th[data-col]").forEach(th => {
  th.tabIndex = 0;
  th.addEventListener("click", () => sortBy(th));
  th.addEventListener("keydown", e => { if (e.key === "Enter") sortBy(th); });
});
"""


def _e(text: Any) -> str:
    """Text for an element or a quoted attribute: plain (None: a dash), escaped."""
    return escape(plain(text), quote=True)


def _clip(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)


def _num(x: float) -> str:
    return f"{x:.1f}"


# ---------------------------------------------------------------- the table


def _groups(board: dict) -> list[tuple[str | None, bool]]:
    """The column groups: (attack, False) per attack, then ("avg", True) where there are several."""
    return [(a, False) for a in board["attacks"]] + ([("avg", True)] if len(board["attacks"]) > 1 else [])


def _entry_cell(entry: dict, reasons: list[str]) -> str:
    """A metric cell: the value (or status, or a dash), the reported number small beside it."""
    if entry["value"] is not None:
        attrs = f' data-v="{float(entry["value"])!r}"' + (' class="best"' if entry["best"] else "")
        text = fmt_value(entry["value"], entry["percent"])
        if entry.get("verified"):
            text += f'<small title="re-run by harness verify: it matched">{VERIFIED_MARK}</small>'

    elif entry["status"]:
        attrs = f' class="status" title="{_e("; ".join(reasons))}"'
        text = _e(entry["status"])
    else:
        attrs, text = ' class="missing"', DASH
    if entry["reported"] is not None:
        tip = _e(f"reported: {entry['source'] or 'source unknown'}")
        text += f'<small class="rep" title="{tip}">({fmt_value(entry["reported"], entry["percent"])})</small>'
    return f"<td{attrs}>{text}</td>"


def _row(board: dict, row: dict, colours: dict[str, str]) -> str:
    d = row["defense"]
    oracle = ' <small title="uses the real trigger: never marked best">(oracle)</small>' if row.get("oracle") else ""
    cells = [f'<td class="text"><span class="swatch" style="background:{colours[d]}"></span>{_e(d)}{oracle}</td>']
    for g, avg in _groups(board):
        entries = row["avg"] if avg else row["cells"][g]
        reasons = [] if avg else [n for n in board["notes"] if n.startswith(f"{d} / {g} / ")]
        cells += [_entry_cell(entries[c.metric], reasons) for c in board["columns"]]
    cost = row["cost_s"]
    if cost is None:
        cells.append(f'<td class="missing">{DASH}</td>')
    elif non_finite(cost):
        cells.append(f'<td class="status">{fmt_cost(cost)}</td>')
    else:
        cells.append(f'<td data-v="{float(cost)!r}">{fmt_cost(cost)}</td>')
    device = ", ".join(plain(d) for d in row["device"])
    cells.append(f'<td class="text">{_e(device)}</td>' if device else f'<td class="text missing">{DASH}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


def _sort_th(col: int, label: str, kind: str, first: str, attrs: str = "") -> str:
    return f'<th data-col="{col}" data-type="{kind}" data-first="{first}"{attrs}>{_e(label)}</th>'


def _head(board: dict) -> str:
    """Two header rows: the attack groups, then their metric columns; defense, cost and device span both."""
    groups, metrics = _groups(board), board["columns"]
    top = [_sort_th(0, "defense", "text", "ascending", ' rowspan="2"')]
    top += [f'<th class="grp" colspan="{len(metrics)}">{_e(g if avg else group_name(board, g))}</th>'
            for g, avg in groups]
    n = 1 + len(groups) * len(metrics)
    top += [_sort_th(n, "cost (s)", "num", "ascending", ' rowspan="2"'),
            _sort_th(n + 1, "device", "text", "ascending", ' rowspan="2"')]
    sub = []
    for i, (g, col) in enumerate((g, c) for g, _ in groups for c in metrics):
        better = "higher" if col.higher_is_better else "lower"
        first = "descending" if col.higher_is_better else "ascending"
        tip = f"{plain(g)} {plain(col.title)}: {better} is better"
        sub.append(_sort_th(1 + i, col.title, "num", first, f' title="{_e(tip)}"'))
    return f"<thead><tr>{''.join(top)}</tr><tr>{''.join(sub)}</tr></thead>"


def board_table(board: dict, colours: dict[str, str]) -> str:
    """One board's table, sortable by its headers."""
    body = "".join(_row(board, row, colours) for row in board["rows"])
    return f'<div class="scroll"><table class="board">{_head(board)}<tbody>{body}</tbody></table></div>'


# ---------------------------------------------------------------- plots


@dataclass(frozen=True)
class Frame:
    """A plot area: data ranges mapped onto an SVG of ``width`` x ``height`` pixels, ticks every ``*_step``."""

    x0: float
    x1: float
    x_step: float
    y0: float = 0.0
    y1: float = 100.0
    y_step: float = 20.0
    width: int = 420
    height: int = 300
    left: int = 48
    right: int = 14
    top: int = 12
    bottom: int = 42

    def x(self, v: float) -> float:
        return self.left + (v - self.x0) / (self.x1 - self.x0) * (self.width - self.left - self.right)

    def y(self, v: float) -> float:
        return self.height - self.bottom - (v - self.y0) / (self.y1 - self.y0) * (self.height - self.top - self.bottom)


def _ticks(lo: float, hi: float, step: float) -> list[float]:
    return [lo + i * step for i in range(int(round((hi - lo) / step)) + 1)]


def _tick_label(v: float) -> str:
    return f"{v:g}"


def _axes(f: Frame, x_label: str, y_label: str, x_ticks: bool = True) -> list[str]:
    """Grid lines, the frame, the ticks and the axis labels."""
    out = []
    for v in _ticks(f.y0, f.y1, f.y_step):
        y = _num(f.y(v))
        out.append(f'<line class="grid" x1="{f.left}" x2="{f.width - f.right}" y1="{y}" y2="{y}"/>')
        out.append(f'<text x="{f.left - 6}" y="{y}" text-anchor="end" dominant-baseline="middle">'
                   f"{_tick_label(v)}</text>")
    if x_ticks:
        for v in _ticks(f.x0, f.x1, f.x_step):
            x = _num(f.x(v))
            out.append(f'<line class="grid" x1="{x}" x2="{x}" y1="{f.top}" y2="{f.height - f.bottom}"/>')
            out.append(f'<text x="{x}" y="{f.height - f.bottom + 15}" text-anchor="middle">{_tick_label(v)}</text>')
        out.append(f'<text x="{_num((f.left + f.width - f.right) / 2)}" y="{f.height - 6}" '
                   f'text-anchor="middle">{_e(x_label)}</text>')
    mid = _num((f.top + f.height - f.bottom) / 2)
    out.append(f'<text transform="translate(13 {mid}) rotate(-90)" text-anchor="middle">{_e(y_label)}</text>')
    out.append(f'<rect class="frame" x="{f.left}" y="{f.top}" width="{f.width - f.left - f.right}" '
               f'height="{f.height - f.top - f.bottom}"/>')
    return out


def _svg(f: Frame, parts: list[str], label: str) -> str:
    return (f'<svg width="{f.width}" height="{f.height}" viewBox="0 0 {f.width} {f.height}" role="img" '
            f'aria-label="{_e(label)}">{"".join(parts)}</svg>')


def _figure(caption: str, svg: str, legend: str) -> str:
    return f'<figure><figcaption>{_e(caption)}</figcaption>{svg}<div class="legend">{legend}</div></figure>'


def _marker(shape: str, x: float, y: float, colour: str, tip: str, size: float = 4.5) -> str:
    """A point of the given shape, centred on (x, y), its tooltip ``tip``."""
    s = size
    if shape == "circle":
        tag, geometry = "circle", f'cx="{_num(x)}" cy="{_num(y)}" r="{s}"'
    elif shape == "square":
        tag, geometry = "rect", f'x="{_num(x - s)}" y="{_num(y - s)}" width="{2 * s}" height="{2 * s}"'
    else:
        corners = ((0, -1.2), (1.1, 0.8), (-1.1, 0.8)) if shape == "triangle" else ((0, -1.3), (1.3, 0), (0, 1.3),
                                                                                     (-1.3, 0))
        tag, geometry = "polygon", 'points="' + " ".join(f"{_num(x + dx * s)},{_num(y + dy * s)}"
                                                          for dx, dy in corners) + '"'
    return (f'<{tag} {geometry} fill="{colour}" fill-opacity="0.85" stroke="#fff" stroke-width="1">'
            f"<title>{_e(tip)}</title></{tag}>")


def _swatch(colour: str, label: str) -> str:
    return f'<span><i class="swatch" style="background:{colour}"></i>{_e(label)}</span>'


def _shape_key(shape: str, label: str) -> str:
    icon = _marker(shape, 6, 6, "#666", label, 4)
    return f'<span><svg width="12" height="12" style="display:inline;vertical-align:-1px;margin-right:.3em">' \
           f"{icon}</svg>{_e(label)}</span>"


def _pct(entry: dict) -> float | None:
    """A rate in %; None where there is no finite one."""
    if entry["value"] is None:
        return None
    value = 100 * entry["value"]
    return value if non_finite(value) is None else None


def scatter(board: dict, colours: dict[str, str]) -> str:
    """C-Acc (x) against ASR (y), one point per (defense, attack) cell with both; empty when none."""
    if not {"clean_acc", "asr"} <= {c.metric for c in board["columns"]}:
        return ""
    points = [(row["defense"], atk, _pct(row["cells"][atk]["clean_acc"]), _pct(row["cells"][atk]["asr"]))
              for row in board["rows"] for atk in board["attacks"]]
    points = [p for p in points if p[2] is not None and p[3] is not None]
    if not points:
        return ""
    lo = min(90, 10 * math.floor(_clip(min(p[2] for p in points), 0, 100) / 10))
    f = Frame(lo, 100, 10 if 100 - lo > 40 else 5 if 100 - lo > 10 else 2)
    shapes = {atk: SHAPES[i % len(SHAPES)] for i, atk in enumerate(board["attacks"])}
    parts = _axes(f, "C-Acc (%)", "ASR (%)")
    # a rate outside [0, 100] % (only an evaluator's bug makes one) sits on the frame's edge; its tooltip says it
    parts += [_marker(shapes[atk], f.x(_clip(x, lo, 100)), f.y(_clip(y, 0, 100)), colours[d],
                      f"{plain(d)} / {plain(atk)}: C-Acc {x:.2f}%, ASR {y:.2f}%") for d, atk, x, y in points]
    defenses = dict.fromkeys(d for d, *_ in points)
    legend = " ".join(_swatch(colours[d], d) for d in defenses) + "<br>"
    legend += " ".join(_shape_key(shapes[atk], atk) for atk in dict.fromkeys(a for _, a, *_ in points))
    return _figure("C-Acc vs ASR (upper left is bad, lower right is good)", _svg(f, parts, "C-Acc vs ASR"), legend)


def retune_bars(board: dict) -> str:
    """O-ASR and P-ASR side by side per (attack, defense) cell with both; empty when no cell has both."""
    if not {"asr", "retune_asr"} <= {c.metric for c in board["columns"]}:
        return ""
    pairs = [(atk, row["defense"], _pct(row["cells"][atk]["asr"]), _pct(row["cells"][atk]["retune_asr"]))
             for atk in board["attacks"] for row in board["rows"]]
    pairs = [p for p in pairs if p[2] is not None and p[3] is not None]
    if not pairs:
        return ""
    bar, gap, block_gap = 11, 10, 18  # pixels; no x axis: the bars are categories
    attacks = list(dict.fromkeys(p[0] for p in pairs))
    width = 48 + 14 + len(pairs) * (2 * bar + gap) + (len(attacks) - 1) * block_gap + gap
    names = min(5 * max(len(plain(p[1])) for p in pairs), 300)  # the height of the slanted defense names, about
    f = Frame(0, 1, 1, width=max(width, 260), height=250 + names, bottom=50 + names)
    parts = _axes(f, "", "ASR (%)", x_ticks=False)
    x, base = f.left + gap / 2, f.y(0)
    for i, (atk, d, o, p) in enumerate(pairs):
        if i and atk != pairs[i - 1][0]:
            x += block_gap
        for j, (v, colour, name) in enumerate(((o, O_ASR_COLOUR, "O-ASR"), (p, P_ASR_COLOUR, "P-ASR"))):
            top = f.y(_clip(v, 0, 100))
            tip = f"{plain(d)} / {plain(atk)}: {name} {v:.2f}%"
            parts.append(f'<rect x="{_num(x + j * bar)}" y="{_num(top)}" width="{bar - 1}" '
                         f'height="{_num(base - top)}" fill="{colour}"><title>{_e(tip)}</title></rect>')
        cx = _num(x + bar)
        parts.append(f'<text transform="translate({cx} {_num(base + 8)}) rotate(-50)" text-anchor="end" '
                     f'dominant-baseline="middle">{_e(d)}</text>')
        x += 2 * bar + gap
    parts += _attack_labels(f, pairs, bar, gap, block_gap)
    legend = _swatch(O_ASR_COLOUR, "O-ASR: after purification") + _swatch(P_ASR_COLOUR, "P-ASR: after retuning")
    return _figure("O-ASR vs P-ASR (superficial safety)", _svg(f, parts, "O-ASR vs P-ASR"), legend)


def _attack_labels(f: Frame, pairs: list[tuple], bar: int, gap: int, block_gap: int) -> list[str]:
    """The attack name under each block of bars, with a bracket spanning the block."""
    out, x, y = [], f.left + gap / 2, f.height - 14
    attacks = list(dict.fromkeys(p[0] for p in pairs))
    for atk in attacks:
        n = sum(1 for p in pairs if p[0] == atk)
        x1 = x + n * (2 * bar + gap) - gap
        out.append(f'<path d="M{_num(x)} {y - 10}v4H{_num(x1)}v-4" stroke="#999" fill="none"/>')
        out.append(f'<text x="{_num((x + x1) / 2)}" y="{y + 6}" text-anchor="middle" font-weight="600">'
                   f"{_e(atk)}</text>")
        x = x1 + gap + block_gap
    return out


def curve_plot(key: tuple, by_defense: dict[str, tuple[list[float], list[float]]], colours: dict[str, str]) -> str:
    """One curve (ASR in %, against t in [0, 1]), a line per defense."""
    dataset, model, attack, metric = key
    f = Frame(0, 1, 0.2)
    parts = _axes(f, "t (1 = purified)", f"{plain(metric)} (%)")
    for d, (ts, ys) in by_defense.items():  # finite numbers (plots.curves), clipped to the frame
        pts = [(f.x(_clip(t, 0, 1)), f.y(_clip(100 * y, 0, 100))) for t, y in zip(ts, ys)]
        parts.append(f'<polyline fill="none" stroke="{colours[d]}" stroke-width="2" points="'
                     + " ".join(f"{_num(x)},{_num(y)}" for x, y in pts) + '"/>')
        parts += [_marker("circle", x, y, colours[d], f"{plain(d)}: t {t:g}, {plain(metric)} {100 * v:.2f}%", 3)
                  for (x, y), t, v in zip(pts, ts, ys)]
    legend = " ".join(_swatch(colours[d], d) for d in by_defense)
    caption = f"{plain(dataset)} / {plain(model)} / {plain(attack)}: {plain(metric)} along the path"
    return _figure(caption, _svg(f, parts, caption), legend)


# ---------------------------------------------------------------- the page


def _colours(boards: list[dict], curve_sets: dict[tuple, dict]) -> dict[str, str]:
    names = [row["defense"] for b in boards for row in b["rows"]] + [d for by in curve_sets.values() for d in by]
    return {d: PALETTE[i % len(PALETTE)] for i, d in enumerate(dict.fromkeys(names))}


def board_section(board: dict, colours: dict[str, str]) -> str:
    notes = "".join(f"<li>{_e(n)}</li>" for n in board["notes"])
    plots = scatter(board, colours) + retune_bars(board)
    return (f"<section><h2>{_e(title(board))}</h2>{board_table(board, colours)}"
            + (f'<ul class="notes">{notes}</ul>' if notes else "")
            + (f'<div class="plots">{plots}</div>' if plots else "") + "</section>")


def _footer(generated: str | None, boards: list[dict]) -> str:
    legend = _e(LEGEND).format(best='<span class="best">like this</span>', verified=_e(verified_legend(boards)))
    more = ("Hover over a reported number for its source, over a failed, blocked or skipped cell for why (the "
            "reasons are also listed under the table); a dash: never run. Rates in %, means over seeds. Click a "
            "column header to sort the rows (best first; click again to reverse).")
    when = f"<br>Generated {_e(generated)}." if generated else ""
    return f"<footer>{legend[0].upper() + legend[1:]}. {more}{when}</footer>"


def page(boards: list[dict], records: Iterable[Any] = (), generated: str | None = None) -> str:
    """The whole page: the boards of :func:`render.boards`, the ASR curves of ``records``; ``generated``
    (when given) is printed in the footer."""
    curve_sets = {k: v for k, v in curves(records).items() if k[3].endswith("asr")}
    colours = _colours(boards, curve_sets)
    body = "".join(board_section(b, colours) for b in boards) or "<p>(no evaluation results yet)</p>"
    if curve_sets:
        plots = "".join(curve_plot(k, v, colours) for k, v in curve_sets.items())
        body += f'<section><h2>Linear mode connectivity: ASR along the path</h2><div class="plots">{plots}</div>' \
                "</section>"
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Backdoor-harness leaderboard</title><style>{CSS}</style></head>"
            f"<body><h1>Backdoor-harness leaderboard</h1>{body}{_footer(generated, boards)}"
            f"<script>{JS}</script></body></html>\n")
