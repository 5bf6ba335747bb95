"""The leaderboard as a pure function of records: grouping, order, averages, best, cost, reported numbers."""

from __future__ import annotations

import itertools
import json

import pytest

from backdoor_harness.leaderboard.render import boards, long_table, load_reported, render, table, title
from backdoor_harness.results import collect
from backdoor_harness.store import Cell, JobRecord, Metric, PluginInfo

#: the metric metadata the records carry (as the evaluators declare it): the boards read only these
METRICS = {
    "clean_acc": Metric(higher_is_better=True, title="C-Acc", board=0, one_sided=True),
    "asr": Metric(higher_is_better=False, title="ASR", board=1, one_sided=True),
    "robust_acc": Metric(higher_is_better=True, title="RA", board=2),
    "retune_asr": Metric(higher_is_better=False, title="P-ASR", board=4),
    "qra_p_asr": Metric(higher_is_better=False, title="QRA P-ASR", board=6),
    "lmc_escape_t": Metric(higher_is_better=False, title="LMC-esc t", board=7, percent=False),
    "lmc_t": Metric(higher_is_better=True, curve=True, doc="t (0 = backdoored, 1 = purified)"),
    "lmc_asr": Metric(higher_is_better=False, curve=True, doc="ASR at each t"),
}
#: the defense facts the purify records carry
BASELINE, ORACLE = {"none"}, {"ep"}
_keys = itertools.count()


def ev(defense, attack, seed, metrics, status="done", evaluator="asr", name=None, rate=0.1, dataset="d",
       key=None, deps=()):
    """An evaluate record; its metric metadata that of the metrics it has (a failed one: its evaluator's)."""
    plugin = name or evaluator
    declared = list(metrics) or [plugin]
    return JobRecord(
        key=key or f"e{next(_keys)}", label=f"evaluate {dataset}/m/{attack}/{defense}/{evaluator}/s{seed}",
        kind="evaluate", status=status, error=None if status == "done" else "Traceback\nValueError: why",
        metrics=metrics, config={"evaluator": {"name": plugin, "config": {}}, "seed": seed}, deps=list(deps),
        attrs=Cell(dataset=dataset, model="m", attack=attack, defense=defense, seed=seed, evaluator=evaluator,
                   poison_rate=rate),
        plugin=PluginInfo(name=plugin, version="1"), metric_info={m: METRICS[m] for m in declared if m in METRICS})


def purify(defense, attack, wall_s, device="cpu", seed=0, key=None, deps=(), config=None):
    return JobRecord(key=key or f"p{next(_keys)}", label=f"purify d/m/{attack}/{defense}/s{seed}", kind="purify",
                     status="done", wall_s=wall_s, device=device, deps=list(deps),
                     config={"defense": {"name": defense, "config": config or {}}, "reserve": {}},
                     attrs=Cell(dataset="d", model="m", attack=attack, defense=defense, seed=seed, poison_rate=0.1),
                     plugin=PluginInfo(name=defense, version="1", config=config or {}, baseline=defense in BASELINE,
                                       oracle=defense in ORACLE))


def row(recs, name: str, reported=()) -> list[str]:
    """The markdown cells of a defense's row (after its name) on the first board of ``recs``."""
    _, rows = table(boards(recs, reported)[0], "markdown")
    return next(r[1:] for r in rows if r[0] == name)


def test_averages_seeds_and_marks_missing_and_failed():
    recs = [ev("none", "a", 0, {"asr": 0.9}), ev("none", "a", 1, {"asr": 0.8}),
            ev("ft", "a", 0, {}, status="failed"), ev("ft", "b", 0, {"asr": 0.1})]
    cells = {(c["defense"], c["attack"]): c for c in json.loads(render(recs, "json"))}
    assert cells[("none", "a")]["metrics"]["asr"] == pytest.approx(0.85)
    assert cells[("none", "a")]["seeds"] == [0, 1]
    (board,) = boards(recs)
    # only the metric some cell has becomes a column (titled by its metadata)
    assert [(c.metric, c.title) for c in board["columns"]] == [("asr", "ASR")] and board["attacks"] == ["a", "b"]
    rows = {r["defense"]: r for r in board["rows"]}
    # (none, b) was never run: no number and no status; nor is its average a number
    assert rows["none"]["cells"]["a"]["asr"]["value"] == pytest.approx(0.85)
    assert [rows["none"]["cells"]["b"]["asr"][k] for k in ("value", "status")] == [None, None]
    assert rows["none"]["avg"]["asr"]["value"] is None
    assert rows["ft"]["cells"]["a"]["asr"]["status"] == "failed" and rows["ft"]["cells"]["a"]["asr"]["value"] is None
    assert "ft / a / asr: failed: ValueError: why" in board["notes"]  # the reason, under the board
    headers, _ = table(board, "markdown")
    assert headers == ["defense", "a ASR", "b ASR", "avg ASR", "cost (s)", "device"]
    assert row(recs, "none") == ["85.00", "—", "—", "—", "—"]
    assert row(recs, "ft")[:3] == ["failed", "10.00", "—"]
    md = render(recs, "markdown", reported=[])  # end to end: the table and its notes
    assert "| none " in md and "- ft / a / asr: failed: ValueError: why" in md


