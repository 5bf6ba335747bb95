"""README numbers that cannot go stale: the measured tables of README.md are generated from the
files they cite, and a check fails when the README and those files disagree.

    scripts/readme-tables [--check] [README.md]      (make readme-tables; run with the project's interpreter)

Each generated part of the README sits between two markers, and the opening one is its recipe::

    <!-- generated: KIND ARGS... -->
    ...generated content (replaced on every run)...
    <!-- end generated -->

Without ``--check`` the content between every pair of markers is rewritten in place (the markers
stay). With ``--check`` nothing is written: each block whose content differs from what its recipe
generates is printed as a short unified diff with the command that regenerates it. Exit status:
0 when every block agrees with its files, 1 when one differs (or its records are not the current
code's results of its matrix, see ``--config``), 2 for a bad marker (an unknown kind or option, a
file that is missing or unreadable, a block never closed), named as ``README.md:LINE``.

Paths in a recipe are relative to the README's folder (the repository root). Kinds:

``board --records FILE [--config MATRIX] [--long] [--drop COL,COL] [--explain] [--width N] [--heading N]``
    The markdown board(s) of the exported records in FILE, exactly as ``harness leaderboard
    --records FILE --format markdown [--long]`` renders them (the same record reader, the same
    verified marks, the shipped reported numbers, the legend; ``--explain``: with the reading
    guide; ``--width N``: a board wider than N characters laid out as narrower tables, as
    ``render``'s ``width`` does), with the columns whose header is one of ``--drop`` removed (``--drop 'cost
    (s),device'``). ``--heading N``: the board titles as level-N headings (default 3, as
    rendered), so they nest under the README's section.
``timing --records FILE [--config MATRIX]``
    Where the job time went, from the records' ``wall_s``: per job kind (prepare, train, purify,
    evaluate) the number of jobs, their summed seconds, share and min-max per job; the devices the
    records name; the UTC dates the jobs finished.
``clock --file JSON``
    The fresh-clone quickstart measurement (a ``ClockMeasurement`` JSON object): its phases
    with seconds and share of the total, and one sentence naming the total, the budget, the
    command, the machine, the date and the commit.
``gpu-queue --queue FILE [--kind KIND]``
    The GPU queue's state (``benchmarks/gpu-queue.yaml``, read as ``python -m
    backdoor_harness.gpu_queue check`` reads it): one sentence counting the items per status
    with the expected minutes of the queued ones on a device of KIND (default ``h200``), and
    whether any GPU run has been made with the queue; one row per group of items (a matrix
    config, or the benchmark commands) with its items per status and its queued minutes; then
    one row per done item (where its results are: records file, README section, date, device)
    and per blocked item (what it waits for: its ``blocked_by``, shortened), in queue order. A done item whose records file does not exist, or whose README section is not a
    heading of the README (its title, any level), is a bad marker.

``--config MATRIX`` (board and timing): the records must be exactly the current code's results of
that matrix. The matrix is expanded as ``harness validate`` expands it (without looking for its
data: a job key does not depend on it), and every expanded job must have a record in FILE with
status ``done`` under the same key; otherwise the check fails and lists the jobs (a changed key
means the code changed the job: a plugin or core version bump). Only the records of expanded
jobs are shown, so a stale record never reaches the README.

Everything generated is a function of the files alone: no clock, no machine facts but those the
files hold.

The files are read through a :class:`Sources` object (records, matrices, the clock, the queue:
the core's :class:`backdoor_harness.readme.FileSources`), so this module, like the rest of the
leaderboard, imports from the core only the record types; ``scripts/readme-tables`` hands it the
core's readers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import difflib
import functools
import re
import shlex
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from tabulate import tabulate

from backdoor_harness.errors import HarnessError
from backdoor_harness.store import JobRecord, write_atomic

from .render import DASH, load_reported, md, plain, render

#: an opening marker: its recipe is everything between ``generated:`` and ``-->``
OPEN = re.compile(r"^<!--\s*generated:(?P<recipe>.*?)-->\s*$")
#: the closing marker
CLOSE = re.compile(r"^<!--\s*end generated\s*-->\s*$")
#: a line that means to be a marker (checked against the two above, so a typo is an error, not prose)
MARKERISH = re.compile(r"^<!--\s*(generated\b|end generated\b)")
#: a code fence line: its fence (backticks or tildes) and what follows it
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
#: an ATX heading line: its title (without the closing hashes)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(?P<title>.*?)(?:[ \t]+#+)?[ \t]*$")
#: the most lines of diff printed per block
DIFF_LINES = 40
#: the most job labels a stale-records report lists
MAX_LABELS = 10
#: the job kinds in DAG order (the timing table's rows)
KINDS = ("prepare", "train", "purify", "evaluate")
#: the queue's statuses, in the order the gpu-queue block counts them
QUEUE_STATUSES = ("queued", "blocked", "done")
#: the most characters of a blocked item's ``blocked_by`` the gpu-queue table shows
BLOCKED_CHARS = 80


class MarkerError(HarnessError):
    """A bad marker or recipe, or a file it names that is missing or unreadable (exit status 2)."""


class StaleRecords(Exception):
    """The records of a ``--config`` block are not the current code's results of its matrix."""


