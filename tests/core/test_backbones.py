"""The backbones of the card, named as users name them, at CIFAR's 32x32 with no
extra kwargs: each builds and runs; the pruning defenses run on each or skip it
with their declared reason."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import backdoor_harness as bh
from backdoor_harness.matrix import MatrixSpec
from backdoor_harness.models import create_model, model_family
from backdoor_harness.scheduler import run_matrix
from backdoor_harness.store import Store

BACKBONES = ["resnet18", "densenet121", "efficientnet_b0", "mobilenetv3_large_100", "vit_small_patch16_224"]
PRUNING = ["fp", "clp", "gradprune"]


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_builds_and_runs_at_32px(name):
    torch.manual_seed(0)
    model = create_model(name, 10, 32)
    x = torch.rand(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", BACKBONES)
def test_pruning_defenses_declare_each_backbone(name):
    """Each pruning defense supports the backbone's family, or (ViTs) declares
    it unsupported through ``families``, which the runner turns into a skip."""
    family = model_family(create_model(name, 10, 32))
    for defense in PRUNING:
        supported = bh.create_defense(defense).supports(family)
        assert supported == (family != "vision_transformer"), (defense, family)


@pytest.mark.slow  # minutes on 2 cores: five full-size backbones through train, purify and evaluate
@pytest.mark.integration
def test_backbone_matrix_runs_or_skips_with_a_reason(tmp_path):
    spec = MatrixSpec.model_validate({
        "name": "backbones",
        "datasets": [{"name": "cifar10", "train_per_class": 10, "test_per_class": 5, "reserve_per_class": 4}],
        "models": BACKBONES,
        "attacks": [{"name": "badnets", "config": {"stamp": "after_augment"}}],
        "defenses": ["none",
                     {"name": "fp", "config": {"epochs": 1, "prune_step_ratio": 0.25, "batch_size": 32}},
                     "clp",
                     {"name": "gradprune", "config": {"max_prune_steps": 2, "pruning_patience": 1,
                                                      "tune_epochs": 1, "batch_size": 32}}],
        "evaluators": ["clean_acc", "asr"],
        "recipe": {"base": "cpu-quick", "epochs": 1, "batch_size": 50}})
    began = time.time()
    counts = run_matrix(spec, tmp_path, progress=False, log=lambda *a: None)
    print(f"backbone matrix: {counts} in {time.time() - began:.0f} s")
    assert counts["failed"] == 0 and counts["blocked"] == 0
    purified = {(r.attrs.model, r.attrs.defense): r for r in Store(tmp_path).records("purify")}
    assert len(purified) == len(BACKBONES) * 4
    for (model, defense), rec in purified.items():
        if model == "vit_small_patch16_224" and defense in PRUNING:
            assert rec.status == "skipped"
            assert f"defense {defense!r} supports" in rec.error and "vision_transformer" in rec.error
        else:
            assert rec.status == "done", (model, defense, rec.error)
    for rec in Store(tmp_path).records("evaluate"):
        assert rec.status in ("done", "skipped") and (rec.status == "done" or rec.error)
