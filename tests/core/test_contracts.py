"""Contract tests parametrized over the registry (evaluators, metrics, models, data), plus the
training-controlled attack path. The defenses' registry-wide contracts are in test_defenses.py."""

from __future__ import annotations

import math
import types

import pytest
from pydantic import ValidationError
import torch
import torch.nn.functional as F

import backdoor_harness as bh
from backdoor_harness import registry
from backdoor_harness.contracts import Metric
from backdoor_harness.models import create_model


def metric_problems(name: str, metrics: dict) -> list[str]:
    """What is incomplete or inconsistent in an evaluator's declared metrics (empty: nothing)."""
    out = []
    if not metrics:
        out.append(f"{name} declares no metrics")
    for m, info in metrics.items():
        where = f"{name}.metrics[{m!r}]"
        if not isinstance(info, Metric):
            out.append(f"{where} is a {type(info).__name__}, not a Metric")
            continue
        for field, kind in (("higher_is_better", bool), ("curve", bool), ("percent", bool), ("one_sided", bool),
                            ("doc", str), ("title", str)):
            if type(getattr(info, field)) is not kind:
                out.append(f"{where}.{field} is not a {kind.__name__}")
        if not str(info.doc).strip():
            out.append(f"{where} has no doc")
        if info.board is not None:
            if type(info.board) is not int or info.board <= 0:
                out.append(f"{where}.board is not a positive int")
            if info.curve:
                out.append(f"{where} is a curve on a board")
            if not str(info.title).strip():
                out.append(f"{where} is a board column without a title")
        if info.one_sided and info.curve:
            out.append(f"{where} is a one-sided curve (golden checks test single numbers)")
        if info.range is not None:
            lo, hi = info.range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                out.append(f"{where}.range {info.range} is not (lo, hi) with finite lo < hi")
            elif info.percent and not 0 <= lo < hi <= 1:
                out.append(f"{where}.range {info.range} is outside [0, 1], the scale of a percent metric")
    return out


@pytest.mark.parametrize("name", bh.list_evaluators())
def test_evaluator_declares_its_metrics_completely(name):
    ev = bh.create_evaluator(name)
    assert not metric_problems(name, ev.metrics)
    assert type(ev).metrics is ev.metrics  # declared once, on the class: records and upgrades read the class


BUILTIN_EVALUATORS = [n for n in bh.list_evaluators()
                      if registry.get_class("evaluator", n).__module__.startswith("backdoor_harness.plugins.")]


@pytest.mark.parametrize("name", BUILTIN_EVALUATORS)
def test_every_builtin_metric_declares_its_range(name):
    """Every value a built-in evaluator records is checked against a declared range before its
    evaluation is marked done (and submitted records are checked against the same ranges)."""
    metrics = registry.get_class("evaluator", name).metrics
    assert {m: info.range for m, info in metrics.items() if info.range is None} == {}


def test_the_builtin_evaluators_are_found():
    assert {"clean_acc", "asr", "der", "lmc", "qra", "retune", "robust_acc", "clean_asr"} <= set(BUILTIN_EVALUATORS)


def test_the_metric_check_sees_what_it_must():
    bad = {"a": Metric(higher_is_better=True, doc="x", curve=True, board=3, title=""),
           "b": Metric(higher_is_better=False), "c": Metric(higher_is_better=True, doc="c", board=0, title="C"),
           "d": Metric(higher_is_better=True, doc="d", curve=True, one_sided=True), "e": {"higher_is_better": True}}
    assert metric_problems("probe", bad) == [
        "probe.metrics['a'] is a curve on a board", "probe.metrics['a'] is a board column without a title",
        "probe.metrics['b'] has no doc", "probe.metrics['c'].board is not a positive int",
        "probe.metrics['d'] is a one-sided curve (golden checks test single numbers)",
        "probe.metrics['e'] is a dict, not a Metric"]
    assert metric_problems("empty", {}) == ["empty declares no metrics"]
    assert metric_problems("ranges", {
        "f": Metric(higher_is_better=True, doc="f", range=(1.0, 0.0)),
        "g": Metric(higher_is_better=True, doc="g", range=(0.0, float("inf"))),
        "h": Metric(higher_is_better=True, doc="h", range=(0.0, 100.0)),
        "i": Metric(higher_is_better=True, doc="i", range=(0.0, 100.0), percent=False)}) == [
        "ranges.metrics['f'].range (1.0, 0.0) is not (lo, hi) with finite lo < hi",
        "ranges.metrics['g'].range (0.0, inf) is not (lo, hi) with finite lo < hi",
        "ranges.metrics['h'].range (0.0, 100.0) is outside [0, 1], the scale of a percent metric"]
    with pytest.raises(ValidationError):  # a Metric validates its fields when it is declared
        Metric(higher_is_better="sometimes")
    with pytest.raises(ValidationError):
        Metric(higher_is_better=True, colour="red")


