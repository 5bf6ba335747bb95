"""The executor and the store: failures, skips, locks, status/show/leaderboard."""

from __future__ import annotations

import json
import types

import pytest

import backdoor_harness as bh
from backdoor_harness import cli, registry
from backdoor_harness.leaderboard.render import render
from backdoor_harness.matrix import MatrixSpec
from backdoor_harness.runner import run_matrix
from backdoor_harness.store import JobRecord, Store, WorkdirLock


class Explodes(bh.Defense):
    name = "test_explodes"
    version = "1"
    summary = "raises"
    paper = "-"

    def purify(self, model, ctx):
        raise RuntimeError("boom in purify")


class VitOnly(bh.Defense):
    name = "test_vit_only"
    version = "1"
    summary = "supports only ViTs"
    paper = "-"
    families = frozenset({"vision_transformer"})

    def purify(self, model, ctx):  # pragma: no cover - never reached for a CNN
        return model


@pytest.fixture
def plugins():
    registry.register(types.SimpleNamespace(harness_defenses=bh.hookimpl(lambda: [Explodes, VitOnly])),
                      name="test-runner-defenses")
    yield
    registry.reset()


def spec(**over) -> MatrixSpec:
    base = {"datasets": [{"name": "cifar10", "train_per_class": 20, "test_per_class": 10}],
            "models": [{"name": "tiny_cnn", "kwargs": {"width": 8}}],
            "attacks": [{"name": "badnets", "config": {"stamp": "after_augment"}}],
            "defenses": ["none", "test_explodes", "test_vit_only"], "evaluators": ["clean_acc", "asr"],
            "recipe": {"base": "cpu-quick", "epochs": 1}}
    return MatrixSpec.model_validate({**base, **over})


@pytest.mark.integration
def test_failing_cell_is_recorded_and_the_rest_goes_on(tmp_path, plugins, capsys):
    counts = run_matrix(spec(), tmp_path, progress=False, log=lambda *a: None)
    assert counts == {"cached": 0, "done": 4, "failed": 1, "skipped": 3, "blocked": 2}
    store = Store(tmp_path)
    recs = {r.label: r for r in store.records()}
    failed = recs["purify cifar10/tiny_cnn/badnets/test_explodes/s0"]
    assert failed.status == "failed" and "RuntimeError: boom in purify" in failed.error
    assert "Traceback" in failed.error
    skipped = recs["purify cifar10/tiny_cnn/badnets/test_vit_only/s0"]
    assert skipped.status == "skipped" and "vision_transformer" in skipped.error and "tiny_cnn" in skipped.error
    blocked = recs["evaluate cifar10/tiny_cnn/badnets/test_explodes/asr/s0"]
    assert blocked.status == "blocked" and "failed" in blocked.error
    assert recs["evaluate cifar10/tiny_cnn/badnets/none/asr/s0"].status == "done"

    # the leaderboard shows the failure as such, never as a number
    cells = {c["defense"]: c for c in json.loads(render(store.records(), "json"))}
    assert cells["test_explodes"]["metrics"] == {}
    assert cells["test_explodes"]["status"]["asr"]["status"] == "blocked"
    text = render(store.records(), "text")
    line = next(l for l in text.splitlines() if l.startswith("test_explodes"))
    assert "blocked" in line and "0.00" not in line

    # status lists it; show prints one record; a rerun retries failed work only
    assert cli.main(["status", "--workdir", str(tmp_path)]) == 0
    assert "boom in purify" in capsys.readouterr().out
    assert cli.main(["show", failed.key[:10], "--workdir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "failed"
    again = run_matrix(spec(), tmp_path, progress=False, log=lambda *a: None)
    assert again["cached"] == 7 and again["failed"] == 1 and again["done"] == 0


def test_second_run_on_a_workdir_is_refused_clearly(tmp_path):
    with WorkdirLock(tmp_path):
        with pytest.raises(bh.HarnessError, match="in use by another `harness run`"):
            with WorkdirLock(tmp_path):
                pass
    with WorkdirLock(tmp_path):  # released
        pass


def test_store_roundtrip_and_jsonl(tmp_path):
    store = Store(tmp_path)
    rec = JobRecord(key="abc", kind="evaluate", label="x", status="done", attrs={"seed": 0},
                    metrics={"asr": 0.25}, started=1.0, finished=2.5, wall_s=1.5)
    store.put(rec)
    assert store.get("abc") == rec
    assert store.find("ab") == [rec]
    assert store.export_jsonl(tmp_path / "r.jsonl") == 1
    assert JobRecord.model_validate_json((tmp_path / "r.jsonl").read_text()) == rec


def test_leaderboard_averages_seeds_and_marks_missing():
    def ev(defense, attack, seed, metrics, status="done"):
        return {"kind": "evaluate", "status": status, "error": None if status == "done" else "x\nwhy",
                "metrics": metrics, "attrs": {"dataset": "d", "model": "m", "attack": attack,
                                              "defense": defense, "seed": seed, "evaluator": "asr"}}

    recs = [ev("none", "a", 0, {"asr": 0.9}), ev("none", "a", 1, {"asr": 0.8}),
            ev("ft", "a", 0, {}, status="failed"), ev("ft", "b", 0, {"asr": 0.1})]
    cells = {(c["defense"], c["attack"]): c for c in json.loads(render(recs, "json"))}
    assert cells[("none", "a")]["metrics"]["asr"] == pytest.approx(0.85)
    assert cells[("none", "a")]["seeds"] == [0, 1]
    md = render(recs, "markdown")
    assert "| none" in md and "85.00" in md and "failed" in md
    # only the metric some cell has becomes a column; (none, b) was never run: a dash, not a number
    header = md.splitlines()[2]
    assert "a ASR" in header and "b ASR" in header and "C-Acc" not in header
    none_row = next(l for l in md.splitlines() if l.startswith("| none"))
    assert none_row.count("—") == 1
    ft_row = next(l for l in md.splitlines() if l.startswith("| ft"))
    assert ft_row.count("failed") == 1 and "10.00" in ft_row


def test_leaderboard_keeps_a_labelled_evaluator_apart_and_shows_t_plainly():
    def ev(label, metrics, name="qra"):
        return {"kind": "evaluate", "status": "done", "error": None, "metrics": metrics,
                "config": {"evaluator": {"name": name, "config": {}}, "seed": 0},
                "attrs": {"dataset": "d", "model": "m", "attack": "a", "defense": "ft", "seed": 0,
                          "evaluator": label}}

    recs = [ev("qra", {"qra_p_asr": 0.9}), ev("qra_kl", {"qra_p_asr": 0.5}),
            ev("lmc", {"lmc_escape_t": 0.55}, name="lmc")]
    cell = json.loads(render(recs, "json"))[0]
    assert cell["metrics"] == {"qra_p_asr": 0.9, "qra_p_asr@qra_kl": 0.5, "lmc_escape_t": 0.55}  # not 0.7
    md = render(recs, "markdown")
    assert "a QRA P-ASR [qra_kl]" in md.splitlines()[2]
    row = next(l for l in md.splitlines() if l.startswith("| ft"))
    assert "90.00" in row and "50.00" in row and "0.55" in row and "55.00" not in row
