"""The leaderboard as a pure function of records: grouping, order, averages, best, cost, reported numbers."""

from __future__ import annotations

import json

import pytest

from backdoor_harness.leaderboard.render import boards, collect, load_reported, render


def ev(defense, attack, seed, metrics, status="done", evaluator="asr", name=None, rate=0.1, dataset="d"):
    return {"kind": "evaluate", "status": status, "error": None if status == "done" else "Traceback\nValueError: why",
            "metrics": metrics, "config": {"evaluator": {"name": name or evaluator, "config": {}}, "seed": seed},
            "attrs": {"dataset": dataset, "model": "m", "attack": attack, "defense": defense, "seed": seed,
                      "evaluator": evaluator, "poison_rate": rate}}


def purify(defense, attack, wall_s, device="cpu", seed=0):
    return {"kind": "purify", "status": "done", "wall_s": wall_s, "device": device,
            "attrs": {"dataset": "d", "model": "m", "attack": attack, "defense": defense, "seed": seed}}


def row(md: str, name: str) -> list[str]:
    line = next(l for l in md.splitlines() if l.startswith(f"| {name} "))
    return [c.strip() for c in line.strip("|").split("|")][1:]  # the cells after the name


def test_averages_seeds_and_marks_missing_and_failed():
    recs = [ev("none", "a", 0, {"asr": 0.9}), ev("none", "a", 1, {"asr": 0.8}),
            ev("ft", "a", 0, {}, status="failed"), ev("ft", "b", 0, {"asr": 0.1})]
    cells = {(c["defense"], c["attack"]): c for c in json.loads(render(recs, "json"))}
    assert cells[("none", "a")]["metrics"]["asr"] == pytest.approx(0.85)
    assert cells[("none", "a")]["seeds"] == [0, 1]
    md = render(recs, "markdown", reported=[])
    header = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    # only the metric some cell has becomes a column; then the average over attacks, then the cost
    assert header == ["defense", "a ASR", "b ASR", "avg ASR", "cost (s)", "device"]
    # (none, b) was never run: a dash, not a number; nor is its average a number
    assert row(md, "none") == ["85.00", "—", "—", "—", "—"]
    assert row(md, "ft")[:3] == ["failed", "10.00", "—"]
    assert "- ft / a / asr: failed: ValueError: why" in md  # the reason, under the board


def test_one_board_per_poison_rate_rate_from_the_train_record_when_attrs_lack_it():
    old = ev("none", "a", 0, {"asr": 0.5}, rate=None)
    old["attrs"].pop("poison_rate")
    old["deps"] = ["t1", "p1"]
    train = {"key": "t1", "kind": "train", "status": "done", "attrs": {},
             "config": {"attack": {"name": "a", "config": {"poison_rate": 0.05}}}, "metrics": {}}
    data = boards([ev("none", "a", 0, {"asr": 0.9}), old, train])
    assert [(b["poison_rate"], b["rows"][0]["cells"]["a"]["asr"]["value"]) for b in data] == [(0.1, 0.9), (0.05, 0.5)]
    assert "poison rate 5%" in render([old, train], "text", reported=[])


def test_rows_none_then_ep_then_the_matrix_order():
    recs = [ev(d, "a", 0, {"asr": 0.1}) for d in ("ft", "pam", "ep", "none", "anp")]
    assert [r["defense"] for r in boards(recs)[0]["rows"]] == ["none", "ep", "ft", "pam", "anp"]


def test_best_per_column_follows_the_metric_direction_and_skips_the_undefended_row():
    recs = [ev("none", "a", 0, {"asr": 0.0, "clean_acc": 0.99}, evaluator="x"),
            ev("ep", "a", 0, {"asr": 0.02, "clean_acc": 0.90}, evaluator="x"),
            ev("ft", "a", 0, {"asr": 0.50, "clean_acc": 0.93}, evaluator="x"),
            ev("pam", "a", 0, {"asr": 0.02, "clean_acc": 0.80}, evaluator="x")]
    rows = {r["defense"]: r["cells"]["a"] for r in boards(recs)[0]["rows"]}
    assert [d for d in rows if rows[d]["asr"]["best"]] == ["ep", "pam"]  # lower is better; ties both
    assert [d for d in rows if rows[d]["clean_acc"]["best"]] == ["ft"]  # higher is better; none excluded
    md = render(recs, "markdown", reported=[])
    assert row(md, "ep")[:2] == ["90.00", "**2.00**"]
    assert row(md, "none")[:2] == ["99.00", "0.00"]


def test_average_over_attacks_and_its_best():
    recs = [ev("ep", "a", 0, {"asr": 0.2}), ev("ep", "b", 0, {"asr": 0.4}),
            ev("ft", "a", 0, {"asr": 0.1}), ev("ft", "b", 0, {"asr": 0.9})]
    rows = {r["defense"]: r for r in boards(recs)[0]["rows"]}
    assert rows["ep"]["avg"]["asr"]["value"] == pytest.approx(0.3)
    assert rows["ft"]["avg"]["asr"]["value"] == pytest.approx(0.5)
    assert rows["ep"]["avg"]["asr"]["best"] and not rows["ft"]["avg"]["asr"]["best"]
    assert rows["ft"]["cells"]["a"]["asr"]["best"]


