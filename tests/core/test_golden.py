"""Golden numbers: the comparison rules by hand, and the tiny matrix against tests/golden/."""

from __future__ import annotations

import pytest

from backdoor_harness.errors import HarnessError
from backdoor_harness.cli import build_parser, golden_command
from backdoor_harness.golden import FORMAT, MIN_DELTA, compare, direction, load_golden, make_golden, value_spreads
from backdoor_harness.matrix import load_matrix
from backdoor_harness.results import ResultCell, Unfinished, installed_metric_info
from backdoor_harness.store import Metric

from helpers import ROOT

GOLDEN = sorted((ROOT / "tests" / "golden").glob("*.yaml"))


def cell(defense, status=None, baseline=None, **metrics):
    return ResultCell(dataset="d", model="m", attack="a", defense=defense, metrics=metrics, status=status or {},
                      baseline=defense == "none" if baseline is None else baseline,
                      metric_info={m: info(m) for m in metrics if m in ("asr", "clean_acc")})


def info(metric: str) -> Metric:
    """A metric's metadata as the installed evaluator of that name declares it."""
    return installed_metric_info(metric)[metric]


def test_directions_follow_what_a_regression_is():
    assert direction(info("clean_acc"), baseline=False) == "min"
    assert direction(info("asr"), baseline=True) == "min"  # the attack must keep working
    assert direction(info("asr"), baseline=False) == "max"  # the defense must keep removing it
    assert direction(info("robust_acc"), baseline=False) == "near"
    # the rule itself, from the metadata alone
    assert direction(Metric(higher_is_better=False, one_sided=False), baseline=True) == "near"
    assert direction(None, baseline=False) == "near"


def test_the_golden_files_keep_their_stored_directions():
    """The directions the metadata gives are the ones stored in the golden files (none = the baseline)."""
    for path in GOLDEN:
        for check in load_golden(path)["checks"]:
            meta = installed_metric_info(check["metric"]).get(check["metric"])  # an evaluator named like its metric
            baseline = check.get("kind", "absolute") == "absolute" and check["defense"] == "none"
            assert direction(meta, baseline) == check["direction"], (path.name, check)


def test_make_golden_takes_directions_from_the_cells():
    spec = load_matrix(ROOT / "configs" / "golden-tiny.yaml")
    runs = {s: [cell("none", asr=0.9), cell("ft", asr=0.1 + s / 10)] for s in (0, 1)}
    checks = make_golden(runs, spec, "cmd")["checks"]
    assert [(c["defense"], c["kind"], c["direction"]) for c in checks] == [
        ("none", "absolute", "min"), ("ft", "absolute", "max"), ("ft", "paired", "max")]
    runs = {s: [cell("none", asr=0.9, clean_acc=0.5 - s / 10), cell("ft", asr=0.1, clean_acc=0.45 - s / 10)]
            for s in (0, 1)}
    checks = make_golden(runs, spec, "cmd")["checks"]
    # the defense's clean-accuracy difference may not fall, its ASR difference may not rise
    assert [(c["kind"], c["metric"], c["direction"]) for c in checks if c["defense"] == "ft"] == [
        ("absolute", "asr", "max"), ("paired", "asr", "max"), ("paired", "clean_acc", "min")]


def test_ref_is_the_seed_mean_and_delta_the_spread_with_a_floor():
    spec = load_matrix(ROOT / "configs" / "golden-tiny.yaml")
    runs = {0: [cell("none", asr=0.90, clean_acc=0.50)], 1: [cell("none", asr=0.80, clean_acc=0.504)],
            2: [cell("none", asr=0.85, clean_acc=0.502)]}
    doc = make_golden(runs, spec, "cmd")
    checks = {c["metric"]: c for c in doc["checks"]}
    assert checks["asr"]["ref"] == pytest.approx(0.85) and checks["asr"]["delta"] == pytest.approx(0.10)
    assert checks["asr"]["values"] == [0.9, 0.8, 0.85] and checks["asr"]["kind"] == "absolute"
    assert checks["clean_acc"]["delta"] == pytest.approx(0.01)  # spread 0.004, floored
    assert doc["seeds_measured"] == [0, 1, 2] and doc["versions"]["attack:badnets"] and doc["command"] == "cmd"
    assert doc["format"] == FORMAT == 2 and list(doc)[0] == "format"
    assert make_golden({2: runs[2], 0: runs[0], 1: runs[1]}, spec, "cmd")["checks"] == doc["checks"]  # seed order
    with pytest.raises(HarnessError, match="at least two seeds"):
        make_golden({0: runs[0]}, spec, "cmd")
    with pytest.raises(HarnessError, match="1 of 2 seeds"):
        make_golden({0: runs[0], 1: [cell("ep", asr=0.1)]}, spec, "cmd")


