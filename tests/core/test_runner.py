"""The executor and the store: failures, skips, claims, status/show/leaderboard."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
import types

import pytest
import torch
import yaml

import backdoor_harness as bh
from backdoor_harness import cli, registry
from backdoor_harness.leaderboard.render import render
from backdoor_harness.matrix import MatrixSpec
from backdoor_harness.scheduler import run_matrix
from backdoor_harness.store import FINISHED, JobRecord, RunLease, Store, active_runs


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


class Reports(bh.Defense):
    name = "test_reports"
    version = "1"
    summary = "returns the model, reporting what it looked at"
    paper = "-"

    def purify(self, model, ctx):
        import torch

        return bh.Purified(model, {"flagged": torch.tensor([3]), "scores": (0.5, torch.tensor(1.5))})


class BareModel(bh.Defense):
    name = "test_bare_model"
    version = "1"
    summary = "returns the model itself, not a Purified"
    paper = "-"

    def purify(self, model, ctx):
        return model


class NoModel(bh.Defense):
    name = "test_no_model"
    version = "1"
    summary = "returns Purified(None)"
    paper = "-"

    def purify(self, model, ctx):
        return bh.Purified(None)


class FalseBaseline(bh.Defense):
    name = "test_false_baseline"
    version = "1"
    summary = "declares baseline = True (the model as it is) but changes the weights"
    paper = "-"
    baseline = True

    def purify(self, model, ctx):
        model = copy.deepcopy(model)
        with torch.no_grad():
            next(model.parameters()).mul_(0.5)
        return bh.Purified(model)


@pytest.fixture
def plugins():
    registry.register(types.SimpleNamespace(harness_defenses=bh.hookimpl(
        lambda: [Explodes, VitOnly, Reports, BareModel, NoModel, FalseBaseline])),
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


def test_a_job_is_claimed_by_one_live_run_and_a_dead_runs_claim_is_taken_over(tmp_path):
    store = Store(tmp_path)
    with RunLease(tmp_path) as a, RunLease(tmp_path) as b:
        assert set(active_runs(tmp_path)) == {a.id, b.id}
        assert store.claim("k1", a.id) is None and store.claim("k1", a.id) is None  # ours, idempotent
        assert store.claim("k1", b.id) == a.id  # a live run holds it
        assert store.claims() == {"k1": a.id}
    # a ended (its lease is gone): its claim is taken over
    with RunLease(tmp_path) as c:
        assert store.claim("k1", c.id) is None
        # a run killed without cleaning up (the kernel drops its lock, the file stays) counts as dead
        code = ("import os, sys; from backdoor_harness.store import RunLease, Store; "
                "lease = RunLease(sys.argv[1]).__enter__(); Store(sys.argv[1]).claim('k2', lease.id); "
                "print(lease.id); os._exit(0)")
        dead = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                              check=True).stdout.strip()
        assert (tmp_path / ".runs" / dead).exists() and list(active_runs(tmp_path)) == [c.id]
        assert store.claim("k2", c.id) is None
        # a final record releases its claim; a job finished after a run began is not claimed again
        store.put(JobRecord(key="k2", kind="train", label="x", status="done", attrs={"dataset": "d", "seed": 0},
                            finished=time.time()))
        assert "k2" not in store.claims()
        assert store.claim("k2", c.id, since=time.time() - 60) == FINISHED
        assert store.claim("k2", c.id, since=time.time() + 60) is None  # finished before: recompute allowed
        store.release_all(c.id)
        assert store.claims() == {}
    assert active_runs(tmp_path) == {}


def test_store_roundtrip_and_jsonl(tmp_path):
    store = Store(tmp_path)
    rec = JobRecord(key="abc", kind="evaluate", label="x", status="done", attrs={"dataset": "d", "seed": 0},
                    metrics={"asr": 0.25}, started=1.0, finished=2.5, wall_s=1.5,
                    plugin={"name": "asr", "version": "1", "config": {}},
                    metric_info={"asr": {"higher_is_better": False, "title": "ASR", "board": 20}})
    store.put(rec)
    assert store.get("abc") == rec
    assert store.find("ab") == [rec]
    assert store.export_jsonl(tmp_path / "r.jsonl") == 1
    assert JobRecord.model_validate_json((tmp_path / "r.jsonl").read_text()) == rec


@pytest.mark.integration
def test_a_corrupt_or_truncated_checkpoint_is_detected_and_recomputed(tmp_path):
    quick = spec(defenses=["none", {"name": "ft", "config": {"epochs": 1}}])
    lines: list[str] = []
    run_matrix(quick, tmp_path, progress=False, log=lines.append)
    store = Store(tmp_path)
    before = {r.key: r for r in store.records()}
    train = next(r for r in before.values() if r.kind == "train")
    ft = next(r for r in before.values() if r.kind == "purify" and r.attrs.defense == "ft")
    raw = bytearray((tmp_path / train.artifact).read_bytes())
    raw[-100] ^= 0xFF  # one flipped byte in the weights: still a loadable file
    (tmp_path / train.artifact).write_bytes(bytes(raw))
    path = tmp_path / ft.artifact
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert not store.is_final(train.key) and not store.is_final(ft.key)
    store.close()
    lines.clear()
    counts = run_matrix(quick, tmp_path, progress=False, log=lines.append)
    assert counts["done"] == 2 and counts["failed"] == 0, counts  # exactly the two, nothing else reran
    assert sum("does not match its recorded sha256" in line for line in lines) == 2
    store = Store(tmp_path)
    after = {r.key: r for r in store.records()}
    assert after[train.key].artifact_sha256 == train.artifact_sha256  # deterministic: the same weights again
    assert {k: r.metrics for k, r in after.items() if r.kind == "evaluate"} == \
        {k: r.metrics for k, r in before.items() if r.kind == "evaluate"}
    store.close()


def test_a_done_model_job_recorded_without_an_artifact_is_recomputed(tmp_path):
    """Old work directories: a train or purify job recorded done with no artifact (a defense that returned
    None, before plugin outputs were checked) is not final: it runs again, and the evaluations it failed too."""
    quick = spec(defenses=["none", {"name": "ft", "config": {"epochs": 1}}])
    run_matrix(quick, tmp_path, progress=False, log=lambda *a: None)
    store = Store(tmp_path)
    before = {r.key: r for r in store.records()}
    train = next(r for r in before.values() if r.kind == "train")
    ft = next(r for r in before.values() if r.kind == "purify" and r.attrs.defense == "ft")
    (tmp_path / ft.artifact).unlink()  # never written; the train job's checkpoint is still on disk
    for rec in (train, ft):
        store.put(rec.model_copy(update={"artifact": None, "artifact_sha256": None}))
    failed = [r for r in before.values() if r.kind == "evaluate" and ft.key in r.deps]
    for rec in failed:  # what the evaluations of a purified model that is not there came to
        store.put(rec.model_copy(update={"status": "failed", "metrics": {}, "error": "TypeError: NoneType"}))
    assert not store.is_final(train.key) and not store.is_final(ft.key)
    store.close()
    lines: list[str] = []
    counts = run_matrix(quick, tmp_path, progress=False, log=lines.append)
    assert counts["done"] == 2 + len(failed) and counts["failed"] == 0, counts
    assert sum("recorded done with no artifact" in line and "recomputing" in line for line in lines) == 2, lines
    store = Store(tmp_path)
    after = {r.key: r for r in store.records()}
    for rec in (train, ft):
        assert after[rec.key].status == "done" and after[rec.key].artifact == rec.artifact
        assert after[rec.key].artifact_sha256 == rec.artifact_sha256 and store.is_final(rec.key)
    assert all(after[r.key].status == "done" and after[r.key].metrics == r.metrics for r in failed)
    store.close()


def test_status_counts_queued_jobs_and_estimates_the_time_left():
    from backdoor_harness.matrix import expand
    from backdoor_harness.status import summarize

    train, purify, acc, asr = expand(spec(defenses=["none"]))

    def rec(job, status, wall_s=None, started=None):
        return JobRecord(key=job.key, kind=job.kind, label=job.label, status=status, attrs=job.cell,
                         config=job.payload, wall_s=wall_s, started=started)

    done = [rec(train, "done", 100.0), rec(purify, "done", 2.0), rec(acc, "done", 4.0)]
    info = summarize(done, [train, purify, acc, asr], now=1000.0)
    assert info["counts"][("evaluate", "queued")] == 1
    assert info["seconds_left"] == pytest.approx(4.0)  # asr: no asr history, so the evaluate kind's mean
    info = summarize(done + [rec(asr, "running", started=999.0)], [train, purify, acc, asr], now=1000.0)
    assert ("evaluate", "queued") not in info["counts"] and [r.key for r in info["running"]] == [asr.key]
    assert info["seconds_left"] == pytest.approx(3.0)  # credited with the second it has run
    info = summarize([rec(train, "done", 100.0)], [train, purify, acc, asr], now=1000.0)
    assert info["seconds_left"] == 0.0 and info["unestimated"] == 3  # no purify/evaluate finished yet


def test_status_command_after_a_run(tmp_path, capsys):
    run_matrix(spec(defenses=["none"]), tmp_path, progress=False, log=lambda *a: None)
    assert (tmp_path / "matrix.json").exists()
    assert cli.main(["status", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no run is active" in out and "estimated time left: 0.0 min" in out


@pytest.mark.integration
def test_a_defense_report_is_stored_in_its_purify_record(tmp_path, plugins):
    run_matrix(spec(defenses=["test_reports"], evaluators=["clean_acc"]), tmp_path, progress=False,
               log=lambda *a: None)
    store = Store(tmp_path)
    purify = next(r for r in store.records("purify"))
    store.close()
    assert purify.metrics["report"] == {"flagged": [3], "scores": [0.5, 1.5]}


@pytest.mark.integration
def test_a_defense_that_breaks_the_purify_contract_fails_its_cell(tmp_path, plugins):
    counts = run_matrix(spec(defenses=["test_bare_model", "test_no_model", "test_false_baseline"],
                             evaluators=["clean_acc"]), tmp_path, progress=False, log=lambda *a: None)
    assert counts["failed"] == 3 and counts["blocked"] == 3 and counts["done"] == 1  # the train job only
    store = Store(tmp_path)
    errors = {r.attrs.defense: r.error for r in store.records("purify")}
    store.close()
    assert "returned Normalized; purify() must return Purified(model, report)" in errors["test_bare_model"]
    assert "returned Purified with a NoneType as its model" in errors["test_no_model"]
    # a baseline's rows read the attacked model's predictions: one that changes the weights is refused
    assert "declares baseline = True" in errors["test_false_baseline"]


# -- plugin outputs are checked before a job is marked done (issue 18, item 7) ------------------------------


def _evaluator(name: str, value, curve: bool = False, out=None):
    """A test evaluator whose one metric (a rate in [0, 1]) gets ``value`` (or which returns ``out``)."""

    class Probe(bh.Evaluator):
        metrics = {"probe": bh.Metric(higher_is_better=True, doc="probe", curve=curve, range=(0.0, 1.0)),
                   "optional": bh.Metric(higher_is_better=True, doc="not always returned", range=(0.0, 1.0))}
        version = "1"
        summary = "returns a fixed value"
        paper = "-"

        def evaluate(self, ctx):
            return out if out is not None else {"probe": value}

    Probe.name = name
    return Probe


class Exits(bh.Defense):
    name = "test_exits"
    version = "1"
    summary = "calls sys.exit(0)"
    paper = "-"

    def purify(self, model, ctx):
        sys.exit(0)


PROBES = [_evaluator("test_nan", float("nan")), _evaluator("test_rate_7_5", 7.5),
          _evaluator("test_inf_curve", [0.5, float("inf")], curve=True), _evaluator("test_string", "0.5"),
          _evaluator("test_bool", True), _evaluator("test_returns_list", None, out=[0.5]),
          _evaluator("test_subset", 0.25), _evaluator("test_tensor", torch.tensor(0.75))]


@pytest.fixture
def probes():
    registry.register(types.SimpleNamespace(harness_evaluators=bh.hookimpl(lambda: PROBES),
                                            harness_defenses=bh.hookimpl(lambda: [Exits])), name="test-probes")
    yield
    registry.reset()


@pytest.mark.integration
def test_bad_plugin_outputs_fail_their_cell_and_sys_exit_never_ends_the_run(tmp_path, probes, capsys):
    doc = {"datasets": [{"name": "cifar10", "train_per_class": 20, "test_per_class": 10}],
           "models": [{"name": "tiny_cnn", "kwargs": {"width": 8}}],
           "attacks": [{"name": "badnets", "config": {"stamp": "after_augment"}}],
           "defenses": ["none", "test_exits"], "evaluators": [p.name for p in PROBES],
           "recipe": {"base": "cpu-quick", "epochs": 1}}
    counts = run_matrix(MatrixSpec.model_validate(doc), tmp_path, progress=False, log=lambda *a: None)
    # train, purify none, evaluate test_subset and test_tensor done; purify test_exits and 6 evaluations failed
    assert counts == {"cached": 0, "done": 4, "failed": 7, "skipped": 0, "blocked": 8}
    store = Store(tmp_path)
    purify = {r.attrs.defense: r for r in store.records("purify")}
    evals = {r.attrs.evaluator: r for r in store.records("evaluate") if r.attrs.defense == "none"}
    store.close()
    assert purify["test_exits"].status == "failed" and "SystemExit(0)" in purify["test_exits"].error
    assert "must not call sys.exit()" in purify["test_exits"].error and purify["test_exits"].artifact is None
    reasons = {name: rec.error.strip().splitlines()[-1] for name, rec in evals.items() if rec.error}
    assert "metric 'probe' is nan (float), not a finite number" in reasons["test_nan"]
    assert "metric 'probe' is 7.5, outside its declared range [0.0, 1.0]" in reasons["test_rate_7_5"]
    assert "metric 'probe'[1] is inf (float), not a finite number" in reasons["test_inf_curve"]
    assert "metric 'probe' is '0.5' (str), not a finite number" in reasons["test_string"]
    assert "metric 'probe' is True (bool), not a finite number" in reasons["test_bool"]
    assert "returned list; evaluate() must return a mapping" in reasons["test_returns_list"]
    for name in ("test_nan", "test_rate_7_5", "test_inf_curve", "test_string", "test_bool", "test_returns_list"):
        assert evals[name].status == "failed" and evals[name].metrics == {}
    # a declared metric left out (here `optional`) is legitimate; a 0-d tensor is a number
    assert evals["test_subset"].status == "done" and evals["test_subset"].metrics == {"probe": 0.25}
    assert evals["test_tensor"].status == "done" and evals["test_tensor"].metrics == {"probe": 0.75}

    # through the CLI: the run ends (exit 1: cells did not finish), never exit 0 from the plugin's sys.exit
    path = tmp_path / "probes.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["run", str(path), "--workdir", str(tmp_path), "--no-progress"]) == 1
    assert "did not finish" in capsys.readouterr().err


def test_status_shows_a_records_text_without_escape_sequences(tmp_path, capsys):
    store = Store(tmp_path)
    store.put(JobRecord(key="e" * 24, kind="evaluate", label="evil \x1b[31mred\x1b[0m\u2028# head", status="failed",
                        attrs={"dataset": "d", "seed": 0}, error="Traceback ...\nValueError: boom \x1b]0;title\x07"))
    store.close()
    assert cli.main(["status", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("failed"))
    assert "\x1b" not in out and "\x07" not in out and "\u2028" not in out
    assert "evil red # head" in line and "ValueError: boom" in line


def test_a_cells_poison_rate_is_a_finite_rate():
    for bad in (float("nan"), float("inf"), -0.1, 1.5):
        with pytest.raises(ValueError):
            JobRecord(key="k", kind="train", label="x", status="done", attrs={"dataset": "d", "seed": 0,
                                                                              "poison_rate": bad})


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    """`harness leaderboard | head`: the reader goes away; no traceback, the exit status of a broken pipe."""
    run_matrix(spec(defenses=["none"]), tmp_path, progress=False, log=lambda *a: None)
    proc = subprocess.Popen([sys.executable, "-m", "backdoor_harness.cli", "leaderboard", "--workdir", str(tmp_path),
                             "--wide"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # nobody reads
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and "Traceback" not in err, err