def test_one_board_per_poison_rate():
    data = boards([ev("none", "a", 0, {"asr": 0.9}), ev("none", "a", 0, {"asr": 0.5}, rate=0.05)])
    assert [(b["poison_rate"], b["rows"][0]["cells"]["a"]["asr"]["value"]) for b in data] == [(0.1, 0.9), (0.05, 0.5)]
    assert "poison rate 5%" in render([ev("none", "a", 0, {"asr": 0.5}, rate=0.05)], "text", reported=[])


def with_purify(defense, attack, metrics, evaluator="asr", **kw):
    """An evaluation and the purify record it depends on (which says whether the defense is the
    baseline or an oracle)."""
    p = purify(defense, attack, 1.0)
    return [p, ev(defense, attack, 0, metrics, evaluator=evaluator, deps=["t-none", p.key], **kw)]


def test_rows_the_baseline_then_the_oracles_then_the_matrix_order():
    recs = [r for d in ("ft", "pam", "ep", "none", "anp") for r in with_purify(d, "a", {"asr": 0.1})]
    assert [(r["defense"], r["baseline"], r["oracle"]) for r in boards(recs)[0]["rows"]] == [
        ("none", True, False), ("ep", False, True), ("ft", False, False), ("pam", False, False), ("anp", False, False)]
    # the facts, not the names: another baseline or oracle defense takes the same places
    global BASELINE, ORACLE
    BASELINE, ORACLE = {"anp"}, {"pam"}
    try:
        recs = [r for d in ("ft", "pam", "ep", "none", "anp") for r in with_purify(d, "a", {"asr": 0.1})]
    finally:
        BASELINE, ORACLE = {"none"}, {"ep"}
    assert [r["defense"] for r in boards(recs)[0]["rows"]] == ["anp", "pam", "ft", "ep", "none"]


def test_best_per_column_follows_the_metric_direction_and_skips_the_undefended_row():
    recs = [*with_purify("none", "a", {"asr": 0.0, "clean_acc": 0.99}, evaluator="x"),
            ev("fst", "a", 0, {"asr": 0.02, "clean_acc": 0.90}, evaluator="x"),
            ev("ft", "a", 0, {"asr": 0.50, "clean_acc": 0.93}, evaluator="x"),
            ev("pam", "a", 0, {"asr": 0.02, "clean_acc": 0.80}, evaluator="x")]
    rows = {r["defense"]: r["cells"]["a"] for r in boards(recs)[0]["rows"]}
    assert [d for d in rows if rows[d]["asr"]["best"]] == ["fst", "pam"]  # lower is better; ties both
    assert [d for d in rows if rows[d]["clean_acc"]["best"]] == ["ft"]  # higher is better; the baseline excluded
    assert row(recs, "fst")[:2] == ["90.00", "**2.00**"]
    assert row(recs, "none")[:2] == ["99.00", "0.00"]


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
    assert row(recs, "ep")[-2:] == ["20.0", "NVIDIA H100"]


SETUP = {"data": {"train_per_class": None}, "recipe": {"epochs": 100, "lr": 0.1},
         "attacks": {"a": {"alpha": 0.1}}, "defenses": {"ft": {"rho": {"by_attack": {"a": 0.9}, "else": 0.5}}},
         "evaluators": {"retune": {"poison_count": 5}}}