def test_compare_by_hand():
    doc = {"checks": [
        {"dataset": "d", "model": "m", "attack": "a", "defense": "none", "metric": "asr", "kind": "absolute",
         "direction": "min", "ref": 0.9, "delta": 0.05, "values": [0.87, 0.92, 0.9]},
        {"dataset": "d", "model": "m", "attack": "a", "defense": "ep", "metric": "asr", "kind": "absolute",
         "direction": "max", "ref": 0.1, "delta": 0.05, "values": [0.08, 0.13, 0.09]},
        {"dataset": "d", "model": "m", "attack": "a", "defense": "ep", "metric": "robust_acc", "kind": "absolute",
         "direction": "near", "ref": 0.5, "delta": 0.1, "values": [0.45, 0.55, 0.5]}]}
    assert compare([cell("none", asr=0.85), cell("ep", asr=0.15, robust_acc=0.6)], doc) == []  # all at the bounds
    assert compare([cell("none", asr=0.99), cell("ep", asr=0.0, robust_acc=0.5)], doc) == []  # better is fine
    fails = compare([cell("none", asr=0.8), cell("ep", asr=0.2, robust_acc=0.3)], doc)
    assert len(fails) == 3
    assert fails[0] == ("d/m/a/none asr (absolute): 0.8000, expected >= 0.8500 "
                        "(ref 0.9000 +- 0.0500, seeds spread [0.87, 0.92])")
    assert "expected <= 0.1500" in fails[1] and "expected in [0.4000, 0.6000]" in fails[2]
    failed = cell("ep", status={"asr": Unfinished(status="failed", reason="x")})
    assert compare([cell("none", asr=0.9), failed], doc)[0] == "d/m/a/ep asr (absolute): no value (asr: failed)"


def three_seeds():
    """Undefended and defended cells of 3 seeds; the numbers of the hand computations below."""
    return {0: [cell("none", asr=0.90, clean_acc=0.50), cell("ep", asr=0.05, clean_acc=0.48)],
            1: [cell("none", asr=0.70, clean_acc=0.46), cell("ep", asr=0.03, clean_acc=0.44)],
            2: [cell("none", asr=0.80, clean_acc=0.52), cell("ep", asr=0.10, clean_acc=0.51)]}


def test_paired_checks_by_hand():
    doc = make_golden(three_seeds(), load_matrix(ROOT / "configs" / "golden-tiny.yaml"), "cmd")
    checks = {(c["defense"], c["metric"], c["kind"]): c for c in doc["checks"]}
    # the baseline row: absolute checks only
    assert {k for k in checks if k[0] == "none"} == {("none", "asr", "absolute"), ("none", "clean_acc", "absolute")}
    # ep asr minus the undefended asr of the same seed: -0.85, -0.67, -0.70 -> mean -0.74, spread 0.18
    paired = checks[("ep", "asr", "paired")]
    assert paired["values"] == [-0.85, -0.67, -0.7] and paired["baseline"] == "none"
    assert paired["ref"] == pytest.approx(-0.74) and paired["delta"] == pytest.approx(0.18)
    assert paired["direction"] == "max"
    # ep asr itself: 0.05, 0.03, 0.10 -> spread 0.07 <= 0.18: the absolute check is the tighter one and stays
    absolute = checks[("ep", "asr", "absolute")]
    assert absolute["values"] == [0.05, 0.03, 0.1] and absolute["delta"] == pytest.approx(0.07)
    assert absolute["ref"] == pytest.approx(0.06)
    # ep clean_acc minus the undefended one: -0.02, -0.02, -0.01 -> mean -0.0167, spread 0.01 (the floor);
    # clean_acc itself spreads 0.44..0.51 (0.07 > 0.01): the absolute check is dropped
    paired = checks[("ep", "clean_acc", "paired")]
    assert paired["values"] == [-0.02, -0.02, -0.01] and paired["ref"] == pytest.approx(-0.0167)
    assert paired["delta"] == pytest.approx(MIN_DELTA) and paired["direction"] == "min"
    assert ("ep", "clean_acc", "absolute") not in checks
    assert len(doc["checks"]) == 5
    # the run itself holds, seed by seed
    for cells in three_seeds().values():
        assert compare(cells, doc) == []


