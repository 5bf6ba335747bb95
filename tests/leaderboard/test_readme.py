"""README numbers that cannot go stale (backdoor_harness.leaderboard.readme, reading its files
through the core's backdoor_harness.readme.FileSources; scripts/readme-tables).

The first tests are the drift test proper: the repository's README agrees with the files its
generated blocks cite (the records, the clock, the GPU queue), and its measured results hold no
hand-written table. The rest run the generator on temporary READMEs with synthetic records of a
tiny matrix (its jobs expanded, never run) and synthetic GPU queues."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, tiny_matrix, write_matrix

from backdoor_harness import cli
from backdoor_harness.gpu_queue import DEFAULT_QUEUE, load_queue
from backdoor_harness.leaderboard import readme
from backdoor_harness.matrix import expand, load_matrix
from backdoor_harness.readme import FileSources
from backdoor_harness.store import jsonl_line, job_record

README = ROOT / "README.md"
SECTION = "## Measured results"
SOURCES = FileSources()

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


def main(argv: list[str]) -> int:
    """``scripts/readme-tables ARGV`` in this process (the generator with the core's readers)."""
    return readme.main(argv, SOURCES)


def check(path: Path) -> list[str]:
    return readme.check(path, SOURCES)


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
                      f"see backdoor_harness.leaderboard.readme) or remove it")
    problems = check(README)
    assert not problems, "\n\n".join(problems)