def cell_records(defense="ft", attack="a", epochs=100, attack_config=None, defense_config=None, metrics=None,
                 evaluator="asr", evaluator_config=None, model_versions=None, substitute=None, model="m"):
    """A train, a purify and an evaluate record of one cell, linked by their keys, with the plugin facts
    each records (the attack's effective config and ``substitute``, the defense's, the evaluator's)."""
    t, p = f"t-{attack}-{epochs}-{model}", f"p-{attack}-{defense}-{epochs}-{model}"
    attack_config = {"alpha": 0.1} if attack_config is None else attack_config
    train = JobRecord(kind="train", key=t, label="train", status="done", versions=model_versions or {},
                      attrs=Cell(dataset="d", model=model, attack=attack, seed=0, poison_rate=0.1),
                      config={"data": {"name": "d", "train_per_class": None}, "model": {"name": model},
                              "recipe": {"epochs": epochs, "lr": 0.1}, "attack": {"name": attack, "config": attack_config}},
                      plugin=PluginInfo(name=attack, version="1", config=attack_config, substitute=substitute))
    pur = purify(defense, attack, 1.0, key=p, deps=[t], config=defense_config)
    e = ev(defense, attack, 0, metrics or {"asr": 0.02}, evaluator=evaluator, key=f"e-{p}-{evaluator}", deps=[t, p])
    e.config["evaluator"]["config"] = evaluator_config or {}
    e.plugin = PluginInfo(name=evaluator, version="1", config=evaluator_config or {})
    for r in (pur, e):
        r.attrs = r.attrs.model_copy(update={"model": model})
    return [train, pur, e]


def reported_entry(metric="asr", defense="ft", value=0.0142, **extra):
    return {"dataset": "d", "model": "m", "poison_rate": 0.1, "attack": "a", "defense": defense, "metric": metric,
            "value": value, "source": "paper 000, Table 1", "setup": SETUP, **extra}


def test_reported_numbers_sit_beside_the_measured_ones_of_the_same_setup():
    reported = [reported_entry(), {**reported_entry(value=0.5), "poison_rate": 0.05}]
    recs = cell_records(defense_config={"rho": 0.9})
    (cell,) = [r["cells"]["a"]["asr"] for r in boards(recs, reported)[0]["rows"]]
    assert cell["reported"] == pytest.approx(0.0142) and cell["source"] == "paper 000, Table 1"
    assert row(recs, "ft", reported)[0] == "2.00 (1.42)"


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
    from backdoor_harness import results

    recs = cell_records(defense_config={"rho": 0.9}, substitute="own encoder, not the paper's")
    (board,) = boards(recs, [reported_entry()])
    assert board["rows"][0]["cells"]["a"]["asr"]["reported"] is None
    assert any("attack a is a substitute (own encoder, not the paper's)" in n for n in board["notes"])
    recs = cell_records(defense_config={"rho": 0.9})
    monkeypatch.setattr(results, "installed_revision", lambda name: "2")
    (board,) = boards(recs, [reported_entry()])
    assert "model m is architecture revision 1, the installed one is 2" in board["notes"][0]
    (board,) = boards(cell_records(defense_config={"rho": 0.9}, model_versions={"model": "2"}), [reported_entry()])
    assert board["rows"][0]["cells"]["a"]["asr"]["reported"] == pytest.approx(0.0142)


def test_oracle_rows_are_shown_marked_and_never_best():
    recs = (cell_records("ep", metrics={"asr": 0.001}) + cell_records("ft", defense_config={"rho": 0.9},
                                                                      metrics={"asr": 0.05})
            + cell_records("fst", metrics={"asr": 0.10}))
    rows = {r["defense"]: r for r in boards(recs, [])[0]["rows"]}
    assert rows["ep"]["oracle"] and not rows["ft"]["oracle"]  # the purify record's fact
    assert not rows["ep"]["cells"]["a"]["asr"]["best"] and rows["ft"]["cells"]["a"]["asr"]["best"]
    assert row(recs, "ep (oracle)")[0] == "0.10" and row(recs, "ft")[0] == "**5.00**"


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
    assert cell.metrics == {"qra_p_asr": 0.9, "qra_p_asr@qra_kl": 0.5, "lmc_escape_t": 0.55}  # not 0.7
    (board,) = boards(recs)
    assert [(c.metric, c.title, c.percent) for c in board["columns"]] == [
        ("qra_p_asr", "QRA P-ASR", True), ("qra_p_asr@qra_kl", "QRA P-ASR [qra_kl]", True),
        ("lmc_escape_t", "LMC-esc t", False)]
    assert row(recs, "ft")[:3] == ["90.00", "50.00", "0.55"]


def test_the_shipped_reported_numbers_are_well_formed():
    keys = {"dataset", "model", "poison_rate", "attack", "defense", "metric", "value", "source"}
    for entry in load_reported():
        assert keys <= set(entry), entry
        assert 0 <= entry["value"] <= 1 and 0 < entry["poison_rate"] < 1 and entry["source"], entry


