"""Registry-wide defense contracts (every installed defense, each at its smallest config), then
the mechanisms that are not one defense's own, tested directly on the tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import backdoor_harness as bh
from backdoor_harness.contracts import Purified
from backdoor_harness.handlers import JobRunner, Skip
from backdoor_harness.jobs import PluginCall, PurifyJob, TrainJob
from backdoor_harness.models import classifier, create_model, model_family
from backdoor_harness.preflight import quick_config  # each defense at its smallest (every loop count 1)
from backdoor_harness.store import Cell

import helpers
from helpers import CPU, check_contract, noise_set, same, state, tiny


def context(model):
    """``helpers.context`` whose generator is the one that drew the 200 reserve images (so it starts advanced)."""
    g = torch.Generator().manual_seed(0)
    return helpers.context(model, noise_set(200, generator=g), generator=g)


def oracle(defense):
    """The attack a defense that needs the attack's trigger gets (None for the others)."""
    return bh.create_attack("badnets", stamp="after_augment") if "oracle_trigger" in defense.needs else None


# --------------------------------------------------------------------------
# Every defense, on every model family
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", bh.list_defenses())
def test_defense_contract(name):
    model = tiny()
    defense = bh.create_defense(name, **quick_config(name))
    attack = oracle(defense)
    check_contract(model, defense, lambda seed: defense.purify(model, helpers.context(model, noise_set(200), seed,
                                                                                      attack=attack)).model)


def family(spec, *, required: bool, slow: bool = False):
    """A model family of the family test: ``required`` families must be supported by every defense
    (the papers' CNNs); the others may be declined, and the handler then skips the job."""
    name = spec if isinstance(spec, str) else spec["name"]
    return pytest.param(spec, required, id=name.split("_")[0], marks=[pytest.mark.slow] if slow else [])


SMALL_VIT = {"name": "vit_tiny_patch16_224", "adapt_stem": False,
             "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}}
FAMILIES = [
    family({"name": "tiny_cnn", "kwargs": {"width": 8}}, required=True),
    family(SMALL_VIT, required=False),
    family({"name": "densenet121", "kwargs": {"growth_rate": 8, "block_config": [2, 2]}}, required=False, slow=True),
    family("regnetx_002", required=False, slow=True),
    family("convnext_atto", required=False, slow=True),
    family("preact_resnet18", required=True, slow=True),
    family("resnet18", required=True, slow=True),
    family("vgg11_bn", required=True, slow=True),
    family("mobilenetv2_050", required=True, slow=True),
]


def purify_through_the_handler(name: str, model: nn.Module, spec, monkeypatch) -> tuple[dict, nn.Module]:
    """Run ``name`` (at its quick config) as the harness runs a purify job on ``model``: the job
    runner's ``run_purify``, with the trained model, the data set, the reserve and the attack
    handed over in memory (40 random images) instead of read from a store."""
    cell = Cell(dataset="synthetic", seed=0)
    train = TrainJob(label="train", cell=cell, seed=0, versions={}, data={"name": "synthetic"},
                     model=spec if isinstance(spec, dict) else {"name": spec}, recipe={})
    job = PurifyJob(label="purify", cell=cell, seed=0, versions={}, defense=PluginCall(name, quick_config(name)),
                    reserve={}, train=train.key)
    runner = JobRunner(store=None, jobs={train.key: train, job.key: job}, device=CPU, progress=False)
    data = noise_set(40)
    monkeypatch.setattr(runner, "model", lambda key: model)
    monkeypatch.setattr(runner, "data", lambda spec: (data, data))
    monkeypatch.setattr(runner, "reserve", lambda train, job: data)
    monkeypatch.setattr(runner, "attack", lambda job: bh.create_attack("badnets", stamp="after_augment"))
    return runner.run_purify(job)


@pytest.mark.parametrize("spec, required", FAMILIES)
@pytest.mark.parametrize("name", bh.list_defenses())
def test_defense_on_each_family(name, spec, required, monkeypatch):
    """A defense that supports the model's family purifies it through the handler (a model of the
    same architecture and output shape; the given model untouched); one that does not is skipped,
    with a reason naming the family. The papers' CNN families are supported by every defense."""
    torch.manual_seed(0)
    model = create_model(spec, 10, 32).eval()
    given, fam = state(model), model_family(model)
    defense = bh.create_defense(name, **quick_config(name))
    if not defense.supports(fam):
        assert not required, f"every defense must support {fam}; {name} supports {sorted(defense.families)}"
        with pytest.raises(Skip, match=f"supports .*not '{fam}'"):
            purify_through_the_handler(name, model, spec, monkeypatch)
        return
    metrics, out = purify_through_the_handler(name, model, spec, monkeypatch)
    assert metrics["reserve_size"] == 40
    x = torch.rand(2, 3, 32, 32)
    assert out.eval()(x).shape == model(x).shape == (2, 10)
    assert all(torch.equal(given[k], v) for k, v in model.state_dict().items()), "the given model was changed"
    torch.manual_seed(1)
    create_model(spec, 10, 32).load_state_dict(out.state_dict())  # same architecture, strict


@pytest.mark.parametrize("name", bh.list_defenses())
def test_every_defense_returns_purified(name):
    model = tiny(0)
    defense = bh.create_defense(name, **quick_config(name))
    out = defense.purify(model, helpers.context(model, noise_set(100), attack=oracle(defense)))
    assert isinstance(out, Purified) and isinstance(out.model, nn.Module) and isinstance(out.report, dict)
    assert not hasattr(defense, "last_report")
    assert type(defense).baseline == (name == "none")
    if name == "none":
        assert same(out.model, model) and out.model is not model


# --------------------------------------------------------------------------
# Shared mechanisms
# --------------------------------------------------------------------------


def test_classifier_is_found_through_timm():
    assert isinstance(classifier(tiny()), nn.Linear) and classifier(tiny()).out_features == 10
    vgg = create_model("vgg11_bn", 10, 32)
    assert classifier(vgg).out_features == 10
    with pytest.raises(bh.HarnessError, match="no linear classifier"):
        classifier(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_fst_keeps_the_head_norm_and_shifts_it_away_from_the_old_head():
    model = tiny()
    w_ori = classifier(model).weight.detach().clone()
    out = bh.create_defense("fst", epochs=2, alpha=0.5).purify(model, context(model)).model
    w = classifier(out).weight.detach()
    assert torch.allclose(w.norm(), w_ori.norm(), rtol=1e-5)  # projected back after every step
    cos = (w * w_ori).sum() / (w.norm() * w_ori.norm())
    assert cos < 0.2  # re-initialised, then pushed off the old head (a copy would be 1)
    # the penalty is what pushes: alpha 0 leaves the new head freer to align
    free = classifier(bh.create_defense("fst", epochs=2, alpha=0.0).purify(model, context(model)).model).weight.detach()
    assert (w * w_ori).sum() < (free * w_ori).sum()