def test_the_readme_s_gpu_results_are_the_gpu_queue_s():
    """The "GPU results" section holds the queue's generated state (equal to what the queue file
    renders: the test above), and every done item's records file and README section exist."""
    text = README.read_text()
    lines = text.split("\n")
    [block] = [b for b in readme.find_blocks(text, "README.md") if b.kind == "gpu-queue"]
    assert block.args == ("--queue", DEFAULT_QUEUE, "--kind", "h200")
    above = [i for i in range(block.line) if lines[i].startswith("#")]
    assert lines[above[-1]] == "### GPU results", f"README.md:{block.line}: the gpu-queue block is not under it"
    assert any(lines[i] == SECTION for i in above), f"the GPU results are not under {SECTION!r}"
    titles = readme.headings(text)
    done = [i for i in load_queue(ROOT / DEFAULT_QUEUE).items if i.status == "done"]
    for item in done:
        for r in item.results:
            assert (ROOT / r.records).is_file(), f"{DEFAULT_QUEUE}: {item.id}: no records file {r.records}"
            assert r.readme is None or r.readme.lstrip("#").strip() in titles, (
                f"{DEFAULT_QUEUE}: {item.id}: README.md has no section {r.readme!r}")
    said = "No item is done: no GPU run has been made with this queue yet."
    assert (said in "\n".join(lines[block.start:block.end])) == (not done)


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
    assert main(["--check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:7: the block `board` differs" in out
    assert "-| ft | 99.00 |" in out and "+| none " in out
    assert f"regenerate: scripts/readme-tables {path}" in out
    assert path.read_bytes() == before

    assert main([str(path)]) == 0
    assert "1 block(s) regenerated" in capsys.readouterr().out
    assert block_text(path) == [expected]  # exactly what `harness leaderboard --format markdown` prints
    assert path.stat().st_mode & 0o777 == 0o644  # rewritten in place, its mode kept
    assert "best value of a column" in expected  # the legend kept
    text = path.read_text()
    assert text.startswith("# Title\n") and text.endswith("| a hand table elsewhere |\n")  # the rest as it was
    assert main(["--check", str(path)]) == 0
    assert check(path) == []
    again = path.read_bytes()
    assert main([str(path)]) == 0 and path.read_bytes() == again  # deterministic


def test_long_boards_drop_columns_and_nest_their_titles(site, capsys):
    full = leaderboard_markdown(site / "run.jsonl", "--long", capsys=capsys)
    path = readme_with(site, ("board --records run.jsonl --long --drop 'cost (s),device' --heading 4", ""))
    assert main([str(path)]) == 0
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
    assert main(["--check", str(path)]) == 2
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
    assert main([str(path)]) == 0
    with_config, without = block_text(path)
    assert "| fst" not in with_config and "| fst" in without  # a record the matrix does not make never shows
    assert "| ft " in with_config
    assert check(path) == []


def test_config_fails_for_a_missing_record_and_names_it(site, capsys):
    recs = [r for r in records(site / "matrix.yaml") if r.label != "evaluate cifar10/tiny_cnn/badnets/ft/asr/s0"]
    write_records(site / "run.jsonl", recs)
    path = readme_with(site, ("board --records run.jsonl --config matrix.yaml", ""))
    assert main(["--check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:7: run.jsonl is not the current code's results of matrix.yaml: 1 of its 7 jobs" in out
    assert "evaluate cifar10/tiny_cnn/badnets/ft/asr/s0: no record" in out
    assert "harness run matrix.yaml --workdir runs/readme-test" in out
    assert "harness export --workdir runs/readme-test --out run.jsonl" in out
    # regenerating writes nothing into a stale block and fails the same way
    before = path.read_bytes()
    assert main([str(path)]) == 1
    assert "no record" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_config_fails_when_the_code_changed_the_jobs(site, capsys):
    """Records of the old code: the matrix now makes other keys (here: ft's config changed, so its
    purify and evaluate keys did), and the labels of the changed jobs are listed."""
    write_matrix(site, MATRIX.replace("epochs: 1}}", "epochs: 2}}"))
    path = readme_with(site, ("timing --records run.jsonl --config matrix.yaml", ""))
    problems = check(path)
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
    [problem] = check(path)
    assert f"{label}: recorded failed" in problem


def test_config_lists_at_most_ten_jobs(site):
    matrix = write_matrix(site, MATRIX.replace("seeds", "x") + "seeds: [0, 1, 2]\n")
    write_records(site / "run.jsonl", [])
    path = readme_with(site, ("board --records run.jsonl --config matrix.yaml", ""))
    [problem] = check(path)
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
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}:{line}: ") and message in err, err
        assert err.count("\n") == 1  # one message
    assert path.read_bytes() == before


def test_a_bad_record_file_or_matrix_is_named_with_the_readme_line(site, capsys):
    (site / "bad.jsonl").write_text("{not json\n")
    (site / "bad.yaml").write_text("datasets: []\n")
    path = readme_with(site, ("timing --records bad.jsonl", ""))
    assert main(["--check", str(path)]) == 2
    assert f"{path}:7: timing: " in capsys.readouterr().err
    path = readme_with(site, ("board --records run.jsonl --config bad.yaml", ""))
    assert main(["--check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:7: board: " in err and "bad.yaml" in err


# ---------------------------------------------------------------- timing and clock


def test_the_timing_block_says_where_the_job_time_went(site):
    path = readme_with(site, ("timing --records run.jsonl", ""))
    assert main([str(path)]) == 0
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
    assert main([str(path)]) == 0
    last = block_text(path)[0].split("\n")[-1]
    assert last == ("Summed job wall time 63.0 s (1.1 min), on NVIDIA H200; cpu (x86_64, 1 threads), finished "
                    "2026-11-22 to 2026-11-24 (UTC). 1 record(s) have no wall time. Not done: 1 failed.")


def test_the_clock_block_renders_the_measurement(site, capsys):
    (site / "clock.json").write_text(json.dumps(CLOCK))
    path = readme_with(site, ("clock --file clock.json", "stale"))
    assert main([str(path)]) == 0
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
    assert main([str(path)]) == 0
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
    assert main(["--check", str(path)]) == 2
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
    assert check(path) == [] and "| total " in path.read_text()


def test_board_options_explain_and_width_are_render_s(site):
    from backdoor_harness.leaderboard.render import render
    from backdoor_harness.submission import read_records

    recs = read_records(site / "run.jsonl")
    path = readme_with(site, ("board --records run.jsonl --explain", ""), ("board --records run.jsonl --width 60", ""))
    assert main([str(path)]) == 0
    explained, narrow = block_text(path)
    shipped = list(readme._reported())  # what render reads by default (parsed once)
    assert explained == render(recs, "markdown", shipped, explain=True)
    assert "What to look at first:" in explained
    assert narrow == render(recs, "markdown", shipped, width=60) != render(recs, "markdown", shipped)


def test_a_negative_width_is_a_marker_error(site, capsys):
    path = readme_with(site, ("board --records run.jsonl --width -3", ""))
    assert main(["--check", str(path)]) == 2
    assert f"{path}:7: board: argument --width: invalid width value: '-3'" in capsys.readouterr().err


# ---------------------------------------------------------------- the GPU queue


def queue_item(item_id: str, status: str = "queued", minutes: dict | None = None, **extra) -> dict:
    return {"id": item_id, "description": f"item {item_id}", "commands": ["true"],
            "expected_min": minutes or {"h200": 4.0}, "estimate": "a guess", "status": status, **extra}


def cells(table: list[str]) -> list[list[str]]:
    """A markdown table's header and rows as stripped cells (its rule line left out)."""
    return [[c.strip() for c in readme._cells(line)] for i, line in enumerate(table) if i != 1]


def write_queue(root: Path, *items: dict) -> Path:
    path = root / "queue.yaml"
    path.write_text(yaml.safe_dump({"items": list(items)}, sort_keys=False))
    return path


DONE = {"records": "run.jsonl", "readme": "Measured results", "date": "2026-12-04", "device": "NVIDIA H200"}
WAIT = "expected 8 min > 7.0 min a call leaves; fits once the trainer is faster"


def test_the_gpu_queue_block_shows_every_item_and_counts_them(site):
    write_queue(site, queue_item("bench"), queue_item("paper-a", minutes={"h200": 2.5, "cpu": 1}),
                queue_item("paper-b", "blocked", {"h200": 8}, blocked_by=WAIT),
                queue_item("paper-c", "done", {"h200": 6.5}, results=[DONE, {**DONE, "readme": "## Next",
                                                                         "date": "2026-12-06", "device": "NVIDIA H100"}]),
                queue_item("cpu-only", minutes={"cpu": 1}))
    path = readme_with(site, ("gpu-queue --queue queue.yaml", "stale"))
    assert main([str(path)]) == 0
    [got] = block_text(path)
    sentence, blank, *table = got.split("\n")
    assert sentence == ("5 items: 3 queued (6.5 min expected on the H200; 1 of them without an estimate for it), "
                        "1 blocked, 1 done. Run with this queue: 2026-12-04 to 2026-12-06, on NVIDIA H100; NVIDIA H200.")
    groups, rest = "\n".join(table).split("\n\n")
    assert cells(groups.split("\n")) == [  # one row per config (here none: all commands items)
        ["items of", "items", "queued", "blocked", "done", "queued, H200 min"],
        ["benchmarks (commands)", "5", "3", "1", "1", "6.5 (+1 without)"]]
    assert cells(rest.split("\n")) == [  # the items that are not simply queued, in queue order
        ["item", "status", "H200 min", "results (done) or waits for (blocked)"],
        ["paper-b", "blocked", "8", "expected 8 min \\> 7.0 min a call leaves"],  # its first clause
        ["paper-c", "done", "6.5", "`run.jsonl` in “Measured results”, 2026-12-04, NVIDIA H200; "
                                   "`run.jsonl` in “Next”, 2026-12-06, NVIDIA H100"]]
    assert check(path) == []
    path.write_text(path.read_text().replace("--queue queue.yaml", "--queue queue.yaml --kind cpu"))
    assert main([str(path)]) == 0
    [got] = block_text(path)
    assert got.startswith("5 items: 3 queued (2 min expected on the CPU; 1 of them without an estimate for it)")
    assert cells(got.split("\n")[2:5]) == [["items of", "items", "queued", "blocked", "done", "queued, CPU min"],
                                           ["benchmarks (commands)", "5", "3", "1", "1", "2 (+1 without)"]]


def test_the_gpu_queue_block_groups_items_by_their_config(site):
    def on(config, item):
        return {**{k: v for k, v in item.items() if k != "commands"}, "matrix": config}
    write_queue(site, queue_item("bench"), on("configs/a.yaml", queue_item("m1")),
                on("configs/a.yaml", queue_item("m2", minutes={"h200": 1.5})),
                on("configs/b.yaml", queue_item("m3", "blocked", blocked_by=WAIT)))
    path = readme_with(site, ("gpu-queue --queue queue.yaml", ""))
    assert main([str(path)]) == 0
    [got] = block_text(path)
    groups = got.split("\n\n")[1]
    assert cells(groups.split("\n"))[1:] == [["benchmarks (commands)", "1", "1", "0", "0", "4"],
                                            ["`configs/a.yaml`", "2", "2", "0", "0", "5.5"],
                                            ["`configs/b.yaml`", "1", "0", "1", "0", "0"]]


def test_a_queue_with_nothing_done_says_no_gpu_run_was_made(site):
    long_wait = "the trainer's speed (a 100-epoch model takes longer than a call leaves after the preflight, " * 2
    write_queue(site, queue_item("a"), queue_item("b", "blocked", blocked_by=long_wait))
    path = readme_with(site, ("gpu-queue --queue queue.yaml", ""))
    assert main([str(path)]) == 0
    [got] = block_text(path)
    assert got.split("\n")[0] == ("2 items: 1 queued (4 min expected on the H200), 1 blocked, 0 done. No item is "
                                  "done: no GPU run has been made with this queue yet.")
    [note] = [row[3] for row in cells(got.split("\n\n")[2].split("\n")) if row[0] == "b"]
    assert note == "the trainer's speed (a 100-epoch model takes longer than a call leaves after the…"  # at a word
    assert len(note) <= readme.BLOCKED_CHARS + 1
    write_queue(site)
    assert main([str(path)]) == 0
    assert block_text(path) == ["0 items: 0 queued (0 min expected on the H200), 0 blocked, 0 done. No item is done: "
                                "no GPU run has been made with this queue yet."]


@pytest.mark.parametrize("result, message", [
    ({**DONE, "records": "leaderboard/records/gone.h200.jsonl"},
     "item 'paper' is done, but its records file leaderboard/records/gone.h200.jsonl does not exist"),
    ({**DONE, "readme": "Results on the H200"}, "item 'paper' is done, but the README has no section "
                                                "'Results on the H200'"),
])
def test_a_done_item_s_records_and_section_must_exist(site, capsys, result, message):
    write_queue(site, queue_item("paper", "done", results=[result]))
    path = readme_with(site, ("gpu-queue --queue queue.yaml", ""))
    for argv in (["--check", str(path)], [str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}:7: gpu-queue: --queue queue.yaml: {message}"), err


def test_a_section_named_in_a_code_block_is_not_a_heading():
    text = "# T\n\n```\n## Shown as code\n```\n\n## Real  ##\n   ### Indented\n    ## four spaces: code\n#no-space\n"
    assert readme.headings(text) == {"T", "Real", "Indented"}


def test_a_bad_queue_is_a_marker_error(site, capsys):
    write_queue(site, queue_item("a", "done"))
    path = readme_with(site, ("gpu-queue --queue queue.yaml", ""))
    assert main(["--check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:7: gpu-queue: " in err and "results" in err
    path = readme_with(site, ("gpu-queue --queue nowhere.yaml", ""))
    assert main(["--check", str(path)]) == 2
    assert "--queue nowhere.yaml: no such file" in capsys.readouterr().err
