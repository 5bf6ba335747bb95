"""Contract tests parametrized over the registry, plus the training-controlled attack path."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import backdoor_harness as bh
from backdoor_harness import registry
from backdoor_harness.models import create_model, model_family
from backdoor_harness.preflight import quick_config  # each defense at its smallest (every loop count 1)

from helpers import check_contract, context, noise_set, tiny


@pytest.mark.parametrize("name", bh.list_defenses())
def test_defense_contract(name):
    model = tiny()
    attack = bh.create_attack("badnets", stamp="after_augment")
    defense = bh.create_defense(name, **quick_config(name))
    oracle = attack if "oracle_trigger" in defense.needs else None
    check_contract(model, defense, lambda seed: defense.purify(model, context(model, noise_set(200), seed,
                                                                               attack=oracle)))


FAMILY_MODELS = [
    pytest.param({"name": "vit_tiny_patch16_224",
                  "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
                  "adapt_stem": False},
                 id="vit"),
    pytest.param("resnet18", id="resnet", marks=pytest.mark.slow),
    pytest.param("preact_resnet18", id="preact_resnet", marks=pytest.mark.slow),
    pytest.param("vgg11_bn", id="vgg", marks=pytest.mark.slow),
    pytest.param("mobilenetv2_050", id="mobilenet", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("spec", FAMILY_MODELS)
@pytest.mark.parametrize("name", bh.list_defenses())
def test_defense_runs_on_every_family_it_declares(name, spec):
    """ResNet, PreAct-ResNet, VGG-BN and MobileNet must work for every defense
    (slow); a defense that declares ViT must run on a small ViT."""
    torch.manual_seed(0)
    model = create_model(spec, 10, 32).eval()
    defense = bh.create_defense(name, **quick_config(name))
    family = model_family(model)
    if not defense.supports(family):
        assert family == "vision_transformer", f"{name} must support {family}"
        pytest.skip(f"{name} does not declare ViT support")
    attack = bh.create_attack("badnets")
    ctx = context(model, noise_set(40), attack=attack if "oracle_trigger" in defense.needs else None)
    out = defense.purify(model, ctx)
    x = torch.rand(2, 3, 32, 32)
    assert out(x).shape == (2, 10)
    create_model(spec, 10, 32).load_state_dict(out.state_dict())


@pytest.mark.parametrize("name", bh.list_evaluators())
def test_evaluator_declares_its_metrics(name):
    ev = bh.create_evaluator(name)
    assert ev.metrics, f"{name} declares no metrics"
    for metric in ev.metrics.values():
        assert isinstance(metric.higher_is_better, bool)


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
    from backdoor_harness.runner import run_matrix
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
