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


SETUP = {"data": {"train_per_class": None}, "recipe": {"epochs": 100, "lr": 0.1},
         "attacks": {"a": {"alpha": 0.1}}, "defenses": {"ft": {"rho": {"by_attack": {"a": 0.9}, "else": 0.5}}},
         "evaluators": {"retune": {"poison_count": 5}}}


def cell_records(defense="ft", attack="a", epochs=100, attack_config=None, defense_config=None, metrics=None,
                 evaluator="asr", evaluator_config=None, model_versions=None):
    """A train, a purify and an evaluate record of one cell, linked by their keys."""
    t, p = f"t-{attack}-{epochs}", f"p-{attack}-{defense}-{epochs}"
    train = {"kind": "train", "key": t, "status": "done", "versions": model_versions or {},
             "attrs": {"dataset": "d", "model": "m", "attack": attack, "seed": 0, "poison_rate": 0.1},
             "config": {"data": {"name": "d", "train_per_class": None}, "model": {"name": "m"},
                        "recipe": {"epochs": epochs, "lr": 0.1},
                        "attack": {"name": attack, "config": {"alpha": 0.1} if attack_config is None else attack_config}}}
    purify = {"kind": "purify", "key": p, "deps": [t], "status": "done", "wall_s": 1.0, "device": "cpu",
              "attrs": {"dataset": "d", "model": "m", "attack": attack, "defense": defense, "seed": 0},
              "config": {"defense": {"name": defense, "config": defense_config or {}}, "reserve": {}}}
    e = ev(defense, attack, 0, metrics or {"asr": 0.02}, evaluator=evaluator)
    e["deps"], e["key"] = [t, p], f"e-{p}-{evaluator}"
    e["config"]["evaluator"]["config"] = evaluator_config or {}
    return [train, purify, e]


def reported_entry(metric="asr", defense="ft", value=0.0142, **extra):
    return {"dataset": "d", "model": "m", "poison_rate": 0.1, "attack": "a", "defense": defense, "metric": metric,
            "value": value, "source": "paper 000, Table 1", "setup": SETUP, **extra}


def test_reported_numbers_sit_beside_the_measured_ones_of_the_same_setup():
    reported = [reported_entry(), {**reported_entry(value=0.5), "poison_rate": 0.05}]
    recs = cell_records(defense_config={"rho": 0.9})
    (cell,) = [r["cells"]["a"]["asr"] for r in boards(recs, reported)[0]["rows"]]
    assert cell["reported"] == pytest.approx(0.0142) and cell["source"] == "paper 000, Table 1"
    assert row(render(recs, "markdown", reported=reported), "ft")[0] == "2.00 (1.42)"


@pytest.mark.parametrize("change, why", [
    ({"epochs": 20}, "recipe.epochs 20 (the paper's 100)"),
    ({"attack_config": {"alpha": 0.2}}, "a.alpha 0.2 (the paper's 0.1)"),
    ({"defense_config": {"rho": 0.5}}, "ft.rho 0.5 (the paper's 0.9)"),  # by_attack: 0.9 for attack a
    ({"defense_config": {"rho": 0.9}, "evaluator": "retune", "metrics": {"retune_asr": 0.3},
      "evaluator_config": {"poison_count": 1}}, "retune.poison_count 1 (the paper's 5)"),
])
def test_a_different_setup_shows_no_paper_number_and_says_why(change, why):
    metric = next(iter(change.get("metrics", {"asr": 0})))
    reported = [reported_entry(metric)]
    recs = cell_records(**{"defense_config": {"rho": 0.9}, **change})
    (board,) = boards(recs, reported)
    assert board["rows"][0]["cells"]["a"][metric]["reported"] is None
    assert any(n.startswith("paper numbers not shown for a/ft: different setup: ") and why in n
               for n in board["notes"]), board["notes"]
    assert "(1.42)" not in render(recs, "markdown", reported=reported)


