"""Boards a terminal can read (issue 19, item 4): a text board fits 100 columns by default.

A board whose one wide table is wider shows one block per attack and then the averages, with the
same cells as the wide table (compared cell by cell through :func:`boards`); ``--wide`` / width 0
keeps the wide table; a board too wide for any form still renders, its numbers whole; the
quickstart's shape fits. ``--explain`` reads the board aloud from its own numbers, finding the
attack-success and clean-accuracy columns by their metadata alone.
"""

from __future__ import annotations

import itertools

import pytest
from test_leaderboard import ev, purify

from backdoor_harness.leaderboard.render import (AVG_HEADING, WIDTH, Block, boards, fmt_cost, fmt_entry, guide,
                                                 layout, long_table, render, row_name, table, tables)
from backdoor_harness.store import Cell, JobRecord, Metric, PluginInfo

DEVICE = "cpu (x86_64, 2 threads)"
#: the quickstart's board metrics, as its evaluators declare them
QUICKSTART = {"clean_acc": Metric(higher_is_better=True, title="C-Acc", board=0),
              "asr": Metric(higher_is_better=False, title="ASR", board=1),
              "robust_acc": Metric(higher_is_better=True, title="RA", board=2),
              "der": Metric(higher_is_better=True, title="DER", board=3)}
_keys = itertools.count()


def chain(attack, defense, metrics, info=QUICKSTART, device=DEVICE, substitute=None, wall_s=12.5, status="done"):
    """A train, a purify and an evaluate record of one cell, linked by keys; the evaluation's metric
    metadata ``info`` (what its evaluator declares)."""
    n = next(_keys)
    t, p, e = f"t{n}", f"p{n}", f"e{n}"
    train = JobRecord(kind="train", key=t, label="train", status="done",
                      attrs=Cell(dataset="d", model="m", attack=attack, seed=0, poison_rate=0.1),
                      config={"data": {"name": "d"}, "model": {"name": "m"}, "attack": {"name": attack, "config": {}}},
                      plugin=PluginInfo(name=attack, version="1", substitute=substitute))
    pur = purify(defense, attack, wall_s, device=device, key=p, deps=[t])
    evaluation = ev(defense, attack, 0, metrics, key=e, deps=[t, p], status=status)
    return [train, pur, evaluation.model_copy(update={"metric_info": dict(info)})]


#: the quickstart run's numbers (make quickstart, CPU): attack -> defense -> C-Acc, ASR, RA, DER
QS_NUMBERS = {"badnets": {"none": (0.5266, 0.9396, 0.0373, 0.5), "ep": (0.5137, 0.0653, 0.4969, 0.9307),
                          "ft": (0.5118, 0.9303, 0.0403, 0.4972)},
              "blended": {"none": (0.52, 0.9998, 0.0001, 0.5), "ep": (0.498, 0.0686, 0.4271, 0.9546),
                          "ft": (0.4988, 0.9998, 0.0002, 0.4894)}}


def quickstart_records() -> list[JobRecord]:
    """The quickstart's matrix: 2 attacks (blended on a substitute trigger) x 3 defenses (none, the
    baseline; ep, an oracle; ft), C-Acc/ASR/RA/DER, every purify on the same long device name."""
    recs = []
    for atk, row in QS_NUMBERS.items():
        for d, values in row.items():
            recs += chain(atk, d, dict(zip(QUICKSTART, values)),
                          substitute="seeded uniform-noise pattern" if atk == "blended" else None,
                          wall_s=0.2 if d == "none" else 12.5)
    return recs


#: four board metrics (the test leaderboard's own metadata)
FOUR = {"clean_acc": Metric(higher_is_better=True, title="C-Acc", board=0),
        "asr": Metric(higher_is_better=False, title="ASR", board=1),
        "robust_acc": Metric(higher_is_better=True, title="RA", board=2),
        "retune_asr": Metric(higher_is_better=False, title="P-ASR", board=4)}


def two_by_three() -> list[JobRecord]:
    """2 attacks x 3 defenses (none: the baseline; ft and fp contend for best) x 4 metrics; ft/a failed."""
    recs = []
    for i, atk in enumerate(("badnets", "blended")):
        for j, d in enumerate(("none", "ft", "fp")):
            values = {m: round(0.1 + 0.07 * i + 0.11 * j + 0.05 * k, 4) for k, m in enumerate(FOUR)}
            failed = (atk, d) == ("badnets", "ft")
            recs += chain(atk, d, {} if failed else values, info=FOUR, status="failed" if failed else "done")
    return recs


