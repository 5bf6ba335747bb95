"""What a hostile or careless record can do to the boards (issue 18, items 3 and 4): nothing.

Text from records (labels, devices, reasons, titles) is one plain line in every format, escaped for
markdown; numbers that are not finite show as their status; records that validate but hold odd
values where the boards look (configs that are not mappings, a string poison rate in a schema-1
record, a number beyond the float range, a cell without an attack) render.
"""

from __future__ import annotations

import json
import re

import pytest
from test_leaderboard import ev, purify
from test_leaderboard_html import Tables

from backdoor_harness.leaderboard.plots import curves, file_stem
from backdoor_harness.leaderboard.render import boards, md, plain, render, table
from backdoor_harness.store import Cell, JobRecord

#: every way a label could break out of its cell, its line or the page
HOSTILE = {"defense": "a|b", "attack": "<script>alert(1)</script>", "dataset": "# head",
           "device": "[x](http://evil)\n| forged | row |",
           "reason": "Traceback\nValueError: bad | x | y | # not a heading \x1b[31mred\x1b[0m [y](http://evil2)\x07"}
#: C0, DEL, C1 and the Unicode line and paragraph separators, ANSI sequences: what must never reach the output
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def hostile_records() -> list[JobRecord]:
    h = HOSTILE
    recs = [ev(h["defense"], h["attack"], 0, {"asr": 0.5, "clean_acc": 0.9}, dataset=h["dataset"], deps=["t", "p1"]),
            ev("none", h["attack"], 0, {"asr": 0.9, "clean_acc": 0.9}, dataset=h["dataset"], deps=["t", "p0"]),
            ev("\x1b[2Jft", h["attack"], 0, {}, status="failed", dataset=h["dataset"], deps=["t", "p2"])]
    recs[2] = recs[2].model_copy(update={"error": h["reason"]})
    recs += [purify(h["defense"], h["attack"], 1.0, device=h["device"], key="p1"),
             purify("none", h["attack"], 0.1, device="cpu\x1b]0;title\x07", key="p0")]
    return [r.model_copy(update={"attrs": r.attrs.model_copy(update={"dataset": h["dataset"]})}) for r in recs]


def unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_markdown_board_escapes_every_text_from_the_records():
    out = render(hostile_records(), "markdown", reported=[])
    assert not CONTROL.search(out) and "\x1b" not in out
    lines = out.splitlines()
    # the title: the leading # of the data set escaped, so only the board's own heading is one
    assert lines[0].startswith("### \\# head / m / poison rate 10%")
    assert [n for n, line in enumerate(lines) if line.lstrip().startswith("#")] == [0]
    # the table: a header, its rule and one row per defense, each with exactly its columns
    rows = [line for line in lines if line.startswith("|")]
    assert len(rows) == 2 + 3
    assert {unescaped_pipes(line) for line in rows} == {len(table(boards(hostile_records(), [])[0])[0]) + 1}
    assert any(line.startswith("| a\\|b ") for line in rows)
    assert "<script>" not in out and "\\<script\\>alert(1)\\</script\\>" in out
    assert "[x](" not in out and "\\[x\\](http://evil)" in out
    assert "\\[x\\](http://evil) \\| forged \\| row \\|" in out  # the device: one cell
    # the failed cell's reason (its error's last line): one note line, its pipes, links and colours gone
    notes = [line for line in lines if line.startswith("- ")]
    assert notes == ["- ft / \\<script\\>alert(1)\\</script\\> / asr: failed: ValueError: bad \\| x \\| y \\| "
                     "# not a heading red \\[y\\](http://evil2)"]
    assert len(lines) == 1 + 1 + len(rows) + 1 + len(notes) + 1 + 1  # title, blank, table, blank, notes, blank, legend