def test_a_paired_check_catches_what_a_loose_absolute_one_misses():
    """Undefended ASR 0.9, defense ASR 0.5: within an absolute bound of 0.1 + 0.45, but the defense now removes
    0.4 of the 0.85 it removed."""
    where = {"dataset": "d", "model": "m", "attack": "a", "defense": "ep", "metric": "asr", "direction": "max"}
    doc = {"checks": [{**where, "kind": "absolute", "ref": 0.1, "delta": 0.45, "values": [0.0, 0.45, 0.1]},
                      {**where, "kind": "paired", "baseline": "none", "ref": -0.85, "delta": 0.05,
                       "values": [-0.88, -0.83, -0.84]}]}
    assert compare([cell("none", asr=0.9), cell("ep", asr=0.05)], doc) == []
    assert compare([cell("none", asr=0.6), cell("ep", asr=0.0)], doc)[0].startswith("d/m/a/ep asr (paired")
    fails = compare([cell("none", asr=0.9), cell("ep", asr=0.5)], doc)
    assert fails == ["d/m/a/ep asr (paired: minus the undefended asr of the same seed): -0.4000 (= 0.5000 - 0.9000), "
                     "expected <= -0.8000 (ref -0.8500 +- 0.0500, seeds spread [-0.88, -0.83])"]


def test_a_paired_check_without_its_baseline_fails_with_a_clear_line():
    doc = make_golden(three_seeds(), load_matrix(ROOT / "configs" / "golden-tiny.yaml"), "cmd")
    ep = three_seeds()[0][1]
    lines = compare([ep], doc)
    assert "d/m/a/ep asr (paired: minus the undefended asr of the same seed): no value of its baseline cell " \
           "d/m/a/none (cell missing)" in lines
    assert "d/m/a/none asr (absolute): no value (cell missing)" in lines
    no_clean = compare([cell("none", asr=0.9), ep], doc)
    assert no_clean == ["d/m/a/none clean_acc (absolute): no value (metric missing)",
                        "d/m/a/ep clean_acc (paired: minus the undefended clean_acc of the same seed): "
                        "no value of its baseline cell d/m/a/none (metric missing)"]
    not_baseline = compare([cell("none", baseline=False, asr=0.9, clean_acc=0.5), ep], doc)
    assert [line for line in not_baseline if "paired" in line] == [
        f"d/m/a/ep {m} (paired: minus the undefended {m} of the same seed): no value of its baseline cell "
        f"d/m/a/none (not a baseline row)" for m in ("asr", "clean_acc")]


def test_cells_without_a_baseline_row_get_absolute_checks_and_two_baselines_are_refused():
    spec = load_matrix(ROOT / "configs" / "golden-tiny.yaml")
    runs = {s: [cell("ep", asr=0.1 + s / 10), cell("ft", asr=0.2)] for s in (0, 1)}
    assert {c["kind"] for c in make_golden(runs, spec, "cmd")["checks"]} == {"absolute"}
    runs = {s: [cell("none", asr=0.9), cell("other", baseline=True, asr=0.9), cell("ep", asr=0.1)] for s in (0, 1)}
    with pytest.raises(HarnessError, match="two baseline rows"):
        make_golden(runs, spec, "cmd")


def test_value_spreads_give_back_a_paired_cells_own_spread():
    doc = make_golden(three_seeds(), load_matrix(ROOT / "configs" / "golden-tiny.yaml"), "cmd")
    spreads = value_spreads(doc)
    assert spreads[("d", "m", "a", "ep", "asr")] == pytest.approx(0.07)  # its absolute check
    assert spreads[("d", "m", "a", "ep", "clean_acc")] == pytest.approx(0.07)  # 0.48, 0.44, 0.51 rebuilt
    assert spreads[("d", "m", "a", "none", "clean_acc")] == pytest.approx(0.06)