class Sources(Protocol):
    """Where the blocks' files are read (the core's readers: :class:`backdoor_harness.readme.FileSources`).
    Each method takes the resolved path and raises HarnessError for a file it cannot read."""

    def records(self, path: Path) -> tuple[list[JobRecord], set[str]]:
        """An exported record file's records and its verified evaluate keys."""

    def matrix_jobs(self, path: Path) -> tuple[str, list[Any]]:
        """A matrix's name and the jobs it expands to (each with ``key`` and ``label``)."""

    def clock(self, path: Path) -> Any:
        """The quickstart clock: ``command``, ``date``, ``machine``, ``commit``, ``phases``,
        ``total_s``, ``budget_s``, ``notes`` and ``outside_s`` (seconds outside the phases)."""

    def queue(self, path: Path) -> Any:
        """The GPU queue: ``items``, each with ``id``, ``status``, ``expected_min``,
        ``blocked_by`` and ``results`` (``records``, ``readme``, ``date``, ``device``)."""


@dataclass(frozen=True)
class Context:
    """What a kind's generator reads besides its arguments.

    Attributes:
        root: the README's folder (recipe paths are relative to it).
        sources: the files' readers.
        headings: the titles of the README's headings (outside code blocks).
    """

    root: Path
    sources: Sources
    headings: frozenset[str]


@dataclass(frozen=True)
class Block:
    """One generated block of a README.

    Attributes:
        kind: the recipe's kind (``board``, ``timing``, ``clock``, ``gpu-queue``).
        args: the recipe's arguments after the kind (shell words).
        recipe: the opening marker's recipe as written (``KIND ARGS...``).
        line: the opening marker's line number (1-based).
        start: the index of the block's first content line (the one after the opening marker).
        end: the index of the closing marker's line.
    """

    kind: str
    args: tuple[str, ...]
    recipe: str
    line: int
    start: int
    end: int


# ---------------------------------------------------------------- the clock


def clock_markdown(m: Any) -> str:
    """The clock's phases as a table (seconds, share of the total) and the sentence that names it."""
    rows = [[md(name), f"{s:.1f}", _share(s, m.total_s)] for name, s in m.phases.items()]
    if m.outside_s:  # more than the phases' rounding
        rows.append(["(outside the phases)", f"{m.outside_s:.1f}", _share(m.outside_s, m.total_s)])
    rows.append(["total", f"{m.total_s:.1f}", "100.0%"])
    table = tabulate(rows, headers=["phase", "seconds", "share"], tablefmt="github", disable_numparse=True)
    text = (f"{table}\n\nTotal: {m.total_s:.1f} s (budget {m.budget_s:.1f} s), {_code(m.command)}, "
            f"on {md(m.machine)}, {m.date.isoformat()}, commit {_code(m.commit)}.")
    if m.notes:
        text += f"\n\n{md(m.notes)}"
    return text


def _share(part: float, total: float) -> str:
    return f"{100 * part / total:.1f}%"