def widest(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def metric_cells(blocks: list[Block], board: dict) -> list[list[str]]:
    """Per defense: every metric cell of the blocks, attack after attack (then the averages)."""
    m = len(board["columns"])
    return [[cell for b in blocks for cell in b.rows[r][1:1 + m]] for r in range(len(board["rows"]))]


def test_a_wide_text_board_shows_a_block_per_attack_and_one_of_averages_within_100_columns():
    recs = two_by_three()
    (board,) = boards(recs, [])
    wide_headers, wide_rows = table(board, "text")
    assert widest(tables([Block(None, wide_headers, wide_rows)])) > WIDTH  # the board this is about

    blocks, said = layout(board, "text", WIDTH)
    assert [b.heading for b in blocks] == ["attack badnets", "attack blended", AVG_HEADING]
    assert said == [f"device of every row: {DEVICE}"]  # said once, not in every row
    titles = [c.title for c in board["columns"]]
    for which, b in enumerate(blocks):
        assert b.headers == ["defense", *titles, "cost (s)"]
        for r, (shown, row) in enumerate(zip(b.rows, board["rows"])):  # cell by cell, from the board's data
            if which < 2:
                atk = board["attacks"][which]
                entries, cost = row["cells"][atk], row["cell_cost_s"].get(atk)
            else:
                entries, cost = row["avg"], row["cost_s"]
            assert shown == [row_name(row), *(fmt_entry(entries[c.metric]) for c in board["columns"]), fmt_cost(cost)]
    # the same values as the wide table, in its order (attack after attack, then the averages)
    m = 4 * 3
    assert metric_cells(blocks, board) == [r[1:1 + m] for r in wide_rows]
    assert any(cell.endswith("*") for r in metric_cells(blocks, board) for cell in r)  # best marks survive
    assert metric_cells(blocks, board)[1][:4] == ["failed"] * 4  # a failed cell shows its status

    out = render(recs, "text", reported=[])
    assert widest(out) <= WIDTH
    lines = out.splitlines()
    for b in blocks:  # each heading directly above its table
        first = tables([b]).splitlines()
        at = lines.index(b.heading)
        assert lines[at:at + len(first)] == first
    assert f"- device of every row: {DEVICE}" in lines
    assert "- ft / badnets / asr: failed: ValueError: why" in lines  # the board's own notes, unchanged
    assert DEVICE not in out.replace(f"- device of every row: {DEVICE}", "")


def test_the_wide_form_stays_behind_an_option(tmp_path, capsys):
    from backdoor_harness import cli

    recs = two_by_three()
    (board,) = boards(recs, [])
    old = render(recs, "text", width=0)
    headers, rows = table(board)
    assert tables([Block(None, headers, rows)]) in old and widest(old) > WIDTH
    assert "attack badnets" not in old

    path = tmp_path / "run.jsonl"
    path.write_text("".join(r.model_dump_json() + "\n" for r in recs))
    outputs = {}
    for flags in ([], ["--wide"], ["--width", "0"], ["--width", "300"], ["--width", "40"]):
        assert cli.main(["leaderboard", "--records", str(path), *flags]) == 0
        outputs[" ".join(flags)] = capsys.readouterr().out
    assert outputs["--wide"] == outputs["--width 0"] == old + "\n"
    assert tables([Block(None, headers, rows)]) in outputs["--width 300"]  # it fits 300 columns: not split
    assert outputs[""] == render(recs, "text") + "\n" and widest(outputs[""]) <= WIDTH
    assert widest(outputs["--width 40"]) > 40  # the blocks are wider than 40: the narrowest form, whole
    assert "attack badnets" in outputs["--width 40"]
    # markdown, for files, keeps the wide table unless given a width
    assert render(recs, "markdown", reported=[]) == render(recs, "markdown", reported=[], width=0)
    assert "#### attack blended" in render(recs, "markdown", reported=[], width=100)


@pytest.mark.parametrize("flags, says", [
    (["--wide", "--long"], "--wide and --long"),
    (["--width", "-1"], "--width -1"),
    (["--explain", "--format", "json"], "--explain goes with --format text or markdown"),
])
def test_contradictory_options_are_refused(tmp_path, capsys, flags, says):
    from backdoor_harness import cli

    path = tmp_path / "run.jsonl"
    path.write_text("".join(r.model_dump_json() + "\n" for r in quickstart_records()))
    assert cli.main(["leaderboard", "--records", str(path), *flags]) == 2
    assert says in capsys.readouterr().err


def test_marks_survive_every_form():
    """The best mark, the oracle mark, the verified mark and a paper's number in parentheses are the
    same cell text in the wide table, the blocks and the long form."""
    (board,) = boards(quickstart_records() + chain("badnets", "fp", dict(zip(QUICKSTART, (0.5, 0.95, 0.3, 0.7)))), [])
    ft = next(r for r in board["rows"] if r["defense"] == "ft")
    entry = ft["cells"]["badnets"]["asr"]
    entry.update(verified=True, reported=0.0142)
    assert entry["best"] and fmt_entry(entry) == "93.03*\u2713 (1.42)"
    blocks, _ = layout(board, "text", WIDTH)
    assert len(blocks) == 3
    row = next(r for r in blocks[0].rows if r[0] == "ft")
    assert row[2] == "93.03*\u2713 (1.42)"
    assert any(r[0] == "ep (oracle)" for r in blocks[0].rows)
    _, wide = table(board)
    assert next(r for r in wide if r[0] == "ft")[2] == "93.03*\u2713 (1.42)"
    _, long = long_table(board)
    assert next(r for r in long if r[:2] == ["badnets", "ft"])[3] == "93.03*\u2713 (1.42)"
    md_blocks, _ = layout(board, "markdown", WIDTH)
    assert next(r for r in md_blocks[0].rows if r[0] == "ft")[2] == "**93.03**\u2713 (1.42)"


def test_a_board_too_wide_for_any_form_renders_whole():
    many = {f"m{k}": Metric(higher_is_better=bool(k % 2), title=f"a metric with a long title {k}", board=k)
            for k in range(12)}
    recs = []
    for d in ("none", "ft", "fp"):
        recs += chain("badnets", d, {m: 0.123456 + k / 100 for k, m in enumerate(many)}, info=many)
    (board,) = boards(recs, [])
    for width in (WIDTH, 1):
        blocks, said = layout(board, "text", width)
        assert [b.heading for b in blocks] == ["attack badnets"]  # the narrowest form: no device column
        assert said == [f"device of every row: {DEVICE}"]
        out = render(recs, "text", reported=[], width=width)
        assert widest(out) > WIDTH
        for row in board["rows"]:  # every number whole
            for c in board["columns"]:
                assert fmt_entry(row["cells"]["badnets"][c.metric]) in out
        assert "a metric with a long title 11" in out
    # the long form asked for keeps its device column when that fits, and drops it when not
    assert layout(board, "text", 0, long=True)[0][0].headers[-1] == "device"
    blocks, said = layout(board, "text", WIDTH, long=True)
    assert blocks[0].headers[-1] == "cost (s)" and said
    (small,) = boards(quickstart_records(), [])
    blocks, said = layout(small, "text", WIDTH, long=True)
    assert blocks[0].headers[-1] == "device" and not said


def test_devices_that_differ_stay_in_each_block():
    recs = quickstart_records()
    recs += chain("badnets", "fp", dict(zip(QUICKSTART, (0.5, 0.5, 0.3, 0.7))), device="cuda (NVIDIA H200)")
    (board,) = boards(recs, [])
    blocks, said = layout(board, "text", WIDTH)
    assert said == [] and all(b.headers[-1] == "device" for b in blocks)
    assert next(r for r in blocks[0].rows if r[0] == "fp")[-1] == "cuda (NVIDIA H200)"


def test_the_quickstart_board_fits_100_columns():
    recs = quickstart_records()
    out = render(recs, "text", reported=[])
    assert widest(out) <= WIDTH
    (board,) = boards(recs, [])
    blocks, _ = layout(board, "text", WIDTH)
    assert [b.heading for b in blocks] == ["attack badnets", "attack blended\u2020", AVG_HEADING]
    assert [r[0] for r in blocks[0].rows] == ["none", "ep (oracle)", "ft"]
    assert blocks[0].rows[1][1:5] == ["51.37", "6.53", "49.69", "93.07"]
    # the substitute's note, wrapped at spaces, reads as it did
    note = "- blended\u2020: a substitute trigger: seeded uniform-noise pattern"
    assert note in out.splitlines()
    explained = render(recs, "text", reported=[], explain=True)
    assert explained.startswith(out) and widest(explained) <= WIDTH


def joined(text: str) -> list[str]:
    """The list items of a guide, each on one line again (wrapped lines start with two spaces)."""
    items: list[str] = []
    for line in text.splitlines():
        if line.startswith("  ") and items:
            items[-1] += " " + line.strip()
        elif line.startswith("- "):
            items.append(line)
    return items


def test_explain_reads_the_board_from_its_own_numbers():
    recs = quickstart_records()
    (board,) = boards(recs, [])
    text = guide([board], "text", WIDTH)
    assert widest(text) <= WIDTH
    assert joined(text) == [
        "- badnets: undefended ASR 93.96%; ep (oracle) brings it to 6.53% (C-Acc 52.66% -> 51.37%); "
        "ft leaves 93.03% (C-Acc 52.66% -> 51.18%)",
        "- blended\u2020: undefended ASR 99.98%; ep (oracle) brings it to 6.86% (C-Acc 52.00% -> 49.80%); "
        "ft leaves 99.98% (C-Acc 52.00% -> 49.88%)"]
    closing = " ".join(text.split("\n\n")[-1].split())
    assert closing.startswith("A defense works when its ASR falls to near the level of a model never trained "
                              "on poisoned data while its C-Acc stays near the undefended row's.")
    assert closing.count(". ") == 1 and closing.endswith(".")  # two sentences
    # the numbers are the board's: change one and the guide follows
    ft = next(r for r in board["rows"] if r["defense"] == "ft")
    ft["cells"]["badnets"]["asr"]["value"] = 0.4
    assert "ft brings it to 40.00%" in guide([board], "text")
    ft["cells"]["badnets"]["asr"].update(value=None, status="failed")
    assert "; ft: failed (C-Acc 52.66% -> 51.18%)" in guide([board], "text")
    # end to end: after the board and its legend
    out = render(recs, "text", reported=[], explain=True)
    assert out.index("What to look at first:") > out.index("best value of a column")


def test_explain_finds_its_columns_by_metadata_not_by_name():
    """The attack-success column: the first percentage where lower is better (not a lower-is-better
    count before it); the clean accuracy: the first where higher is better, by board position."""
    info = {"escape_t": Metric(higher_is_better=False, title="esc t", board=0, percent=False),
            "hits": Metric(higher_is_better=False, title="Hit rate", board=2),
            "kept": Metric(higher_is_better=True, title="Kept acc", board=1),
            "other": Metric(higher_is_better=True, title="Other", board=3)}
    recs = []
    for d, values in (("none", (0.9, 0.8, 0.7, 0.6)), ("ft", (0.3, 0.5, 0.65, 0.6)), ("fp", (0.2, 0.3, 0.6, 0.5))):
        recs += chain("x", d, dict(zip(info, values)), info=info)
    (line,) = joined(guide(boards(recs, []), "text"))
    assert line == ("- x: undefended Hit rate 80.00%; ft leaves 50.00% (Kept acc 70.00% -> 65.00%); "
                    "fp brings it to 30.00% (Kept acc 70.00% -> 60.00%)")


def test_explain_without_a_baseline_or_an_attack_success_column():
    recs = chain("x", "ft", dict(zip(QUICKSTART, (0.5, 0.2, 0.3, 0.7))))
    (line,) = joined(guide(boards(recs, []), "text"))
    assert line == ("- x: no undefended row to compare with (no defense that leaves the model as it is ran); "
                    "ft leaves 20.00% (C-Acc 50.00%)")
    higher = {"clean_acc": QUICKSTART["clean_acc"]}
    recs = chain("x", "none", {"clean_acc": 0.5}, info=higher)
    assert "no column here is a rate where lower is better" in guide(boards(recs, []), "text")
    # several boards: each named
    two = quickstart_records() + [r.model_copy(update={"attrs": r.attrs.model_copy(update={"poison_rate": 0.05})})
                                  for r in quickstart_records()]
    text = render(two, "text", reported=[], explain=True).split("What to look at first:")[1]
    assert "poison rate 10%" in text and "poison rate 5%" in text
