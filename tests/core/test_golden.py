"""Golden numbers: the comparison rules by hand, and the tiny matrix against tests/golden/."""

from __future__ import annotations

import pytest

from backdoor_harness.errors import HarnessError
from backdoor_harness.golden import compare, direction, load_golden, make_golden
from backdoor_harness.matrix import load_matrix
from backdoor_harness.results import ResultCell, Unfinished, installed_metric_info
from backdoor_harness.store import Metric

from helpers import ROOT

GOLDEN = sorted((ROOT / "tests" / "golden").glob("*.yaml"))


def cell(defense, status=None, **metrics):
    return ResultCell(dataset="d", model="m", attack="a", defense=defense, metrics=metrics, status=status or {},
                      baseline=defense == "none")


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
            assert direction(meta, check["defense"] == "none") == check["direction"], (path.name, check)


def test_make_golden_takes_directions_from_the_cells():
    spec = load_matrix(ROOT / "configs" / "golden-tiny.yaml")
    runs = {s: [cell("none", asr=0.9).model_copy(update={"metric_info": {"asr": info("asr")}}),
                cell("ft", asr=0.1).model_copy(update={"metric_info": {"asr": info("asr")}})] for s in (0, 1)}
    assert [c["direction"] for c in make_golden(runs, spec, "cmd")["checks"]] == ["min", "max"]


def test_ref_is_the_seed_mean_and_delta_the_spread_with_a_floor():
    spec = load_matrix(ROOT / "configs" / "golden-tiny.yaml")
    runs = {0: [cell("none", asr=0.90, clean_acc=0.50)], 1: [cell("none", asr=0.80, clean_acc=0.504)],
            2: [cell("none", asr=0.85, clean_acc=0.502)]}
    doc = make_golden(runs, spec, "cmd")
    checks = {c["metric"]: c for c in doc["checks"]}
    assert checks["asr"]["ref"] == pytest.approx(0.85) and checks["asr"]["delta"] == pytest.approx(0.10)
    assert checks["asr"]["spread"] == [0.8, 0.9]
    assert checks["clean_acc"]["delta"] == pytest.approx(0.01)  # spread 0.004, floored
    assert doc["seeds_measured"] == [0, 1, 2] and doc["versions"]["attack:badnets"] and doc["command"] == "cmd"
    with pytest.raises(HarnessError, match="at least two seeds"):
        make_golden({0: runs[0]}, spec, "cmd")
    with pytest.raises(HarnessError, match="1 of 2 seeds"):
        make_golden({0: runs[0], 1: [cell("ep", asr=0.1)]}, spec, "cmd")


def test_compare_by_hand():
    doc = {"checks": [
        {"dataset": "d", "model": "m", "attack": "a", "defense": "none", "metric": "asr", "direction": "min",
         "ref": 0.9, "delta": 0.05, "spread": [0.87, 0.92]},
        {"dataset": "d", "model": "m", "attack": "a", "defense": "ep", "metric": "asr", "direction": "max",
         "ref": 0.1, "delta": 0.05, "spread": [0.08, 0.13]},
        {"dataset": "d", "model": "m", "attack": "a", "defense": "ep", "metric": "robust_acc", "direction": "near",
         "ref": 0.5, "delta": 0.1, "spread": [0.45, 0.55]}]}
    assert compare([cell("none", asr=0.85), cell("ep", asr=0.15, robust_acc=0.6)], doc) == []  # all at the bounds
    assert compare([cell("none", asr=0.99), cell("ep", asr=0.0, robust_acc=0.5)], doc) == []  # better is fine
    fails = compare([cell("none", asr=0.8), cell("ep", asr=0.2, robust_acc=0.3)], doc)
    assert len(fails) == 3
    assert fails[0].startswith("d/m/a/none asr: 0.8000, expected >= 0.8500")
    assert "expected <= 0.1500" in fails[1] and "expected in [0.4000, 0.6000]" in fails[2]
    failed = cell("ep", status={"asr": Unfinished(status="failed", reason="x")})
    assert compare([cell("none", asr=0.9), failed], doc)[0] == "d/m/a/ep asr: no value (asr: failed)"


def test_a_missing_golden_file_says_how_to_write_one(tmp_path):
    with pytest.raises(HarnessError, match="harness golden"):
        load_golden(tmp_path / "nope.yaml")


def test_there_are_golden_files():
    assert GOLDEN, "tests/golden/ holds no golden files"


@pytest.mark.golden
@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden_numbers_hold(harness_golden, path):
    cells = harness_golden(path)
    assert cells  # and every check held (harness_golden fails otherwise)


def test_the_pytest_plugin_comes_through_its_entry_point(request):
    assert request.config.pluginmanager.has_plugin("backdoor_harness")
    assert "golden" in {m.split(":")[0] for m in request.config.getini("markers")}
