"""Predictions computed once per (model checkpoint, test images, trigger) and kept with the results.

The forward passes over test sets are counted by wrapping the ``predict`` that
:mod:`backdoor_harness.predictions` calls (in this process with monkeypatch; in pool
workers with a module named in ``HARNESS_PLUGINS`` that wraps it there and appends a line to a
file per pass)."""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
import time

import pytest
import torch

from backdoor_harness import cli, predictions, registry
from backdoor_harness.data import DataSpec, load_dataset
from backdoor_harness.errors import HarnessError
from backdoor_harness.handlers import JobRunner
from backdoor_harness.matrix import MatrixSpec, expand
from backdoor_harness.metrics import accuracy, attack_success_rate, robust_accuracy
from backdoor_harness.predictions import PredictionStore, load
from backdoor_harness.registry import create
from backdoor_harness.scheduler import run_matrix
from backdoor_harness.store import JobRecord, Store
from backdoor_harness.train import predict

from helpers import CPU, noise_set, tiny

ALL = ["clean_acc", "asr", "robust_acc", "der", "clean_asr"]


def spec(evaluators: list[str], **over) -> MatrixSpec:
    base = {"datasets": [{"name": "cifar10", "train_per_class": 20, "test_per_class": 10}],
            "models": [{"name": "tiny_cnn", "kwargs": {"width": 8}}],
            "attacks": [{"name": "badnets", "config": {"stamp": "after_augment"}}],
            "defenses": ["none", {"name": "ft", "config": {"epochs": 1}}], "evaluators": evaluators,
            "recipe": {"base": "cpu-quick", "epochs": 1}}
    return MatrixSpec.model_validate({**base, **over})


class Counter:
    """Wraps the predictions module's ``predict``: one entry per forward pass over a test set."""

    def __init__(self, monkeypatch):
        self.calls: list[int] = []
        real = predictions.predict

        def counted(model, images, device, *args, **kwargs):
            self.calls.append(len(images))
            return real(model, images, device, *args, **kwargs)

        monkeypatch.setattr(predictions, "predict", counted)


def content(path) -> tuple:
    """What a predictions file holds, but the time it was written."""
    index, pred, meta = predictions._read(path)
    return index.tolist(), pred.tolist(), {k: v for k, v in meta.items() if k != "created"}


def files(workdir) -> list:
    return sorted((workdir / "predictions").glob("*.safetensors"))


def evaluations(workdir) -> dict[tuple[str, str], JobRecord]:
    store = Store(workdir)
    out = {(r.attrs.defense, r.attrs.evaluator): r for r in store.records("evaluate")}
    store.close()
    return out