def test_the_long_form_has_a_row_per_attack_and_defense():
    recs = [*with_purify("none", "a", {"asr": 0.9, "clean_acc": 0.5}, evaluator="x"),
            *with_purify("none", "b", {"asr": 0.8, "clean_acc": 0.4}, evaluator="x"),
            *with_purify("ep", "a", {"asr": 0.1, "clean_acc": 0.45}, evaluator="x")]
    headers, lines = long_table(boards(recs)[0], "markdown")
    assert headers == ["attack", "defense", "C-Acc", "ASR", "cost (s)", "device"]
    assert lines == [["a", "none", "50.00", "90.00", "1.0", "cpu"], ["a", "ep (oracle)", "45.00", "10.00", "1.0", "cpu"],
                         ["b", "none", "40.00", "80.00", "1.0", "cpu"], ["b", "ep (oracle)", "—", "—", "—", "cpu"]]


def test_sources_keep_two_runs_of_the_same_cells_apart():
    attacks = [ev("none", a, 0, {"asr": 0.9}, key=f"k-{a}") for a in ("a", "b")]
    defenses = [ev(d, "a", 0, {"asr": 0.2}, key=f"k-{d}") for d in ("ft", "ep")]
    # pooled: one sparse board; with sources: one board each, named
    assert len(boards(attacks + defenses)) == 1
    split = boards(attacks + defenses, sources=["attacks-run"] * 2 + ["defenses-run"] * 2)
    assert [(b["source"], b["attacks"], [r["defense"] for r in b["rows"]]) for b in split] == \
        [("attacks-run", ["a", "b"], ["none"]), ("defenses-run", ["a"], ["ft", "ep"])]  # no facts: record order
    assert "### defenses-run: d / m /" in render(attacks + defenses, "markdown", reported=[],
                                                 sources=["defenses-run"] * 4)