@pytest.mark.parametrize("long", [False, True])
def test_text_board_is_plain_lines_without_escape_sequences(long):
    out = render(hostile_records(), "text", reported=[], long=long)
    assert not CONTROL.search(out) and "\x1b" not in out
    lines = out.splitlines()
    assert lines[0].startswith("# head / m / poison rate 10%")
    rule = next(n for n, line in enumerate(lines) if set(line) <= {"-", " "} and line)
    body = lines[rule + 1:lines.index("", rule)]
    assert len(body) == 3  # one line per defense (per attack and defense when long): nothing split a row
    assert any("a|b" in line for line in body) and any(" ft " in f" {line} " for line in body)
    assert "[x](http://evil) | forged | row |" in out
    # the failed cell's reason: one note line in the wide form; by default wrapped at spaces to 100 columns
    note = ("- ft / <script>alert(1)</script> / asr: failed: ValueError: bad | x | y | # not a heading red "
            "[y](http://evil2)")
    assert note in render(hostile_records(), "text", reported=[], long=long, width=0).splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("- ft / "))
    assert " ".join(line.strip() for line in lines[start:start + 2]) == note and len(lines[start]) <= 100


def test_html_page_escapes_text_in_elements_and_attributes():
    recs = hostile_records()
    html = render(recs, "html", reported=[])
    assert "<script>alert" not in html and html.count("<script>") == 1
    assert "\x1b" not in html and not CONTROL.search(html.replace("\n", ""))
    tables = Tables(html)
    assert [r[0] for r in tables.tables[0]] == ["none", "a|b", "ft"]
    # the failed cell's reason sits in a title attribute: quoted, escaped, one line
    assert tables.titles[0][2][1] == ("ft / <script>alert(1)</script> / asr: failed: ValueError: bad | x | y | "
                                      "# not a heading red [y](http://evil2)")
    assert 'title="ft / &lt;script&gt;alert(1)&lt;/script&gt; / asr' in html


@pytest.mark.parametrize(("text", "escaped"), [
    ("a|b", "a\\|b"), ("<b>", "\\<b\\>"), ("# h", "\\# h"), ("  ## h", "  \\## h"), ("- item", "\\- item"),
    ("1. item", "1\\. item"), ("[x](y)", "\\[x\\](y)"), ("*b* `c` ~s~", "\\*b\\* \\`c\\` \\~s\\~"),
    ("a\\b", "a\\\\b"), ("&lt;", "\\&lt;"), ("_i_", "\\_i\\_"), ("tiny_cnn x86_64", "tiny_cnn x86_64"),
    ("a__b_", "a__b\\_"), ("line\nbreak\r\n", "line break  "), ("\x1b[31mred\x1b[0m", "red"), (None, "—")])
def test_md_escapes_what_markdown_would_read(text, escaped):
    assert md(text) == escaped


def test_plain_drops_controls_and_breaks_lines_into_spaces():
    assert plain("a\x00b\x7fc\x85d\u2028e\u2029f\tg") == "abc d e f g"
    assert plain("\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\ \x9b2J\u202egnp.exe") == "link gnp.exe"
    assert plain("\ud800") == "\ufffd" and plain(3) == "3"