def test_an_entry_without_a_setup_or_a_cell_without_records_shows_nothing():
    bare = {k: v for k, v in reported_entry().items() if k != "setup"}
    recs = cell_records(defense_config={"rho": 0.9})
    assert boards(recs, [bare])[0]["rows"][0]["cells"]["a"]["asr"]["reported"] is None
    lone = [ev("ft", "a", 0, {"asr": 0.02})]  # no train/purify record: the setup is unknown
    (board,) = boards(lone, [reported_entry()])
    assert board["rows"][0]["cells"]["a"]["asr"]["reported"] is None and "setup is unknown" in board["notes"][0]


def test_entry_level_configs_pick_among_a_papers_variants():
    """Paper 000's Table 10 reports PAM at several rho: each number stands beside the run with that rho."""
    reported = [reported_entry(value=0.01), reported_entry(value=0.03, defense_config={"rho": 0.3})]
    at_03 = boards(cell_records(defense_config={"rho": 0.3}), reported)[0]["rows"][0]["cells"]["a"]["asr"]
    at_09 = boards(cell_records(defense_config={"rho": 0.9}), reported)[0]["rows"][0]["cells"]["a"]["asr"]
    assert (at_03["reported"], at_09["reported"]) == (pytest.approx(0.03), pytest.approx(0.01))


def test_substitute_attacks_and_stale_models_never_match(monkeypatch):
    from backdoor_harness.leaderboard import setups

    recs = cell_records(defense_config={"rho": 0.9})
    monkeypatch.setattr(setups, "_substitute", lambda ref: "own encoder, not the paper's")
    (board,) = boards(recs, [reported_entry()])
    assert board["rows"][0]["cells"]["a"]["asr"]["reported"] is None
    assert any("attack a is a substitute (own encoder, not the paper's)" in n for n in board["notes"])
    monkeypatch.setattr(setups, "_substitute", lambda ref: None)
    monkeypatch.setattr(setups, "installed_revision", lambda name: "2")
    (board,) = boards(recs, [reported_entry()])
    assert "model m is architecture revision 1, the installed one is 2" in board["notes"][0]
    (board,) = boards(cell_records(defense_config={"rho": 0.9}, model_versions={"model": "2"}), [reported_entry()])
    assert board["rows"][0]["cells"]["a"]["asr"]["reported"] == pytest.approx(0.0142)


def test_oracle_rows_are_shown_marked_and_never_best():
    recs = (cell_records("ep", metrics={"asr": 0.001}) + cell_records("ft", defense_config={"rho": 0.9},
                                                                      metrics={"asr": 0.05})
            + cell_records("fst", metrics={"asr": 0.10}))
    rows = {r["defense"]: r for r in boards(recs, [])[0]["rows"]}
    assert rows["ep"]["oracle"] and not rows["ft"]["oracle"]
    assert not rows["ep"]["cells"]["a"]["asr"]["best"] and rows["ft"]["cells"]["a"]["asr"]["best"]
    md = render(recs, "markdown", reported=[])
    assert row(md, "ep (oracle)")[0] == "0.10" and row(md, "ft")[0] == "**5.00**"


def test_the_shipped_numbers_all_name_a_shipped_setup():
    from backdoor_harness.leaderboard.setups import SECTIONS, load_setups

    known = load_setups()
    for name, setup in known.items():
        assert set(setup) <= {*SECTIONS, "paper", "unsupported"}, name
    for entry in load_reported():
        assert entry.get("setup_name") in known, entry


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


def test_a_cells_substitute_follows_the_config_it_ran_with():
    from backdoor_harness.leaderboard.setups import cell_setup, differences, load_setups

    def cell(name, config):
        return cell_setup({"config": {"attack": {"name": name, "config": config}, "recipe": {"epochs": 100}}},
                          {"config": {"defense": {"name": "none", "config": {}}}})

    assert cell("blended", {"pattern": "gaussian"})["attack_substitute"] is None  # paper 000's trigger
    assert "uniform" in cell("blended", {})["attack_substitute"]
    assert "encoder" in cell("ssba", {})["attack_substitute"]
    paper = load_setups()["paper000-cifar10"]
    why = differences(paper, cell("blended", {"pattern": "gaussian", "alpha": 0.1, "test_alpha": 0.2}))
    assert not any("blended" in w for w in why), why
    assert "blended.alpha 0.2 (the paper's 0.1)" in differences(paper, cell("blended", {"pattern": "gaussian"}))