def _code(text: str) -> str:
    """``text`` as a markdown code span (fenced with more backticks than it holds in a row)."""
    text = plain(text)
    fence = "`" * (max((len(r) for r in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


# ---------------------------------------------------------------- records and matrices


def matrix_records(records: list[JobRecord], matrix: tuple[str, list[Any]], records_file: str,
                   matrix_arg: str) -> list[JobRecord]:
    """The records of the jobs of ``matrix`` (its name and expanded jobs; in the records' order),
    or StaleRecords listing the jobs that have no ``done`` record under their current key."""
    name, jobs = matrix
    by_key = {r.key: r for r in records}
    by_label: dict[str, list[JobRecord]] = defaultdict(list)
    for r in records:
        by_label[r.label].append(r)
    problems = []
    for job in jobs:
        rec = by_key.get(job.key)
        if rec is not None and rec.status == "done":
            continue
        if rec is not None:
            problems.append(f"{job.label}: recorded {rec.status}")
        elif by_label.get(job.label):
            other = by_label[job.label][0]
            problems.append(f"{job.label}: recorded under key {other.key}, the code now makes it {job.key}")
        else:
            problems.append(f"{job.label}: no record")
    if problems:
        shown = problems[:MAX_LABELS]
        more = f"\n    (and {len(problems) - MAX_LABELS} more)" if len(problems) > MAX_LABELS else ""
        workdir = f"runs/{name}"
        raise StaleRecords(
            f"{records_file} is not the current code's results of {matrix_arg}: {len(problems)} of its "
            f"{len(jobs)} jobs have no done record under their current key:\n    " + "\n    ".join(shown) + more
            + f"\n  The code changed the jobs of this matrix (a plugin or core version bump), or the run did not "
              f"finish: rerun `harness run {matrix_arg} --workdir {workdir}` and `harness export --workdir "
              f"{workdir} --out {records_file}`, then regenerate.")
    wanted = {j.key for j in jobs}
    return [r for r in records if r.key in wanted]


# ---------------------------------------------------------------- the kinds


class _Parser(argparse.ArgumentParser):
    """An argument parser whose every complaint is a MarkerError (never an exit)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise MarkerError(message)

    def exit(self, status: int = 0, message: str | None = None):
        raise MarkerError(message or f"exit {status}")


def _parser(kind: str) -> _Parser:
    p = _Parser(prog=kind, add_help=False, allow_abbrev=False)
    if kind in ("board", "timing"):
        p.add_argument("--records", required=True)
        p.add_argument("--config")
    if kind == "board":
        p.add_argument("--long", action="store_true")
        p.add_argument("--drop", default="")
        p.add_argument("--explain", action="store_true")
        p.add_argument("--width", type=_width)
        p.add_argument("--heading", type=int, default=3, choices=range(1, 7))
    if kind == "clock":
        p.add_argument("--file", required=True)
    if kind == "gpu-queue":
        p.add_argument("--queue", required=True)
        p.add_argument("--kind", default="h200")
    return p


def _width(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


_width.__name__ = "width"  # what argparse calls it in its complaint


def _path(root: Path, name: str, what: str) -> Path:
    path = root / name
    if not path.is_file():
        raise MarkerError(f"{what} {name}: no such file (paths are relative to the README's folder, {root})")
    return path


def _records_for(args: argparse.Namespace, ctx: Context) -> tuple[list[JobRecord], set[str]]:
    records, verified = ctx.sources.records(_path(ctx.root, args.records, "--records"))
    if args.config:
        jobs = ctx.sources.matrix_jobs(_path(ctx.root, args.config, "--config"))
        records = matrix_records(records, jobs, args.records, args.config)
    return records, verified


@functools.lru_cache(maxsize=1)
def _reported() -> tuple[dict, ...]:
    """The shipped reported numbers (what ``render`` shows by default), read once per process."""
    return tuple(load_reported())


def board_markdown(args: argparse.Namespace, ctx: Context) -> str:
    records, verified = _records_for(args, ctx)
    text = render(records, "markdown", list(_reported()), long=args.long, verified=verified, width=args.width,
                  explain=args.explain)
    drop = [c.strip() for c in args.drop.split(",") if c.strip()]
    if drop:
        text = drop_columns(text, drop)
    if args.heading != 3:
        text = re.sub(r"^### ", "#" * args.heading + " ", text, flags=re.MULTILINE)
    return text


def timing_markdown(args: argparse.Namespace, ctx: Context) -> str:
    """Where the job time of the records went: per kind, the devices, the dates."""
    records, _ = _records_for(args, ctx)
    if not records:
        raise MarkerError(f"--records {args.records}: no records to time")
    by_kind: dict[str, list[Any]] = defaultdict(list)
    for r in records:
        by_kind[r.kind].append(r)
    kinds = [k for k in KINDS if k in by_kind] + sorted(set(by_kind) - set(KINDS))
    total = sum(r.wall_s for r in records if r.wall_s is not None)
    rows = []
    for kind in kinds:
        walls = [r.wall_s for r in by_kind[kind] if r.wall_s is not None]
        spent = sum(walls)
        span = DASH if not walls else (f"{min(walls):.1f}" if len(walls) == 1 else f"{min(walls):.1f}–{max(walls):.1f}")
        rows.append([md(kind), str(len(by_kind[kind])), f"{spent:.1f}", _share(spent, total) if total else DASH, span])
    rows.append(["all", str(len(records)), f"{total:.1f}", "100.0%" if total else DASH, ""])
    table = tabulate(rows, headers=["job kind", "jobs", "seconds", "share", "per job (s)"], tablefmt="github",
                     disable_numparse=True)
    lines = [table, ""]
    devices = sorted({r.device for r in records if r.device})
    days = sorted({dt.datetime.fromtimestamp(r.finished, dt.timezone.utc).date().isoformat()
                   for r in records if r.finished is not None})
    facts = [f"Summed job wall time {total:.1f} s ({total / 60:.1f} min)"]
    facts.append(f"on {'; '.join(md(d) for d in devices)}" if devices else "on a device the records do not name")
    if days:
        facts.append(f"finished {days[0]}" if len(days) == 1 else f"finished {days[0]} to {days[-1]}")
        facts[-1] += " (UTC)"
    sentence = ", ".join(facts) + "."
    untimed = sum(r.wall_s is None for r in records)
    if untimed:
        sentence += f" {untimed} record(s) have no wall time."
    statuses = defaultdict(int)
    for r in records:
        if r.status != "done":
            statuses[r.status] += 1
    if statuses:
        sentence += " Not done: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) + "."
    lines.append(sentence)
    return "\n".join(lines)


def clock_from_args(args: argparse.Namespace, ctx: Context) -> str:
    return clock_markdown(ctx.sources.clock(_path(ctx.root, args.file, "--file")))


def _short(text: str, limit: int = BLOCKED_CHARS) -> str:
    """``text``'s first clause (up to its first ``;``) when that is short enough, else its first
    words up to ``limit`` characters and an ellipsis."""
    text = " ".join(plain(text).split())
    first = text.split("; ", 1)[0]
    if len(first) <= limit:
        return first
    cut = text[:limit + 1].rsplit(" ", 1)[0] if " " in text[:limit + 1] else text[:limit]
    return cut.rstrip(" ,;:(") + "…"


def _minutes(value: float) -> str:
    """Minutes as the queue writes them (``4``, ``6.5``), a sum's float noise rounded away."""
    return f"{round(value, 2):g}"


def _group(item: Any) -> str:
    """The part of the queue an item belongs to: its matrix config, or the speed benchmarks."""
    return _code(item.matrix) if item.matrix else "benchmarks (commands)"


def queue_markdown(args: argparse.Namespace, ctx: Context) -> str:
    """The GPU queue's state: a count, one row per group of items (a matrix config, or the
    benchmark commands) with its items per status and the expected minutes of its queued ones,
    then one row per item that is not simply queued (done: where its results are; blocked: what
    it waits for)."""
    queue = ctx.sources.queue(_path(ctx.root, args.queue, "--queue"))
    device = md(args.kind).upper()
    rows, devices, dates = [], set(), set()
    groups: dict[str, dict[str, Any]] = {}
    for item in queue.items:
        minutes = item.expected_min.get(args.kind)
        g = groups.setdefault(_group(item), {s: 0 for s in QUEUE_STATUSES} | {"min": 0.0, "unknown": 0})
        g[item.status] += 1
        if item.status == "queued":
            if minutes is None:
                g["unknown"] += 1
            else:
                g["min"] += minutes
        if item.status == "done":
            where = []
            for r in item.results:
                if not (ctx.root / r.records).is_file():
                    raise MarkerError(f"--queue {args.queue}: item {item.id!r} is done, but its records file "
                                      f"{r.records} does not exist (paths are from the repository root)")
                title = (r.readme or "").strip().lstrip("#").strip()
                if r.readme is not None and title not in ctx.headings:
                    raise MarkerError(f"--queue {args.queue}: item {item.id!r} is done, but the README has no "
                                      f"section {r.readme!r} (its results.readme is a heading's title)")
                section = f" in “{md(title)}”" if r.readme is not None else ""
                where.append(f"{_code(r.records)}{section}, {r.date.isoformat()}, {md(r.device)}")
                devices.add(r.device)
                dates.add(r.date)
            note = "; ".join(where)
        elif item.status == "blocked":
            note = md(_short(item.blocked_by or ""))
        else:
            continue
        rows.append([md(item.id), item.status, DASH if minutes is None else _minutes(minutes), note])
    counts = {s: [i for i in queue.items if i.status == s] for s in QUEUE_STATUSES}
    queued = [i.expected_min[args.kind] for i in counts["queued"] if args.kind in i.expected_min]
    without = len(counts["queued"]) - len(queued)
    sentence = (f"{len(queue.items)} items: {len(counts['queued'])} queued ({_minutes(sum(queued))} min expected on "
                f"the {device}" + (f"; {without} of them without an estimate for it" if without else "") +
                f"), {len(counts['blocked'])} blocked, {len(counts['done'])} done.")
    if counts["done"]:
        span = min(dates).isoformat() if len(dates) == 1 else f"{min(dates).isoformat()} to {max(dates).isoformat()}"
        sentence += f" Run with this queue: {span}, on {'; '.join(md(d) for d in sorted(devices))}."
    else:
        sentence += " No item is done: no GPU run has been made with this queue yet."
    if not groups:
        return sentence
    by_group = tabulate([[name, sum(g[s] for s in QUEUE_STATUSES), *(g[s] for s in QUEUE_STATUSES),
                          _minutes(g["min"]) + (f" (+{g['unknown']} without)" if g["unknown"] else "")]
                         for name, g in groups.items()],
                        headers=["items of", "items", *QUEUE_STATUSES, f"queued, {device} min"],
                        tablefmt="github", disable_numparse=True)
    out = f"{sentence}\n\n{by_group}"
    if rows:
        out += "\n\n" + tabulate(rows, headers=["item", "status", f"{device} min",
                                                "results (done) or waits for (blocked)"],
                                  tablefmt="github", disable_numparse=True)
    return out


GENERATORS = {"board": board_markdown, "timing": timing_markdown, "clock": clock_from_args,
              "gpu-queue": queue_markdown}
KIND_NAMES = tuple(GENERATORS)


# ---------------------------------------------------------------- markdown tables


def _cells(line: str) -> list[str]:
    """The cells of one markdown table line (``| a | b |``), their padding kept; a backslash
    escapes the character after it (``\\|`` is text, not a border)."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    cells, cur, i = [], [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            cur.append(body[i:i + 2])
            i += 2
            continue
        if ch == "|":
            cells.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    if "".join(cur).strip():
        cells.append("".join(cur))
    return cells


def drop_columns(text: str, names: Sequence[str]) -> str:
    """``text`` with the columns headed by one of ``names`` removed from every markdown table in
    it; a name no table has is a MarkerError (a typo would otherwise drop nothing)."""
    lines = text.split("\n")
    out: list[str] = []
    found: set[str] = set()
    keep: list[int] | None = None
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            keep = None
            out.append(line)
            continue
        cells = _cells(line)
        if keep is None:  # a table's header line
            headers = [c.strip() for c in cells]
            found.update(h for h in headers if h in names)
            keep = [j for j, h in enumerate(headers) if h not in names]
        out.append("|" + "|".join(cells[j] for j in keep if j < len(cells)) + "|")
    missing = [n for n in names if n not in found]
    if missing:
        raise MarkerError(f"--drop {','.join(missing)}: no such column in the board (its columns are the "
                          f"header cells, e.g. 'cost (s)', 'device')")
    return "\n".join(out)


# ---------------------------------------------------------------- blocks


def _fence(line: str, fence: str | None) -> str | None:
    """The code fence open after ``line`` (None: none), given the one open before it: a line of
    three or more backticks or tildes opens one, and one of the same character, at least as long
    and with nothing after it, closes it (CommonMark's fenced code blocks)."""
    m = FENCE.match(line)
    if fence is None:
        return m[1] if m else None
    if m and m[1][0] == fence[0] and len(m[1]) >= len(fence) and not m[2].strip():
        return None
    return fence


def code_lines(text: str) -> set[int]:
    """The indexes of the lines of ``text`` in fenced code blocks, their fences included."""
    inside, fence = set(), None
    for i, line in enumerate(text.split("\n")):
        after = _fence(line, fence)
        if fence is not None or after is not None:
            inside.add(i)
        fence = after
    return inside


def find_blocks(text: str, where: str) -> list[Block]:
    """The generated blocks of a README's text, or a MarkerError naming ``where:LINE``."""
    lines = text.split("\n")
    out: list[Block] = []
    opened: tuple[int, str] | None = None
    fence: str | None = None  # the fence of the code block the line is in (outside generated blocks)
    for i, line in enumerate(lines):
        if opened is None:
            fence = _fence(line, fence)
            if fence is not None or FENCE.match(line):  # a marker shown in a code block is an example
                continue
        if not MARKERISH.match(line.strip()):
            continue
        n = i + 1
        m_open, m_close = OPEN.match(line.strip()), CLOSE.match(line.strip())
        if m_open:
            if opened is not None:
                raise MarkerError(f"{where}:{opened[0] + 1}: the block opened here is not closed before the "
                                  f"next opening marker (line {n}); add `<!-- end generated -->` after its content")
            opened = (i, m_open["recipe"].strip())
        elif m_close:
            if opened is None:
                raise MarkerError(f"{where}:{n}: `<!-- end generated -->` with no opening `<!-- generated: KIND "
                                  f"ARGS... -->` before it")
            start, recipe = opened
            try:
                words = shlex.split(recipe)
            except ValueError as err:
                raise MarkerError(f"{where}:{start + 1}: the recipe `{recipe}` does not parse ({err})") from None
            if not words:
                raise MarkerError(f"{where}:{start + 1}: the marker names no kind (one of {', '.join(KIND_NAMES)})")
            out.append(Block(words[0], tuple(words[1:]), recipe, start + 1, start + 1, i))
            opened = None
        else:
            raise MarkerError(f"{where}:{n}: a malformed marker `{line.strip()[:80]}`; write "
                              f"`<!-- generated: KIND ARGS... -->` or `<!-- end generated -->` on a line of its own")
    if opened is not None:
        raise MarkerError(f"{where}:{opened[0] + 1}: the block opened here is never closed; add "
                          f"`<!-- end generated -->` after its content")
    return out


def headings(text: str) -> frozenset[str]:
    """The titles of ``text``'s ATX headings (``## Title``), those in fenced code blocks left out."""
    code = code_lines(text)
    return frozenset(m["title"] for i, line in enumerate(text.split("\n"))
                     if i not in code and (m := HEADING.match(line)))


def generate(block: Block, ctx: Context, where: str) -> str:
    """What ``block``'s recipe generates (without the markers): a MarkerError for a bad recipe or
    file (named ``where:LINE``), StaleRecords (its message prefixed the same way) for records that
    are not the current results of the recipe's matrix."""
    at = f"{where}:{block.line}"
    if block.kind not in GENERATORS:
        raise MarkerError(f"{at}: unknown kind {block.kind!r} in `<!-- generated: {block.recipe} -->` (kinds: "
                          f"{', '.join(KIND_NAMES)})")
    try:
        args = _parser(block.kind).parse_args(list(block.args))
        return GENERATORS[block.kind](args, ctx)
    except StaleRecords as err:
        raise StaleRecords(f"{at}: {err}") from None
    except HarnessError as err:
        raise MarkerError(f"{at}: {block.kind}: {err}") from None


def _content(generated: str) -> list[str]:
    """A block's content lines: the generated text between blank lines (so it stands apart from the markers)."""
    return ["", *generated.rstrip("\n").split("\n"), ""]


@dataclass
class Report:
    """What regenerating or checking one README found."""

    text: str  # the README regenerated (blocks that could not be generated keep their content)
    changed: list[str]  # a diff report per block whose content differs
    stale: list[str]  # a report per block whose records are not its matrix's current results


def _regen_command(path: Path) -> str:
    return f"scripts/readme-tables {path}   (make readme-tables for README.md)"


def process(path: Path, sources: Sources) -> Report:
    """Regenerate every block of the README at ``path`` in memory (nothing is written)."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MarkerError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise MarkerError(f"{path}: cannot be read ({err})") from None
    lines = text.split("\n")
    ctx = Context(path.parent, sources, headings(text))
    out: list[str] = []
    last = 0
    changed, stale = [], []
    for block in find_blocks(text, where):
        out += lines[last:block.start]
        old = lines[block.start:block.end]
        try:
            new = _content(generate(block, ctx, where))
        except StaleRecords as err:
            stale.append(str(err))
            new = old
        out += new
        last = block.end
        if new != old:
            diff = list(difflib.unified_diff(old, new, f"{where}:{block.line + 1} (in the README)",
                                             f"generated: {block.recipe}", n=1, lineterm=""))
            if len(diff) > DIFF_LINES:
                diff = diff[:DIFF_LINES] + [f"... ({len(diff) - DIFF_LINES} more diff lines)"]
            changed.append(f"{where}:{block.line}: the block `{block.kind}` differs from what its recipe "
                           f"generates:\n" + "\n".join(diff) + f"\n  regenerate: {_regen_command(path)}")
    out += lines[last:]
    return Report("\n".join(out), changed, stale)


def check(path: str | Path, sources: Sources) -> list[str]:
    """The problems of the README at ``path``: a report per block that differs from what its recipe
    generates, or whose records are not its matrix's current results (empty: every block agrees).
    A bad marker raises MarkerError."""
    report = process(Path(path), sources)
    return report.stale + report.changed


def regenerate(path: str | Path, sources: Sources) -> Report:
    """Rewrite the generated blocks of the README at ``path`` in place (only when one changed);
    a block whose records are stale keeps its content and is reported in ``stale``."""
    path = Path(path)
    report = process(path, sources)
    if report.changed:
        mode = path.stat().st_mode & 0o7777
        write_atomic(path, report.text)
        path.chmod(mode)  # the temporary file it renames was made private
    return report


def main(argv: Sequence[str] | None, sources: Sources) -> int:
    """``scripts/readme-tables``: regenerate (or with ``--check`` compare) a README's blocks,
    reading their files through ``sources``."""
    p = argparse.ArgumentParser(
        prog="readme-tables",
        description="Regenerate (or, with --check, compare) the generated blocks of a README: "
                    "<!-- generated: KIND ARGS... --> ... <!-- end generated -->.")
    p.add_argument("--check", action="store_true",
                   help="write nothing; print a diff per block that differs and exit 1 (0: all agree)")
    p.add_argument("readme", nargs="?", default="README.md", help="default README.md")
    args = p.parse_args(argv)
    path = Path(args.readme)
    try:
        if args.check:
            problems = check(path, sources)
            for problem in problems:
                print(problem + "\n")
            if problems:
                print(f"{path}: {len(problems)} generated block(s) disagree with their files", file=sys.stderr)
                return 1
            print(f"{path}: every generated block agrees with its files")
            return 0
        report = regenerate(path, sources)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for problem in report.stale:
        print(problem + "\n", file=sys.stderr)
    n = len(report.changed)
    print(f"{path}: {n} block(s) regenerated" if n else f"{path}: every generated block was up to date")
    if report.stale:
        print(f"{path}: {len(report.stale)} block(s) left as they were: their records are stale", file=sys.stderr)
        return 1
    return 0