def test_cost_is_the_mean_wall_time_of_the_defense_purify_jobs_with_its_device():
    recs = [ev("ep", "a", 0, {"asr": 0.2}), ev("ep", "b", 0, {"asr": 0.4}),
            purify("ep", "a", 10.0, "NVIDIA H100"), purify("ep", "b", 30.0, "NVIDIA H100"),
            purify("ep", "c", 1000.0)]  # no evaluation of attack c: not part of this board
    (r,) = boards(recs)[0]["rows"]
    assert r["cost_s"] == pytest.approx(20.0) and r["device"] == ["NVIDIA H100"]
    assert row(render(recs, "markdown", reported=[]), "ep")[-2:] == ["20.0", "NVIDIA H100"]


def test_reported_numbers_sit_beside_the_measured_ones():
    reported = [{"dataset": "d", "model": "m", "poison_rate": 0.1, "attack": "a", "defense": "ep", "metric": "asr",
                 "value": 0.0142, "source": "paper 000, Table 1"},
                {"dataset": "d", "model": "m", "poison_rate": 0.05, "attack": "a", "defense": "ep", "metric": "asr",
                 "value": 0.5, "source": "another rate: not this cell"}]
    recs = [ev("ep", "a", 0, {"asr": 0.02})]
    (cell,) = [r["cells"]["a"]["asr"] for r in boards(recs, reported)[0]["rows"]]
    assert cell["reported"] == pytest.approx(0.0142) and cell["source"] == "paper 000, Table 1"
    assert row(render(recs, "markdown", reported=reported), "ep")[0] == "2.00 (1.42)"


def test_labelled_evaluators_stay_apart_and_t_is_shown_plainly():
    recs = [ev("ft", "a", 0, {"qra_p_asr": 0.9}, evaluator="qra"),
            ev("ft", "a", 0, {"qra_p_asr": 0.5}, evaluator="qra_kl", name="qra"),
            ev("ft", "a", 0, {"lmc_escape_t": 0.55}, evaluator="lmc")]
    (cell,) = collect(recs)
    assert cell["metrics"] == {"qra_p_asr": 0.9, "qra_p_asr@qra_kl": 0.5, "lmc_escape_t": 0.55}  # not 0.7
    md = render(recs, "markdown", reported=[])
    assert "a QRA P-ASR [qra_kl]" in md.splitlines()[2]
    assert row(md, "ft")[:3] == ["90.00", "50.00", "0.55"]


def test_the_shipped_reported_numbers_are_well_formed():
    keys = {"dataset", "model", "poison_rate", "attack", "defense", "metric", "value", "source"}
    for entry in load_reported():
        assert keys <= set(entry), entry
        assert 0 <= entry["value"] <= 1 and 0 < entry["poison_rate"] < 1 and entry["source"], entry


def test_the_long_form_has_a_row_per_attack_and_defense():
    recs = [ev("none", "a", 0, {"asr": 0.9, "clean_acc": 0.5}, evaluator="x"),
            ev("none", "b", 0, {"asr": 0.8, "clean_acc": 0.4}, evaluator="x"),
            ev("ep", "a", 0, {"asr": 0.1, "clean_acc": 0.45}, evaluator="x")]
    md = render(recs, "markdown", reported=[], long=True)
    lines = [[c.strip() for c in l.strip("|").split("|")] for l in md.splitlines() if l.startswith("| ")]
    assert lines[0] == ["attack", "defense", "C-Acc", "ASR", "cost (s)", "device"]
    assert lines[1:] == [["a", "none", "50.00", "90.00", "—", "—"], ["a", "ep", "45.00", "10.00", "—", "—"],
                         ["b", "none", "40.00", "80.00", "—", "—"], ["b", "ep", "—", "—", "—", "—"]]


def test_sources_keep_two_runs_of_the_same_cells_apart():
    attacks = [dict(ev("none", a, 0, {"asr": 0.9}), key=f"k-{a}") for a in ("a", "b")]
    defenses = [dict(ev(d, "a", 0, {"asr": 0.2}), key=f"k-{d}") for d in ("ft", "ep")]
    # pooled: one sparse board; with sources: one board each, named
    assert len(boards(attacks + defenses)) == 1
    split = boards(attacks + defenses, sources=["attacks-run"] * 2 + ["defenses-run"] * 2)
    assert [(b["source"], b["attacks"], [r["defense"] for r in b["rows"]]) for b in split] == \
        [("attacks-run", ["a", "b"], ["none"]), ("defenses-run", ["a"], ["ep", "ft"])]
    assert "### defenses-run: d / m /" in render(attacks + defenses, "markdown", reported=[],
                                                 sources=["defenses-run"] * 4)


def test_the_cli_renders_each_records_file_as_its_own_boards(tmp_path, capsys):
    from backdoor_harness import cli
    from backdoor_harness.store import JobRecord

    shared = JobRecord(key="k-none", label="x", **ev("none", "a", 0, {"asr": 0.9}))
    for name, defense in (("attacks-run", "none"), ("defenses-run", "ft")):
        rec = JobRecord(key=f"k-{name}", label="x", **ev(defense, "b", 0, {"asr": 0.5}))
        (tmp_path / f"{name}.jsonl").write_text(shared.model_dump_json() + "\n" + rec.model_dump_json() + "\n")
    files = [str(tmp_path / "attacks-run.jsonl"), str(tmp_path / "defenses-run.jsonl")]
    assert cli.main(["leaderboard", "--records", *files, "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert "### attacks-run: d / m" in out and "### defenses-run: d / m" in out
    assert out.count("| none ") == 2  # a record both files hold shows in both boards
    assert cli.main(["leaderboard", "--records", files[0], "--format", "markdown"]) == 0
    assert "### d / m" in capsys.readouterr().out  # one file: no source in the title