def test_two_revisions_of_a_model_never_share_a_board():
    old = cell_records(defense_config={"rho": 0.9})
    new = cell_records(defense_config={"rho": 0.9}, epochs=99, model_versions={"model": "2"})
    for rec in old + new:
        if "model" in rec["attrs"]:
            rec["attrs"]["model"] = "preact_resnet18"
        if rec["kind"] == "train":
            rec["config"]["model"] = {"name": "preact_resnet18"}
    titles = [b.splitlines()[0] for b in render(old + new, "text", reported=[]).split("\n\n") if " / " in b]
    assert titles == ["d / preact_resnet18 [architecture revision 1, not the installed 2] / poison rate 10% "
                      "(seeds 0; rates in %)", "d / preact_resnet18 / poison rate 10% (seeds 0; rates in %)"]


def test_a_substitute_trigger_is_marked_in_the_header_and_named_in_the_notes(monkeypatch):
    from backdoor_harness.leaderboard import setups

    monkeypatch.setattr(setups, "_substitute", lambda ref: "own encoder" if ref["name"] == "a" else None)
    recs = cell_records(defense_config={"rho": 0.9}) + cell_records(attack="b", defense_config={"rho": 0.9})
    md = render(recs, "markdown", reported=[])
    assert "| a† C-Acc" not in md and "a† ASR" in md and "b ASR" in md and "b† ASR" not in md
    assert "- a†: a substitute trigger: own encoder" in md


def paper_records(config: str, metrics: dict) -> list[dict]:
    """The records a run of a shipped matrix file would write, each evaluation returning ``metrics``."""
    from backdoor_harness import registry
    from backdoor_harness.matrix import expand, load_matrix

    recs = []
    for job in expand(load_matrix(config)):
        rec = {"kind": job.kind, "key": job.key, "label": job.label, "status": "done", "attrs": job.attrs,
               "config": job.payload, "versions": job.versions, "deps": job.deps, "metrics": {}}
        if job.kind == "evaluate":
            produced = registry.get_class("evaluator", job.payload["evaluator"]["name"]).metrics
            rec["metrics"] = {m: v for m, v in metrics.items() if m in produced}
        recs.append(rec)
    return recs


def test_paper000s_config_is_paper000s_setup_on_the_shipped_numbers():
    """configs/paper000-table3.yaml runs paper 000's Table 3 setup: its BadNets and Blended cells stand
    beside the paper's numbers (PAM at its per-attack rho, the retuning at its per-attack k); SSBA and LC,
    substitutes here, never do; the 20-epoch GPU grid's cells never do."""
    recs = paper_records("configs/paper000-table3.yaml", {"asr": 0.5, "clean_acc": 0.9, "retune_asr": 0.5})
    (board,) = boards(recs, load_reported())
    rows = {r["defense"]: r for r in board["rows"]}
    for attack in ("badnets", "blended"):
        for defense in ("none", "ep", "pam", "fst", "anp"):
            assert rows[defense]["cells"][attack]["asr"]["reported"] is not None, (attack, defense)
        assert rows["pam"]["cells"][attack]["retune_asr"]["reported"] is not None, attack
    for attack in ("ssba", "lc"):
        assert all(r["cells"][attack]["asr"]["reported"] is None for r in rows.values()), attack
    assert any("attack ssba is a substitute" in n for n in board["notes"])
    grid = paper_records("configs/paper000-grid-gpu.yaml", {"asr": 0.5})
    (board,) = boards(grid, load_reported())
    assert all(c["asr"]["reported"] is None for r in board["rows"] for c in r["cells"].values())
    assert any("recipe.epochs 20 (the paper's 100)" in n for n in board["notes"])