def test_a_number_that_is_not_finite_shows_as_its_status_in_every_format():
    nan, inf = float("nan"), float("inf")
    recs = [ev("none", "a", 0, {"clean_acc": 0.9, "asr": 0.9}), ev("ft", "a", 0, {"clean_acc": nan, "asr": inf}),
            ev("pam", "a", 0, {"clean_acc": 0.8, "asr": -inf})]
    _, rows = table(boards(recs, [])[0], "markdown")
    shown = {r[0]: [v.strip("*") for v in r[1:3]] for r in rows}  # (the best marked: none is no baseline here)
    assert shown == {"none": ["90.00", "90.00"], "ft": ["nan", "inf"], "pam": ["80.00", "-inf"]}
    assert "- ft / a / clean_acc: nan: not a finite number" in render(recs, "markdown", reported=[])
    html = render(recs, "html", reported=[])  # the scatter plot used to raise on NaN (math.floor)
    assert [r[2:3] for r in Tables(html).tables[0]] == [["90.00"], ["inf"], ["-inf"]]
    assert [r[1] for r in Tables(html).tables[0]] == ["90.00", "nan", "80.00"]
    assert "nan" not in re.findall(r'data-v="([^"]*)"', html)
    cells = json.loads(render(recs, "json"), parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert {c["defense"]: c["metrics"]["clean_acc"] for c in cells}["ft"] == "nan"


def test_records_that_validate_with_odd_values_render():
    """The crashes of issue 18, item 3: a string poison rate (schema 1), an evaluation without an attack,
    configs that are not mappings, a number beyond the float range, a cost that is NaN."""
    train = JobRecord.model_validate({
        "schema_version": 1, "key": "t", "kind": "train", "label": "train", "status": "done",
        "attrs": {"dataset": "d", "seed": "0", "model": "m", "attack": "badnets"},
        "config": {"attack": {"name": "badnets", "config": {"poison_rate": "a lot"}}, "data": ["not", "a", "map"],
                   "model": "m", "recipe": 7}})
    p = purify("ft", "badnets", float("nan"), key="p", config=None).model_copy(update={"config": {"defense": "ft"}})
    recs = [train, p, ev("ft", "badnets", 0, {"asr": 10 ** 400, "clean_acc": True}, deps=["t", "p"], rate=None),
            ev("ft", None, 0, {"asr": 0.5}, evaluator="asr").model_copy(update={"config": {"evaluator": [1]}})]
    recs[-1] = recs[-1].model_copy(update={"attrs": Cell(dataset="d", seed=0, model="m", defense="ft")})
    for fmt in ("text", "markdown", "html", "json"):
        for long in (False, True):
            render(recs, fmt, long=long)
    (board,) = boards(recs, [])
    headers, rows = table(board)
    assert rows[0][1:3] == ["100.00", "inf"] and rows[0][-2] == "nan"  # C-Acc True = 1, ASR 10^400 = inf
    assert "— ASR" in headers  # the cell without an attack: its column group is a dash
    assert "poison rate ?" in render(recs, "text", reported=[])  # "a lot" is no rate


def test_curves_keep_only_finite_numbers_on_one_grid():
    def lmc(seed, t, asr, defense="ep"):
        return ev(defense, "a", seed, {"lmc_t": t, "lmc_asr": asr}, evaluator="lmc")

    recs = [lmc(0, [0, 0.5, 1], [0.9, 0.5, 0.1]), lmc(1, [0, 0.5, 1], [0.7, 0.3, 0.1]),
            lmc(2, [0, 0.25, 0.5, 1], [0.9, 0.8, 0.5, 0.1]),  # another grid: not averaged with the first
            lmc(3, [0, 0.5, 1], [0.9, float("nan"), 0.1]), lmc(4, [0, 0.5, 1], ["x", 0.5, 0.1]),
            lmc(5, [0, 0.5, 1], [0.9, 0.5]), lmc(0, [0, "a", 1], [0.9, 0.5, 0.1], defense="ft")]
    assert curves(recs) == {("d", "m", "a", "lmc_asr"): {"ep": ([0.0, 0.5, 1.0], pytest.approx([0.8, 0.4, 0.1]))}}


def test_plot_file_names_stay_plain_and_apart():
    assert file_stem("lmc_asr", "cifar10", "preactresnet18", "badnets") == "lmc_asr-cifar10-preactresnet18-badnets"
    assert file_stem("lmc_asr", "a/b", "m", "x") == "lmc_asr-a_b-m-x"  # as before
    odd = [file_stem("lmc_asr", d, "m", "x") for d in ("..\x00", "..\x01", "é", "../../etc", "x" * 400)]
    assert all(re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*", s) and len(s) <= 200 for s in odd)
    assert len(set(odd)) == len(odd)