def installed_metrics() -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    for name in bh.list_evaluators():
        for m, info in registry.get_class("evaluator", name).metrics.items():
            assert m not in out, f"metric {m!r} is declared by two evaluators"
            out[m] = info
    return out


def test_board_columns_are_unique_across_evaluators():
    board = {m: info for m, info in installed_metrics().items() if info.board is not None}
    positions = [info.board for info in board.values()]
    titles = [info.title for info in board.values()]
    assert len(set(positions)) == len(positions), sorted(positions)
    assert len(set(titles)) == len(titles), sorted(titles)


#: the built-in board: (metric, title, higher_is_better, percent) in column order (what
#: leaderboard/render.py's COLUMNS said before the metadata moved into the evaluators)
BOARD = [("clean_acc", "C-Acc", True, True), ("asr", "ASR", False, True), ("robust_acc", "RA", True, True),
         ("der", "DER", True, True), ("retune_asr", "P-ASR", False, True),
         ("retune_asr_clean_model", "P-ASR(clean)", False, True), ("qra_p_asr", "QRA P-ASR", False, True),
         ("lmc_escape_t", "LMC-esc t", False, False), ("clean_asr", "ASR(clean model)", False, True)]
#: metrics that are not on the scale of a rate: interpolation coefficients
NOT_PERCENT = {"lmc_t", "lmc_escape_t", "lmc_clean_to_purified_t"}


def test_builtin_metric_metadata():
    """The built-in evaluators declare the board, the percent scale and the golden checks' sides."""
    from backdoor_harness.plugins.evaluators import (asr, clean_acc, clean_asr, der, lmc, qra, retune,
                                                     robust_acc)

    builtin = {m: info for module in (asr, clean_acc, clean_asr, der, lmc, qra, retune, robust_acc)
               for cls in vars(module).values() if isinstance(cls, type) and issubclass(cls, bh.Evaluator)
               and cls is not bh.Evaluator for m, info in cls.metrics.items()}
    assert len(builtin) == 22
    board = sorted((info.board, m) for m, info in builtin.items() if info.board is not None)
    assert [(pos, m) for pos, m in board] == [(10 * (i + 1), row[0]) for i, row in enumerate(BOARD)]
    assert [(m, builtin[m].title, builtin[m].higher_is_better, builtin[m].percent) for _, m in board] == BOARD
    assert {m for m, info in builtin.items() if info.one_sided} == {"clean_acc", "asr"}
    assert {m for m, info in builtin.items() if not info.percent} == NOT_PERCENT


class PatchInBatch(bh.Attack):
    """A minimal training-controlled attack for the contract test: it poisons
    the first quarter of every batch inside its own loss."""

    name = "test_patch_in_batch"
    version = "1"
    summary = "test only"
    paper = "-"
    training_controlled = True

    def apply_trigger(self, images, *, train=False):
        out = images.clone()
        out[..., -4:, -4:] = 255
        return out

    def training_loss(self, model, images, labels, step):
        k = max(1, len(labels) // 4)
        x = images.clone()
        x[:k, :, -4:, -4:] = 1.0
        y = labels.clone()
        y[:k] = self.config.target
        return F.cross_entropy(model(x), y)


@pytest.fixture
def test_attack_registered():
    plugin = types.SimpleNamespace(harness_attacks=bh.hookimpl(lambda: [PatchInBatch]))
    registry.register(plugin, name="test-training-controlled")
    yield
    registry.reset()


@pytest.mark.integration
def test_training_controlled_attack_runs_through_the_matrix(tmp_path, test_attack_registered):
    from backdoor_harness.matrix import MatrixSpec
    from backdoor_harness.scheduler import run_matrix
    from backdoor_harness.store import Store

    spec = MatrixSpec.model_validate({
        "datasets": [{"name": "cifar10", "train_per_class": 100, "test_per_class": 30}],
        "models": [{"name": "tiny_cnn", "kwargs": {"width": 8}}],
        "attacks": ["test_patch_in_batch"], "defenses": ["none"], "evaluators": ["asr", "clean_acc"],
        "recipe": {"base": "cpu-quick", "epochs": 4}})
    counts = run_matrix(spec, tmp_path, progress=False, log=lambda *a: None)
    assert counts["done"] == 4 and counts["failed"] == 0
    store = Store(tmp_path)
    train = next(store.records("train"))
    assert "poison_count" not in train.metrics  # it poisoned nothing up front: its loss did
    asr = next(r.metrics["asr"] for r in store.records("evaluate") if "asr" in r.metrics)
    assert asr > 0.5  # the backdoor came from the training step


@pytest.mark.parametrize("name", ["tiny_cnn", "preact_resnet18", "resnet18", "vgg11_bn", "densenet121",
                                  "efficientnet_b0", "mobilenetv3_small_100"])
def test_models_keep_resolution_at_32px(name):
    model = create_model(name, 10, 32).eval()
    with torch.no_grad():
        feats = model.net.forward_features(torch.rand(1, 3, 32, 32))
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    # ImageNet stems would leave 1x1 maps (32 / 32); adapted stems keep >= 2x2
    # (VGG's five pools by design end at 1x1 with no stem downsampling)
    assert feats.shape[-1] >= (1 if model.family == "vgg" else 2)


def test_pretrained_failure_is_one_clear_message(tmp_path):
    with pytest.raises(bh.HarnessError, match="pretrained_file"):
        create_model({"name": "resnet18", "pretrained_file": str(tmp_path / "missing.safetensors")}, 10, 32)


def test_missing_dataset_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    from backdoor_harness.data import DataSpec, load_dataset

    with pytest.raises(bh.HarnessError) as err:
        load_dataset(DataSpec(name="cifar100", options={"download": False}))
    msg = str(err.value)
    assert str(tmp_path) in msg and "HARNESS_DATA" in msg


def test_reserve_ratio_and_per_class():
    from backdoor_harness.data import DataSpec, reserve_indices

    labels = torch.arange(1000) % 10
    idx = reserve_indices(labels, DataSpec(name="cifar10"), seed=0)
    assert len(idx) == 50 and len(idx.unique()) == 50
    assert torch.equal(idx, reserve_indices(labels, DataSpec(name="cifar10"), seed=0))
    per = reserve_indices(labels, DataSpec(name="cifar10", reserve_per_class=3), seed=0)
    assert torch.bincount(labels[per]).tolist() == [3] * 10


def test_random_crop_flip_is_a_shifted_copy():
    from backdoor_harness.train import random_crop_flip

    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    # every output is a (possibly flipped) window of the zero-padded input
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(8):
        found = any(torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32]) or
                    torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32].flip(-1))
                    for dy in range(9) for dx in range(9))
        assert found