V1 = """\
command: harness golden spec.yaml --seeds 0 1 --out v1.yaml
seeds_measured: [0, 1]
matrix: {name: x}
checks:
- {dataset: d, model: m, attack: a, defense: none, metric: asr, direction: min, ref: 0.9, delta: 0.05,
   spread: [0.87, 0.92]}
- {dataset: d, model: m, attack: a, defense: ep, metric: asr, direction: max, ref: 0.1, delta: 0.05,
   spread: [0.08, 0.13]}
"""


def test_a_format_1_file_loads_and_compares_as_absolute_checks(tmp_path):
    path = tmp_path / "v1.yaml"
    path.write_text(V1)
    doc = load_golden(path)
    assert compare([cell("none", asr=0.9), cell("ep", asr=0.15)], doc) == []
    assert compare([cell("none", asr=0.8), cell("ep", asr=0.2)], doc) == [
        "d/m/a/none asr (absolute): 0.8000, expected >= 0.8500 (ref 0.9000 +- 0.0500, seeds spread [0.87, 0.92])",
        "d/m/a/ep asr (absolute): 0.2000, expected <= 0.1500 (ref 0.1000 +- 0.0500, seeds spread [0.08, 0.13])"]
    assert value_spreads(doc) == {("d", "m", "a", "none", "asr"): 0.05, ("d", "m", "a", "ep", "asr"): 0.05}


@pytest.mark.parametrize("edit, message", [
    (lambda t: "format: 3\n" + t, "format 3"),
    (lambda t: "format: 2\n" + t.replace("metric: asr, direction: max", "metric: asr, kind: diff, direction: max"),
     "kind 'diff'"),
    (lambda t: "format: 2\n" + t.replace("metric: asr, direction: max", "metric: asr, kind: paired, direction: max"),
     "check 2 lacks baseline"),
    (lambda t: t.replace("direction: max, ", ""), "check 2 lacks direction"),
])
def test_a_malformed_golden_file_is_refused_with_what_to_do(tmp_path, edit, message):
    path = tmp_path / "bad.yaml"
    path.write_text(edit(V1))
    with pytest.raises(HarnessError, match=message) as err:
        load_golden(path)
    assert "regenerate" in str(err.value) or "expected one of" in str(err.value)


def test_harness_golden_records_the_command_that_regenerates_the_file(monkeypatch):
    args = build_parser().parse_args(["golden", "configs/golden-tiny.yaml", "--seeds", "0", "1", "--out", "t.yaml",
                                      "--no-progress"])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert golden_command(args) == "harness golden configs/golden-tiny.yaml --seeds 0 1 --out t.yaml"
    args = build_parser().parse_args(["golden", "my spec.yaml", "--out", "t.yaml", "--workers", "2",
                                      "--device", "cpu"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert golden_command(args) == ("OMP_NUM_THREADS=1 harness golden 'my spec.yaml' --seeds 0 1 2 3 4 --out t.yaml "
                                    "--device cpu --workers 2")
    assert args.workers == 2 and build_parser().parse_args(["golden", "s", "--out", "o"]).workers == 1


def test_harness_golden_refuses_fewer_than_one_worker(capsys):
    from backdoor_harness.cli import main

    assert main(["golden", "configs/golden-tiny.yaml", "--out", "never.yaml", "--workers", "0"]) == 2
    assert "--workers 0: workers must be at least 1" in capsys.readouterr().err


def test_a_missing_golden_file_says_how_to_write_one(tmp_path):
    with pytest.raises(HarnessError, match="harness golden"):
        load_golden(tmp_path / "nope.yaml")


def test_there_are_golden_files():
    assert GOLDEN, "tests/golden/ holds no golden files"


def _golden_param(path):
    """A golden file named *-slow.yaml runs only with --runslow (its matrix is too heavy for make test)."""
    return pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if path.stem.endswith("-slow") else [])


@pytest.mark.golden
@pytest.mark.parametrize("path", [_golden_param(p) for p in GOLDEN])
def test_golden_numbers_hold(harness_golden, path):
    cells = harness_golden(path)
    assert cells  # and every check held (harness_golden fails otherwise)


def test_the_pytest_plugin_comes_through_its_entry_point(request):
    assert request.config.pluginmanager.has_plugin("backdoor_harness")
    assert "golden" in {m.split(":")[0] for m in request.config.getini("markers")}