def test_the_cli_renders_each_records_file_as_its_own_boards(tmp_path, capsys):
    from backdoor_harness import cli

    shared = ev("none", "a", 0, {"asr": 0.9}, key="k-none")
    for name, defense in (("attacks-run", "none"), ("defenses-run", "ft")):
        rec = ev(defense, "b", 0, {"asr": 0.5}, key=f"k-{name}")
        (tmp_path / f"{name}.jsonl").write_text(shared.model_dump_json() + "\n" + rec.model_dump_json() + "\n")
    files = [str(tmp_path / "attacks-run.jsonl"), str(tmp_path / "defenses-run.jsonl")]
    assert cli.main(["leaderboard", "--records", *files, "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert "### attacks-run: d / m" in out and "### defenses-run: d / m" in out
    assert out.count("| none ") == 2  # a record both files hold shows in both boards
    assert cli.main(["leaderboard", "--records", files[0], "--format", "markdown"]) == 0
    assert "### d / m" in capsys.readouterr().out  # one file: no source in the title


@pytest.mark.parametrize("fails", ["not-a-folder", "full-disk"])
def test_leaderboard_out_is_written_all_or_nothing_and_a_failure_is_one_message(tmp_path, capsys, monkeypatch,
                                                                               fails):
    """An unwritable --out (here under a regular file: the OS refuses, root or not) or a full disk: one
    message naming the path, exit 2, no partial or temporary file; the file --out names is as it was."""
    import errno
    import os

    from backdoor_harness import cli

    records = tmp_path / "run.jsonl"
    records.write_text(ev("none", "a", 0, {"asr": 0.9}).model_dump_json() + "\n")
    args = ["leaderboard", "--records", str(records), "--format", "markdown", "--out"]
    if fails == "not-a-folder":
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "board.md"
    else:
        out = tmp_path / "board.md"
        assert cli.main([*args, str(out)]) == 0 and "### d / m" in out.read_text()
        capsys.readouterr()
        out.write_text("the board as it was\n")

        def no_space(src, dst, *a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "replace", no_space)
    assert cli.main([*args, str(out)]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}: cannot write it (") and "nothing was written" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert ("the disk is full" in err) == (fails == "full-disk")
    if fails == "full-disk":
        assert out.read_text() == "the board as it was\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run.jsonl", out.name if fails == "full-disk"
                                                                  else "a-file"])


def test_a_cells_substitute_follows_the_config_it_ran_with():
    """Schema-1 records (the published ones) get the substitute of the config they ran with from the
    installed attack."""
    from backdoor_harness.leaderboard.setups import differences, load_setups
    from backdoor_harness.results import cell_setup, upgrade

    def cell(name, config):
        cell = Cell(dataset="d", seed=0, model="m", attack=name)
        train = upgrade(JobRecord(schema_version=1, key="t", label="t", kind="train", status="done", attrs=cell,
                                  config={"attack": {"name": name, "config": config}, "recipe": {"epochs": 100}}))
        purify = upgrade(JobRecord(schema_version=1, key="p", label="p", kind="purify", status="done",
                                   attrs=cell.model_copy(update={"defense": "none"}), deps=["t"],
                                   config={"defense": {"name": "none", "config": {}}}), {"t": train})
        return cell_setup(train, purify)

    assert cell("blended", {"pattern": "gaussian"}).attack_substitute is None  # paper 000's trigger
    assert "uniform" in cell("blended", {}).attack_substitute
    assert "encoder" in cell("ssba", {}).attack_substitute
    paper = load_setups()["paper000-cifar10"]
    why = differences(paper, cell("blended", {"pattern": "gaussian", "alpha": 0.1, "test_alpha": 0.2}))
    assert not any("blended" in w for w in why), why
    assert "blended.alpha 0.2 (the paper's 0.1)" in differences(paper, cell("blended", {"pattern": "gaussian"}))


def test_two_revisions_of_a_model_never_share_a_board():
    old = cell_records(defense_config={"rho": 0.9}, model="preact_resnet18")
    new = cell_records(defense_config={"rho": 0.9}, epochs=99, model_versions={"model": "2"}, model="preact_resnet18")
    assert [title(b) for b in boards(old + new)] == ["d / preact_resnet18 [architecture revision 1, not the installed 2] / poison rate 10% "
                      "(seeds 0; rates in %)", "d / preact_resnet18 / poison rate 10% (seeds 0; rates in %)"]


def test_a_substitute_trigger_is_marked_in_the_header_and_named_in_the_notes():
    recs = (cell_records(defense_config={"rho": 0.9}, substitute="own encoder")
            + cell_records(attack="b", defense_config={"rho": 0.9}))
    (board,) = boards(recs)
    assert board["substitutes"] == {"a": "own encoder"}
    headers, _ = table(board, "markdown")
    assert headers[1:3] == ["a† ASR", "b ASR"]  # the substitute marked, the other attack not
    assert "a†: a substitute trigger: own encoder" in board["notes"]


def paper_records(config: str, metrics: dict) -> list[JobRecord]:
    """The records a run of a shipped matrix file would write, each evaluation returning ``metrics``
    (as schema-1 records: the installed plugins give their facts, see results.upgrade)."""
    from backdoor_harness import registry
    from backdoor_harness.matrix import expand, load_matrix

    recs = []
    for job in expand(load_matrix(config)):
        rec = JobRecord(schema_version=1, kind=job.kind, key=job.key, label=job.label, status="done", attrs=job.cell,
                        config=job.payload, versions=job.versions, deps=job.deps)
        if job.kind == "evaluate":
            produced = registry.get_class("evaluator", job.payload["evaluator"]["name"]).metrics
            rec.metrics = {m: v for m, v in metrics.items() if m in produced}
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


def test_harness_run_draws_the_curve_plots_from_the_stores_evaluations(tmp_path, monkeypatch, capsys):
    """`harness run` draws a plot per (data set, model, attack, curve) after the matrix ran, its x axis
    labelled with the grid's ``doc`` from the records' metric metadata."""
    from backdoor_harness import cli, scheduler
    from backdoor_harness.store import Store

    spec = tmp_path / "m.yaml"
    spec.write_text("name: plots\ndatasets: [cifar10]\nmodels: [tiny_cnn]\nattacks: [badnets]\n"
                    "defenses: [none]\nevaluators: [lmc]\n")
    workdir = tmp_path / "work"

    def run_matrix(spec, workdir, **kwargs):  # what the scheduler stores: two defenses' LMC evaluations
        store = Store(workdir)
        for d, asr in (("ep", [0.9, 0.5, 0.1, 0.0, 0.0]), ("ft", [0.9, 0.9, 0.8, 0.7, 0.6])):
            store.put(ev(d, "badnets", 0, {"lmc_t": [0.0, 0.25, 0.5, 0.75, 1.0], "lmc_asr": asr}, evaluator="lmc"))
        store.close()
        return {"done": 2, "failed": 0, "blocked": 0}

    monkeypatch.setattr(scheduler, "run_matrix", run_matrix)
    assert cli.main(["run", str(spec), "--workdir", str(workdir), "--no-progress"]) == 0
    folder = workdir / "artifacts" / "plots"
    assert sorted(p.name for p in folder.iterdir()) == ["lmc_asr-d-m-badnets.png", "lmc_asr-d-m-badnets.svg"]
    assert "t (0 = backdoored, 1 = purified)" in (folder / "lmc_asr-d-m-badnets.svg").read_text()
    assert "curve plots: 1 in" in capsys.readouterr().out
