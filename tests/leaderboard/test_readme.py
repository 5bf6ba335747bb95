"""README numbers that cannot go stale (backdoor_harness.readme, scripts/readme-tables).

The first test is the drift test proper: the repository's README agrees with the record files its
generated blocks cite, and its measured results hold no hand-written table. The rest run the
generator on temporary READMEs with synthetic records of a tiny matrix (its jobs expanded, never run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, tiny_matrix, write_matrix

from backdoor_harness import cli
from backdoor_harness import readme
from backdoor_harness.matrix import expand, load_matrix
from backdoor_harness.store import jsonl_line, job_record

README = ROOT / "README.md"
SECTION = "## Measured results"

MATRIX = tiny_matrix("readme-test")
#: 2026-11-22 10:00 UTC, the synthetic jobs' first finish
T0 = 1795341600.0
WALL = {"train": 30.0, "purify": 4.0, "evaluate": 2.0}
VALUES = {("none", "clean_acc"): 0.52, ("none", "asr"): 0.95, ("ft", "clean_acc"): 0.5, ("ft", "asr"): 0.9}
DEVICE = "cpu (x86_64, 1 threads)"

CLOCK = {
    "command": "git clone https://example.org/backdoor-harness && cd backdoor-harness && make quickstart",
    "date": "2026-11-29",
    "machine": "2-core x86_64 VM, no GPU",
    "commit": "f4c9653",
    "phases": {"venv and install": 61.2, "data decoding": 8.4, "training": 151.0, "purification": 12.3,
               "evaluation": 9.9, "leaderboard": 2.1},
    "total_s": 246.1,
    "budget_s": 300,
    "notes": "a warm pip cache",
}


def records(matrix: Path, status: dict[str, str] | None = None) -> list:
    """One synthetic record per job of ``matrix``: done (or ``status[label]``), fixed wall times,
    finish times an hour apart from T0, and metric values from VALUES."""
    out = []
    for i, job in enumerate(expand(load_matrix(matrix, check_data=False))):
        metrics = {m: VALUES.get((job.cell.defense, m), 0.4) for m in job.metric_info}
        rec = job_record(job, (status or {}).get(job.label, "done"), metrics=metrics, device=DEVICE,
                         wall_s=WALL[job.kind] + i, finished=T0 + 3600 * i)
        out.append(rec.model_copy(update={"started": T0 + 3600 * i - WALL[job.kind] - i}))
    return out


def write_records(path: Path, recs: list) -> Path:
    path.write_text("".join(jsonl_line(r) + "\n" for r in recs))
    return path


@pytest.fixture
def site(tmp_path):
    """A repository-like folder: the tiny matrix, its records (every job done) and a README."""
    matrix = write_matrix(tmp_path, MATRIX)
    write_records(tmp_path / "run.jsonl", records(matrix))
    return tmp_path


def readme_with(root: Path, *blocks: tuple[str, str]) -> Path:
    """``root/README.md`` holding each (recipe, content) as a generated block, between prose."""
    parts = ["# Title", "", "## Measured results", ""]
    for recipe, content in blocks:
        parts += ["Some prose.", "", f"<!-- generated: {recipe} -->", content, "<!-- end generated -->", ""]
    path = root / "README.md"
    path.write_text("\n".join(parts + ["## Next", "", "| a hand table elsewhere |", ""]))
    return path


def leaderboard_markdown(records_file: Path, *extra: str, capsys) -> str:
    """What `harness leaderboard --records FILE --format markdown` prints."""
    capsys.readouterr()
    assert cli.main(["leaderboard", "--records", str(records_file), "--format", "markdown", *extra]) == 0
    return capsys.readouterr().out.rstrip("\n")


def block_text(path: Path) -> list[str]:
    """The content of every generated block of ``path``, without the blank lines around it."""
    lines = path.read_text().split("\n")
    return ["\n".join(lines[b.start:b.end]).strip("\n") for b in readme.find_blocks("\n".join(lines), "x")]


# ---------------------------------------------------------------- the drift test proper


def hand_tables(text: str) -> list[int]:
    """The lines (1-based) of the README's measured-results section that are markdown table rows
    outside every generated block."""
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    assert start is not None, f"README.md has no {SECTION!r} section"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    generated = {i for b in readme.find_blocks(text, "README.md") for i in range(b.start - 1, b.end + 1)}
    generated |= readme.code_lines(text)  # a table shown as code is an example, not a result
    return [i + 1 for i in range(start, end) if lines[i].lstrip().startswith("|") and i not in generated]


def test_the_readme_agrees_with_its_record_files():
    text = README.read_text()
    rows = hand_tables(text)
    assert not rows, (f"README.md lines {rows[:10]}: a hand-written table in {SECTION!r}; generate it from its "
                      f"records (<!-- generated: board --records FILE ... --> ... <!-- end generated -->, "
                      f"see backdoor_harness.readme) or remove it")
    problems = readme.check(README)
    assert not problems, "\n\n".join(problems)


def test_a_hand_written_table_in_the_measured_results_is_found(site):
    path = readme_with(site, ("clock --file clock.json", ""))
    text = path.read_text().replace("Some prose.", "Some prose.\n\n| x | y |\n|---|---|\n| 1 | 2 |")
    assert hand_tables(text) == [7, 8, 9]
    assert hand_tables(path.read_text()) == []  # the table under "## Next" is not in the section
    fenced = text.replace("| x | y |", "```markdown\n| x | y |").replace("| 1 | 2 |", "| 1 | 2 |\n```")
    assert hand_tables(fenced) == []


def test_a_marker_in_a_code_block_is_an_example_not_a_block(site):
    text = ("# T\n\n```\n<!-- generated: table --records x -->\n```\n\n~~~~ md\n<!-- end generated -->\n~~~\n~~~~\n\n"
            "<!-- generated: clock --file c.json -->\n```\n<!-- end generated -->\n")
    [block] = readme.find_blocks(text, "README.md")
    assert (block.kind, block.line, block.end) == ("clock", 12, 13)  # a fence inside a block's old content is its content
    assert readme.code_lines(text[:text.index("\n\n<!-- generated: clock")]) == {2, 3, 4, 6, 7, 8, 9}


# ---------------------------------------------------------------- check and regenerate


def test_a_stale_block_is_reported_with_a_diff_and_left_alone_until_regenerated(site, capsys):
    expected = leaderboard_markdown(site / "run.jsonl", capsys=capsys)
    path = readme_with(site, ("board --records run.jsonl", "| old | table |\n|---|---|\n| ft | 99.00 |"))
    path.chmod(0o644)
    before = path.read_bytes()
    assert readme.main(["--check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:7: the block `board` differs" in out
    assert "-| ft | 99.00 |" in out and "+| none " in out
    assert f"regenerate: scripts/readme-tables {path}" in out
    assert path.read_bytes() == before

    assert readme.main([str(path)]) == 0
    assert "1 block(s) regenerated" in capsys.readouterr().out
    assert block_text(path) == [expected]  # exactly what `harness leaderboard --format markdown` prints
    assert path.stat().st_mode & 0o777 == 0o644  # rewritten in place, its mode kept
    assert "best value of a column" in expected  # the legend kept
    text = path.read_text()
    assert text.startswith("# Title\n") and text.endswith("| a hand table elsewhere |\n")  # the rest as it was
    assert readme.main(["--check", str(path)]) == 0
    assert readme.check(path) == []
    again = path.read_bytes()
    assert readme.main([str(path)]) == 0 and path.read_bytes() == again  # deterministic


def test_long_boards_drop_columns_and_nest_their_titles(site, capsys):
    full = leaderboard_markdown(site / "run.jsonl", "--long", capsys=capsys)
    path = readme_with(site, ("board --records run.jsonl --long --drop 'cost (s),device' --heading 4", ""))
    assert readme.main([str(path)]) == 0
    [got] = block_text(path)
    table = [line for line in got.split("\n") if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["attack", "defense", "C-Acc", "ASR"]
    assert len(table) == 2 + 2 and all(line.count("|") == 5 for line in table)
    full_table = [line for line in full.split("\n") if line.startswith("|")]
    for mine, theirs in zip(table, full_table):  # the kept cells are the rendered ones, padding and all
        assert theirs.startswith(mine)
    assert got.startswith("#### cifar10 / tiny_cnn / poison rate 10%") and "\n### " not in got
    assert "ft" in got and DEVICE not in got


def test_a_column_no_board_has_is_a_marker_error(site, capsys):
    path = readme_with(site, ("board --records run.jsonl --drop 'costs'", ""))
    assert readme.main(["--check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:7: board: --drop costs: no such column" in err


def test_drop_columns_keeps_escaped_pipes_in_a_cell():
    text = "### t\n\n| a    | b\\|c   | d |\n|------|--------|---|\n| 1\\|2 | x      | y |\n\nlegend"
    assert readme.drop_columns(text, ["d"]) == "### t\n\n| a    | b\\|c   |\n|------|--------|\n| 1\\|2 | x      |\n\nlegend"
    assert readme.drop_columns(text, ["b\\|c"]).split("\n")[4] == "| 1\\|2 | y |"


# ---------------------------------------------------------------- --config: the current code's results


def test_config_passes_for_the_matrix_s_current_results_and_hides_other_records(site, capsys):
    other = write_matrix(site, MATRIX.replace("{name: ft, config: {epochs: 1}}", "fst"), "other.yaml")
    stray = [r for r in records(other) if r.attrs.defense == "fst"]
    assert stray
    write_records(site / "run.jsonl", records(site / "matrix.yaml") + stray)
    path = readme_with(site, ("board --records run.jsonl --config matrix.yaml", ""),
                       ("board --records run.jsonl", ""))
    assert readme.main([str(path)]) == 0
    with_config, without = block_text(path)
    assert "| fst" not in with_config and "| fst" in without  # a record the matrix does not make never shows
    assert "| ft " in with_config
    assert readme.check(path) == []


def test_config_fails_for_a_missing_record_and_names_it(site, capsys):
    recs = [r for r in records(site / "matrix.yaml") if r.label != "evaluate cifar10/tiny_cnn/badnets/ft/asr/s0"]
    write_records(site / "run.jsonl", recs)
    path = readme_with(site, ("board --records run.jsonl --config matrix.yaml", ""))
    assert readme.main(["--check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:7: run.jsonl is not the current code's results of matrix.yaml: 1 of its 7 jobs" in out
    assert "evaluate cifar10/tiny_cnn/badnets/ft/asr/s0: no record" in out
    assert "harness run matrix.yaml --workdir runs/readme-test" in out
    assert "harness export --workdir runs/readme-test --out run.jsonl" in out
    # regenerating writes nothing into a stale block and fails the same way
    before = path.read_bytes()
    assert readme.main([str(path)]) == 1
    assert "no record" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_config_fails_when_the_code_changed_the_jobs(site, capsys):
    """Records of the old code: the matrix now makes other keys (here: ft's config changed, so its
    purify and evaluate keys did), and the labels of the changed jobs are listed."""
    write_matrix(site, MATRIX.replace("epochs: 1}}", "epochs: 2}}"))
    path = readme_with(site, ("timing --records run.jsonl --config matrix.yaml", ""))
    problems = readme.check(path)
    assert len(problems) == 1
    changed = [line.strip() for line in problems[0].split("\n") if "recorded under key" in line]
    assert [c.split(":")[0] for c in changed] == ["purify cifar10/tiny_cnn/badnets/ft/s0",
                                                  "evaluate cifar10/tiny_cnn/badnets/ft/clean_acc/s0",
                                                  "evaluate cifar10/tiny_cnn/badnets/ft/asr/s0"]
    assert "3 of its 7 jobs" in problems[0] and "a plugin or core version bump" in problems[0]


def test_config_fails_for_a_record_that_is_not_done(site):
    label = "purify cifar10/tiny_cnn/badnets/ft/s0"
    write_records(site / "run.jsonl", records(site / "matrix.yaml", {label: "failed"}))
    path = readme_with(site, ("board --records run.jsonl --config matrix.yaml", ""))
    [problem] = readme.check(path)
    assert f"{label}: recorded failed" in problem


def test_config_lists_at_most_ten_jobs(site):
    matrix = write_matrix(site, MATRIX.replace("seeds", "x") + "seeds: [0, 1, 2]\n")
    write_records(site / "run.jsonl", [])
    path = readme_with(site, ("board --records run.jsonl --config matrix.yaml", ""))
    [problem] = readme.check(path)
    assert len(expand(load_matrix(matrix, check_data=False))) == 21
    assert problem.count(": no record") == 10 and "(and 11 more)" in problem


# ---------------------------------------------------------------- bad markers


@pytest.mark.parametrize("body, line, message", [
    ("<!-- generated: table --records run.jsonl -->\n<!-- end generated -->", 3, "unknown kind 'table'"),
    ("<!-- generated: board --records run.jsonl --wide -->\n<!-- end generated -->", 3,
     "unrecognized arguments: --wide"),
    ("<!-- generated: board --long -->\n<!-- end generated -->", 3, "the following arguments are required: --records"),
    ("<!-- generated: board --records nowhere.jsonl -->\n<!-- end generated -->", 3,
     "--records nowhere.jsonl: no such file"),
    ("<!-- generated: board --records run.jsonl --config nowhere.yaml -->\n<!-- end generated -->", 3,
     "--config nowhere.yaml: no such file"),
    ("<!-- generated: clock --file nowhere.json -->\n<!-- end generated -->", 3, "--file nowhere.json: no such file"),
    ("text\n<!-- generated: clock --file c.json -->\n| x |", 4, "never closed"),
    ("<!-- generated: clock --file c.json -->\n<!-- generated: clock --file c.json -->\n<!-- end generated -->", 3,
     "not closed before the next opening marker (line 4)"),
    ("<!-- end generated -->", 3, "with no opening"),
    ("<!-- generated: clock --file c.json\n<!-- end generated -->", 3, "a malformed marker"),
    ("<!-- generated: -->\n<!-- end generated -->", 3, "names no kind"),
    ("<!-- generated: board --records 'run.jsonl -->\n<!-- end generated -->", 3, "does not parse"),
])
def test_bad_markers_name_the_readme_line_and_exit_2(site, capsys, body, line, message):
    path = site / "README.md"
    path.write_text(f"# Title\n\n{body}\n")
    before = path.read_bytes()
    for argv in (["--check", str(path)], [str(path)]):
        assert readme.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}:{line}: ") and message in err, err
        assert err.count("\n") == 1  # one message
    assert path.read_bytes() == before


def test_a_bad_record_file_or_matrix_is_named_with_the_readme_line(site, capsys):
    (site / "bad.jsonl").write_text("{not json\n")
    (site / "bad.yaml").write_text("datasets: []\n")
    path = readme_with(site, ("timing --records bad.jsonl", ""))
    assert readme.main(["--check", str(path)]) == 2
    assert f"{path}:7: timing: " in capsys.readouterr().err
    path = readme_with(site, ("board --records run.jsonl --config bad.yaml", ""))
    assert readme.main(["--check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:7: board: " in err and "bad.yaml" in err


# ---------------------------------------------------------------- timing and clock


def test_the_timing_block_says_where_the_job_time_went(site):
    path = readme_with(site, ("timing --records run.jsonl", ""))
    assert readme.main([str(path)]) == 0
    [got] = block_text(path)
    # jobs in expansion order: train 30+0; purify 4+1, 4+4; evaluate 2+2, 2+3, 2+5, 2+6
    assert got == (
        "| job kind   | jobs   | seconds   | share   | per job (s)   |\n"
        "|------------|--------|-----------|---------|---------------|\n"
        "| train      | 1      | 30.0      | 44.8%   | 30.0          |\n"
        "| purify     | 2      | 13.0      | 19.4%   | 5.0–8.0       |\n"
        "| evaluate   | 4      | 24.0      | 35.8%   | 4.0–8.0       |\n"
        "| all        | 7      | 67.0      | 100.0%  |               |\n"
        "\n"
        "Summed job wall time 67.0 s (1.1 min), on cpu (x86_64, 1 threads), finished 2026-11-22 (UTC).")


def test_the_timing_block_names_every_device_date_and_unfinished_job(site):
    recs = records(site / "matrix.yaml", {"evaluate cifar10/tiny_cnn/badnets/ft/asr/s0": "failed"})
    recs[1] = recs[1].model_copy(update={"device": "NVIDIA H200", "finished": T0 + 86400 * 2})
    recs[2] = recs[2].model_copy(update={"wall_s": None})
    write_records(site / "run.jsonl", recs)
    path = readme_with(site, ("timing --records run.jsonl", ""))
    assert readme.main([str(path)]) == 0
    last = block_text(path)[0].split("\n")[-1]
    assert last == ("Summed job wall time 63.0 s (1.1 min), on NVIDIA H200; cpu (x86_64, 1 threads), finished "
                    "2026-11-22 to 2026-11-24 (UTC). 1 record(s) have no wall time. Not done: 1 failed.")


def test_the_clock_block_renders_the_measurement(site, capsys):
    (site / "clock.json").write_text(json.dumps(CLOCK))
    path = readme_with(site, ("clock --file clock.json", "stale"))
    assert readme.main([str(path)]) == 0
    [got] = block_text(path)
    assert got == (
        "| phase                | seconds   | share   |\n"
        "|----------------------|-----------|---------|\n"
        "| venv and install     | 61.2      | 24.9%   |\n"
        "| data decoding        | 8.4       | 3.4%    |\n"
        "| training             | 151.0     | 61.4%   |\n"
        "| purification         | 12.3      | 5.0%    |\n"
        "| evaluation           | 9.9       | 4.0%    |\n"
        "| leaderboard          | 2.1       | 0.9%    |\n"
        "| (outside the phases) | 1.2       | 0.5%    |\n"
        "| total                | 246.1     | 100.0%  |\n"
        "\n"
        "Total: 246.1 s (budget 300.0 s), `git clone https://example.org/backdoor-harness && cd backdoor-harness && "
        "make quickstart`, on 2-core x86_64 VM, no GPU, 2026-11-29, commit `f4c9653`.\n"
        "\n"
        "a warm pip cache")
    # a total that is the phases' sum but for their rounding: no time outside them
    (site / "clock.json").write_text(json.dumps({**CLOCK, "total_s": 245.2, "notes": None}))
    assert readme.main([str(path)]) == 0
    [got] = block_text(path)
    assert "outside" not in got and "| total            | 245.2     | 100.0%  |" in got
    assert got.endswith("commit `f4c9653`.")


@pytest.mark.parametrize("change, message", [
    ({"total_s": 100.0}, "clock.json: the phases sum to 244.9 s, more than total_s 100.0 s; total_s is"),
    ({"phases": {}}, "phases"),
    ({"phases": {"training": -1}}, "not negative"),
    ({"date": "yesterday"}, "date"),
    ({"budget": 300}, "budget"),
])
def test_a_bad_clock_file_is_a_marker_error(site, capsys, change, message):
    (site / "clock.json").write_text(json.dumps({**CLOCK, **change}))
    path = readme_with(site, ("clock --file clock.json", ""))
    assert readme.main(["--check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:7: clock: " in err and message in err


def test_the_script_runs_the_generator_with_the_interpreter_it_is_given(site):
    (site / "clock.json").write_text(json.dumps(CLOCK))
    path = readme_with(site, ("clock --file clock.json", ""))
    script = [sys.executable, str(ROOT / "scripts" / "readme-tables")]
    run = subprocess.run([*script, "--check", str(path)], capture_output=True, text=True)
    assert run.returncode == 1 and "regenerate:" in run.stdout
    run = subprocess.run(script, capture_output=True, text=True, cwd=site)  # README.md by default
    assert run.returncode == 0 and "README.md: 1 block(s) regenerated" in run.stdout, run.stderr
    assert readme.check(path) == [] and "| total " in path.read_text()


def test_board_options_explain_and_width_are_render_s(site):
    from backdoor_harness.leaderboard.render import render
    from backdoor_harness.submission import read_records

    recs = read_records(site / "run.jsonl")
    path = readme_with(site, ("board --records run.jsonl --explain", ""), ("board --records run.jsonl --width 60", ""))
    assert readme.main([str(path)]) == 0
    explained, narrow = block_text(path)
    shipped = list(readme._reported())  # what render reads by default (parsed once)
    assert explained == render(recs, "markdown", shipped, explain=True)
    assert "What to look at first:" in explained
    assert narrow == render(recs, "markdown", shipped, width=60) != render(recs, "markdown", shipped)


def test_a_negative_width_is_a_marker_error(site, capsys):
    path = readme_with(site, ("board --records run.jsonl --width -3", ""))
    assert readme.main(["--check", str(path)]) == 2
    assert f"{path}:7: board: argument --width: invalid width value: '-3'" in capsys.readouterr().err