def test_pretrained_file_loads_weights_and_resets_the_head(tmp_path):
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = create_model({"name": "resnet18", "pretrained_file": str(path), "adapt_stem": False}, 10, 224)
    assert torch.equal(model.net.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert model.net.get_classifier().out_features == 10
    with pytest.raises(bh.HarnessError, match="safetensors"):
        bin_path = tmp_path / "r18.bin"
        bin_path.write_bytes(b"not a pickle")
        create_model({"name": "resnet18", "pretrained_file": str(bin_path)}, 10, 32)


def test_fit_stamps_exactly_the_poisoned_samples_of_every_augmented_batch():
    from backdoor_harness.contracts import PoisonedSet
    from backdoor_harness.train import Recipe, fit

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (100, 3, 8, 8), dtype=torch.uint8, generator=g)  # never all 255
    mask = torch.zeros(100, dtype=torch.bool)
    mask[torch.randperm(100, generator=g)[:13]] = True
    labels = torch.where(mask, 9, torch.arange(100) % 9)  # the target (9) marks a poisoned sample
    data = PoisonedSet(images, labels, mask, "after_augment", lambda x: torch.full_like(x, 255))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def loss(model, x, y, info):
        seen.append((x.detach().clone(), y.clone()))
        return F.cross_entropy(model(x), y)

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    fit(model, data, Recipe(epochs=2, batch_size=32, lr=0.01), device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(1), loss_fn=loss, progress=False)
    x, y = torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen])
    stamped = (x == 1).flatten(1).all(1)
    assert len(x) == 200 and int(stamped.sum()) == 2 * 13  # each poisoned sample once per epoch ...
    assert torch.equal(stamped, y == 9)  # ... and nothing else


def _code_strings(path) -> list[str]:
    """Every string constant of a module's code (f-string parts included), docstrings excepted."""
    import ast

    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_no_evaluator_names_an_attack():
    """Per-attack settings belong in matrix files (per_attack), never in an evaluator's code."""
    import re
    from pathlib import Path

    import backdoor_harness.plugins.evaluators as evaluators

    names = bh.list_attacks()
    assert {"badnets", "lc"} <= set(names)
    files = sorted(Path(evaluators.__path__[0]).glob("*.py"))
    assert any(f.name == "retune.py" for f in files)
    for path in files:
        for text in _code_strings(path):
            for name in names:  # whole identifiers only: "lc" inside "calc" is no attack
                assert not re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", text, re.IGNORECASE), \
                    f"{path.name} names the attack {name!r} in {text!r}"


def test_the_name_check_sees_what_it_must(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Doc: BadNets 5, LC 2."""\nK = {"badnets": 5}\nX = f"calc {1}"\nif a == "LC": pass\n')
    assert _code_strings(module) == ["badnets", "calc ", "LC"]