#: what each evaluator reads: "role:split"
READS = {"clean_acc": {"purified:clean"}, "asr": {"purified:poisoned"}, "robust_acc": {"purified:poisoned"},
         "der": {"backdoored:clean", "backdoored:poisoned", "purified:clean", "purified:poisoned"},
         "clean_asr": {"clean:poisoned"}}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One run of a cell with every prediction-based evaluator and two defenses, passes counted."""
    workdir = tmp_path_factory.mktemp("predictions")
    mp = pytest.MonkeyPatch()
    counter = Counter(mp)
    try:
        counts = run_matrix(spec(ALL), workdir, device="cpu", progress=False, log=lambda *a: None)
    finally:
        mp.undo()
    assert counts["failed"] == counts["blocked"] == 0, counts
    return workdir, counter.calls


def test_one_forward_pass_per_model_and_split_for_a_cell_with_every_prediction_evaluator(full):
    workdir, calls = full
    recs = evaluations(workdir)
    assert {e for _, e in recs} == set(ALL) and {d for d, _ in recs} == {"none", "ft"}
    # backdoored x {clean, poisoned}, the clean model x poisoned, the purified model of ft x {clean, poisoned};
    # the baseline defense (`none`) returns the backdoored model itself: its rows read the backdoored predictions
    assert len(calls) == 2 + 1 + 2, calls
    assert len(files(workdir)) == len(calls)
    # each record names what it read; every evaluator of every row that reads a model and split reads one file
    by_model: dict[tuple[str, str], set[str]] = {}
    for (defense, evaluator), rec in recs.items():
        assert set(rec.predictions) == READS[evaluator], (evaluator, rec.predictions)
        for name, rel in rec.predictions.items():
            assert (workdir / rel).is_file() and rel.startswith("predictions/") and rel.endswith(".safetensors")
            role, split = name.split(":")
            same = role == "backdoored" or (role == "purified" and defense == "none")
            model = rec.deps[0] if same else (rec.deps[1] if role == "purified" else rec.deps[2])
            by_model.setdefault((model, split), set()).add(rel)
    assert len(by_model) == len(calls) and all(len(paths) == 1 for paths in by_model.values())
    # the backdoored model's predictions serve both defenses' DER
    assert recs[("none", "der")].predictions["backdoored:poisoned"] == recs[("ft", "der")].predictions[
        "backdoored:poisoned"]
    assert recs[("none", "der")].predictions["purified:clean"] == recs[("none", "der")].predictions["backdoored:clean"]
    # non-evaluate records read none
    store = Store(workdir)
    assert all(not r.predictions for r in store.records() if r.kind != "evaluate")
    store.close()


def test_the_files_map_back_to_the_test_images_and_give_the_recorded_metrics(full, capsys):
    workdir, _ = full
    recs = evaluations(workdir)
    jobs = {j.key: j for j in expand(spec(ALL))}
    train_job = jobs[recs[("ft", "asr")].deps[0]]
    _, test = load_dataset(DataSpec.model_validate(train_job.data))
    target = train_job.attack.config.get("target", 0)
    for defense in ("none", "ft"):
        got = load(workdir, recs[(defense, "der")].key[:12])  # a key prefix, as `harness show` takes
        clean, poisoned = got["purified:clean"], got["purified:poisoned"]
        assert torch.equal(clean.index, torch.arange(len(test)))
        # the poisoned split is exactly the non-target test images, in order
        assert torch.equal(poisoned.index, (test.labels != target).nonzero().flatten())
        assert poisoned.meta["split"] == "poisoned" and poisoned.meta["trigger_key"] == train_job.key
        assert clean.meta["trigger_key"] == "" and int(clean.meta["num_classes"]) == 10
        # the model whose predictions they are: the purified one, the attacked one itself for the baseline
        assert clean.meta["model"] == recs[(defense, "der")].deps[0 if defense == "none" else 1]
        # each number recomputed from the file and the test labels alone
        assert recs[(defense, "clean_acc")].metrics["clean_acc"] == accuracy(clean.pred, test.labels[clean.index])
        assert recs[(defense, "asr")].metrics["asr"] == attack_success_rate(
            poisoned.pred, torch.full_like(poisoned.pred, target))
        assert recs[(defense, "robust_acc")].metrics["robust_acc"] == robust_accuracy(
            poisoned.pred, test.labels[poisoned.index])
        assert 0 < len(poisoned.index) < len(clean.index)
        # stored compactly
        raw = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            str(workdir / recs[(defense, "der")].predictions["purified:clean"]))
        assert raw["pred"].dtype == torch.uint8 and raw["index"].dtype == torch.int32

    # the stored predictions are what a fresh forward pass of each checkpoint gives (the metrics are
    # those of the uncached path)
    store = Store(workdir)
    runner = JobRunner(store, jobs, CPU, progress=False)
    attack = runner.attack(train_job)
    poisoned_test = attack.poison_test(test)
    for rec in recs.values():
        roles = {"backdoored": rec.deps[0], "purified": rec.deps[1], "clean": rec.deps[-1]}
        for name, p in load(workdir, rec).items():
            role, split = name.split(":")
            images = test.images if split == "clean" else poisoned_test.images
            assert torch.equal(predict(runner.model(roles[role]), images, CPU), p.pred), (rec.label, name)
    store.close()

    # `harness show` prints the record with the files it read
    key = recs[("ft", "der")].key
    assert cli.main(["show", key[:12], "--workdir", str(workdir)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["predictions"] == recs[("ft", "der")].predictions and len(shown["predictions"]) == 4


def test_a_new_evaluator_over_kept_predictions_does_no_inference_and_a_corrupt_file_is_recomputed(
        tmp_path, monkeypatch, capsys):
    counter = Counter(monkeypatch)
    quiet = {"device": "cpu", "progress": False, "log": lambda *a: None}
    run_matrix(spec(["clean_acc", "der", "clean_asr"]), tmp_path, **quiet)
    assert len(counter.calls) == 5
    counter.calls.clear()
    counts = run_matrix(spec(["clean_acc", "der", "clean_asr", "asr"]), tmp_path, **quiet)
    assert counts["done"] == 2 and counter.calls == []  # two new evaluations, no inference at all
    recs = evaluations(tmp_path)
    # a truncated file, and one with a flipped byte that still parses: neither is trusted
    none_file = tmp_path / recs[("none", "asr")].predictions["purified:poisoned"]
    ft_file = tmp_path / recs[("ft", "asr")].predictions["purified:poisoned"]
    good = {p: p.read_bytes() for p in (none_file, ft_file)}
    kept = {p: content(p) for p in good}
    none_file.write_bytes(good[none_file][: len(good[none_file]) - 7])
    raw = bytearray(good[ft_file])
    raw[-1] ^= 0x01  # one bit of the data flipped: the file still parses
    ft_file.write_bytes(bytes(raw))
    with pytest.raises(HarnessError, match="unreadable"):
        load(tmp_path, recs[("ft", "asr")])
    capsys.readouterr()
    counts = run_matrix(spec(["clean_acc", "der", "clean_asr", "asr", "robust_acc"]), tmp_path, **quiet)
    assert counts["done"] == 2 and len(counter.calls) == 2, counter.calls
    assert capsys.readouterr().err.count("recomputing it") == 2
    assert {p: content(p) for p in good} == kept  # deterministic: the same predictions again
    recs = evaluations(tmp_path)
    for defense in ("none", "ft"):
        assert recs[(defense, "robust_acc")].predictions == recs[(defense, "asr")].predictions


_COUNTING_PLUGIN = '''
import os

import backdoor_harness.predictions as predictions

_real = predictions.predict


def _counted(model, images, device, *args, **kwargs):
    out = _real(model, images, device, *args, **kwargs)
    with open(os.environ["TEST_PREDICT_LOG"], "a") as f:
        f.write(f"{os.getpid()} {len(images)}\\n")
    return out


predictions.predict = _counted
'''


def test_pool_workers_compute_each_model_and_split_once(tmp_path, monkeypatch):
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "count_predict.py").write_text(_COUNTING_PLUGIN)
    log = tmp_path / "passes.log"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "plugin"))
    monkeypatch.setenv("HARNESS_PLUGINS", "count_predict")
    monkeypatch.setenv("TEST_PREDICT_LOG", str(log))
    monkeypatch.syspath_prepend(str(tmp_path / "plugin"))
    # this process may import the module too (building its registry): its wrapper is undone afterwards
    monkeypatch.setattr(predictions, "predict", predictions.predict)
    registry.reset()
    try:
        work = tmp_path / "work"
        counts = run_matrix(spec(ALL), work, device="cpu", workers=2, progress=False, log=lambda *a: None)
    finally:
        registry.reset()
        sys.modules.pop("count_predict", None)
    assert counts["failed"] == counts["blocked"] == 0, counts
    lines = log.read_text().splitlines()
    # counted in the workers, where evaluations run: once per model and split, whichever worker came first
    assert len(lines) == 5 == len(files(work)), lines
    assert all(r.predictions for r in evaluations(work).values())


# -- the store itself ---------------------------------------------------------------------------------


def _args(**over):
    data = noise_set(30, seed=3)
    calls = over.pop("calls")
    model = tiny()

    def make():
        calls.append(1)
        return model

    base = dict(model_key="m" * 24, model_sha256="a" * 64, images={"name": "noise"}, split="clean", trigger=None,
                index=torch.arange(30), num_classes=10, model=make, inputs=data.images, device=CPU)
    return {**base, **over}


def test_the_store_computes_once_reads_back_and_never_trusts_a_bad_file(tmp_path):
    calls: list = []
    warned: list[str] = []
    pred, rel = PredictionStore(tmp_path, warn=warned.append).get(**_args(calls=calls))
    assert pred.dtype == torch.int64 and len(pred) == 30 and len(calls) == 1
    path = tmp_path / rel
    assert path.parent == tmp_path / "predictions" and not list(path.parent.glob(".*.tmp"))
    # a fresh store (another process) reads the file; the same store answers from memory
    again, rel2 = PredictionStore(tmp_path).get(**_args(calls=calls))
    assert rel2 == rel and torch.equal(again, pred) and len(calls) == 1
    store = PredictionStore(tmp_path)
    store.get(**_args(calls=calls))
    path.unlink()
    assert torch.equal(store.get(**_args(calls=calls))[0], pred) and len(calls) == 1 and not path.exists()
    # another checkpoint of the same job, another trigger, another split: other files
    other = {PredictionStore(tmp_path).get(**_args(calls=calls, **kw))[1] for kw in (
        {"model_sha256": "b" * 64}, {"split": "poisoned", "trigger": {"train": "t"}},
        {"split": "poisoned", "trigger": {"train": "u"}}, {"images": {"name": "other"}})}
    assert len(other) == 4 and rel not in other
    PredictionStore(tmp_path).get(**_args(calls=calls))  # the file deleted above, written again
    good, kept = path.read_bytes(), content(path)
    n = len(calls)
    bad_files = [b"", good[:20], good[:-3], good[:-1] + bytes([good[-1] ^ 1]), b"not a safetensors file" * 10]
    for bad in bad_files:
        path.write_bytes(bad)
        fresh, _ = PredictionStore(tmp_path, warn=warned.append).get(**_args(calls=calls))
        assert torch.equal(fresh, pred) and content(path) == kept
    assert len(calls) == n + len(bad_files) and len(warned) == len(bad_files)
    # a file whose index is not the images asked for (another test set order) is not used either
    PredictionStore(tmp_path, warn=warned.append).get(**_args(calls=calls, index=torch.arange(30).flip(0)))
    assert len(calls) == n + len(bad_files) + 1 and "index" in warned[-1]


def test_concurrent_processes_compute_the_same_predictions_once(tmp_path):
    calls: list = []
    real = _args(calls=[])["model"]

    def slow():
        calls.append(1)
        time.sleep(0.3)  # while the first computes, the others wait on the lock
        return real()

    out: list = []
    threads = [threading.Thread(target=lambda: out.append(PredictionStore(tmp_path).get(**_args(calls=[], model=slow))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(out) == 3 and len({rel for _, rel in out}) == 1
    assert all(torch.equal(p, out[0][0]) for p, _ in out)


def test_a_large_class_count_is_stored_in_a_wider_dtype(tmp_path):
    from safetensors.torch import load_file

    args = _args(calls=[], num_classes=1000)
    _, rel = PredictionStore(tmp_path).get(**args)
    assert load_file(str(tmp_path / rel))["pred"].dtype == torch.int16
    assert predictions.pred_dtype(256) == torch.uint8 and predictions.pred_dtype(70000) == torch.int32


def test_poison_test_names_the_test_images_it_kept():
    attack = create("attack", "badnets", target=3)
    test = noise_set(40)
    poisoned = attack.poison_test(test)
    assert torch.equal(poisoned.meta["index"], (test.labels != 3).nonzero().flatten())
    assert torch.equal(test.labels[poisoned.meta["index"]], poisoned.meta["true_labels"])


def test_an_older_store_gains_the_predictions_column_and_its_records_load(tmp_path):
    old = [c for c in JobRecord.model_fields if c != "predictions"]
    db = sqlite3.connect(tmp_path / "results.sqlite")
    db.execute(f"CREATE TABLE jobs ({', '.join(c + ' TEXT' if c != 'key' else 'key TEXT PRIMARY KEY' for c in old)})")
    db.execute("INSERT INTO jobs (key, kind, label, status, attrs, schema_version) VALUES (?, ?, ?, ?, ?, ?)",
               ("k", "evaluate", "x", "done", json.dumps({"dataset": "d", "seed": 0}), 2))
    db.commit()
    db.close()
    readonly = Store(tmp_path, readonly=True)
    assert readonly.get("k").predictions == {}
    readonly.close()
    store = Store(tmp_path)
    assert store.get("k").predictions == {}
    rec = store.get("k").model_copy(update={"predictions": {"purified:clean": "predictions/" + "0" * 24 +
                                                            ".safetensors"}})
    store.put(rec)
    assert store.get("k") == rec
    store.close()
    with pytest.raises(HarnessError, match="no jobs with a key starting 'zz'"):
        load(tmp_path, "zz")
    with pytest.raises(HarnessError, match="missing"):
        load(tmp_path, "k")


def test_a_submitted_record_names_files_in_the_predictions_folder_only():
    from backdoor_harness.store import job_record
    from backdoor_harness.submission import record_problems

    jobs = {j.key: j for j in expand(spec(["asr"]))}
    evaluate = next(j for j in jobs.values() if j.kind == "evaluate")
    name, good = "purified:poisoned", "predictions/" + "0123456789ab" * 2 + ".safetensors"
    rec = job_record(evaluate, "done", metrics={"asr": 0.5}, predictions={name: good})
    assert record_problems(rec, jobs) == []
    for bad in ("../x.safetensors", "/tmp/" + good, "predictions/../../" + good[12:], "artifacts/" + good[12:],
                good.upper(), good + "\n", good.replace(".safetensors", ".pt")):
        problems = record_problems(rec.model_copy(update={"predictions": {name: bad}}), jobs)
        assert len(problems) == 1 and "predictions/<24 hex digits>.safetensors" in problems[0], (bad, problems)
    assert len(record_problems(rec.model_copy(update={"predictions": {"purified poisoned": good}}), jobs)) == 1
    train = next(j for j in jobs.values() if j.kind == "train")
    problems = record_problems(job_record(train, "done", predictions={name: good}), jobs)
    assert any("only an evaluation reads predictions" in p for p in problems)
