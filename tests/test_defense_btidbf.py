"""BTI-DBF(U)'s mechanism, tested directly on the tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from backdoor_harness.layers import features, head
from backdoor_harness.models import create_model
from backdoor_harness.plugins.defenses.btidbf import (BTIDBF, BTIDBFConfig, TriggerGenerator,
                                                        decouple_benign_features, invert_triggers, mix_inverted)
from backdoor_harness.train import Recipe, fit

from helpers import CPU, check_contract, context, learnable_set, noise_set, same, tiny

#: the smallest settings that exercise every step
QUICK = dict(rounds=2, epochs=1, mask_epochs=1, generator_epochs=2, generator_width=4, batch_size=64)


def normalised_mse(gen, x, gx):
    return ((gx.float() - x.float()) / gen.std).pow(2).mean((1, 2, 3))


def test_generator_respects_the_norm_bound_per_image():
    # an untrained generator with a large output layer: the raw perturbation is far above the bound
    gen = TriggerGenerator(torch.full((3,), 0.5), torch.full((3,), 0.25), 4, 0.05, torch.Generator().manual_seed(0),
                           init_scale=50.0)
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        gx = gen(x)
        gen.norm_bound = float("inf")
        raw = gen.perturbation(x)  # unbounded
    assert raw.pow(2).mean((1, 2, 3)).min() > 1.0  # the bound has something to do
    mse = normalised_mse(gen, x, gx)
    assert (mse <= 0.05 * (1 + 1e-5)).all() and (mse > 0.01).all()
    assert gx.min() >= 0 and gx.max() <= 1  # valid pixels


def test_trained_generator_moves_but_stays_within_the_bound():
    model = tiny()
    reserve = noise_set(200)
    cfg = BTIDBFConfig(mask_epochs=1, generator_epochs=6, generator_width=4, batch_size=64, norm_bound=0.1)
    gen = invert_triggers(model, reserve, cfg, context(model, reserve))
    # the same generator before training (the inverter builds it first, from the cell's generator)
    start = TriggerGenerator(model.mean, model.std, 4, 0.1, torch.Generator().manual_seed(0), cfg.generator_init)
    x = reserve.images[:64].float() / 255
    with torch.no_grad():
        mse, mse0 = normalised_mse(gen, x, gen(x)), normalised_mse(start, x, start(x))
    assert (mse <= 0.1 * (1 + 1e-5)).all()
    assert 0 < mse0.mean() < 0.01 and mse.mean() > 3 * mse0.mean()  # -L_bd pushed it away from its start
    # uint8 output: the bound holds up to rounding (half a grey level per pixel)
    poisoned = gen.poison(reserve.images[:64])
    assert poisoned.dtype == torch.uint8 and poisoned.shape == (64, 3, 32, 32)
    slack = (0.5 / 255 / gen.std.min()).item()
    assert (normalised_mse(gen, x, poisoned.float() / 255).sqrt() <= 0.1 ** 0.5 + slack).all()
    assert 0 <= gen.target < 10


def test_benign_feature_mask_is_in_the_unit_interval_and_decouples():
    # a model that has learned something, so that features carry the prediction
    model = tiny()
    fit(model, learnable_set(1000, 1), Recipe(epochs=10, lr=0.05), device=CPU,
        generator=torch.Generator().manual_seed(0), progress=False)
    reserve = learnable_set(200, 2)
    net = copy.deepcopy(model)
    mask = decouple_benign_features(net, reserve, BTIDBFConfig(mask_epochs=10), torch.Generator().manual_seed(0), CPU)
    x = reserve.images.float() / 255
    with torch.no_grad():
        phi = features(net, x)
    assert mask.shape == phi.shape[1:]  # one sample's feature map
    assert mask.min() >= 0 and mask.max() <= 1
    with torch.no_grad():
        kept = F.cross_entropy(head(net, mask * phi), reserve.labels)
        removed = F.cross_entropy(head(net, (1 - mask) * phi), reserve.labels)
        half = F.cross_entropy(head(net, 0.5 * phi), reserve.labels)  # the undecided mask
    assert kept < half < removed  # m keeps the clean prediction, 1 - m loses it
    assert removed - kept > 0.1


def test_mix_replaces_ten_percent_plus_one():
    gen = TriggerGenerator(torch.zeros(3), torch.ones(3), 4, 0.3, torch.Generator().manual_seed(0), init_scale=5.0)
    x = torch.rand(30, 3, 32, 32)
    mixed = mix_inverted(gen, x, 0.1, torch.Generator().manual_seed(0))
    changed = (mixed != x).flatten(1).any(1)
    assert int(changed.sum()) == int(0.1 * 30 + 1)
    with torch.no_grad():
        assert torch.equal(mixed[changed], gen(x[changed]))


def test_inversion_is_deterministic_for_a_seed():
    model = tiny()
    reserve = noise_set(200)
    cfg = BTIDBFConfig(mask_epochs=2, generator_epochs=2, generator_width=4, batch_size=64)

    def run(seed):
        g = invert_triggers(model, reserve, cfg, context(model, reserve, seed))
        return torch.cat([p.detach().flatten() for p in g.parameters()]), g.target

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])


def test_contract_on_the_tiny_model():
    model = tiny()
    defense = BTIDBF(BTIDBF.Config(**QUICK))
    out = check_contract(model, defense, lambda seed: defense.purify(model, context(model, n=200, seed=seed)))
    assert not same(out, model)  # it did tune
    assert BTIDBF.Config(epochs=1).epochs == 1
    with pytest.raises(ValueError):
        BTIDBF.Config(norm_bound=0)
    with pytest.raises(ValueError):
        BTIDBF.Config(unknown=1)


def test_defaults_follow_the_code():
    cfg = BTIDBF.Config()
    assert (cfg.mask_epochs, cfg.generator_epochs, cfg.norm_bound, cfg.feat_bound) == (20, 30, 0.3, 3.0)
    assert (cfg.rounds, cfg.epochs, cfg.lr, cfg.poison_fraction, cfg.batch_size) == (5, 30, 1e-4, 0.1, 128)


@pytest.mark.parametrize("name", [pytest.param("resnet18", marks=pytest.mark.slow),
                                  pytest.param("vgg11_bn", marks=pytest.mark.slow), "mobilenetv2_050"])
def test_runs_on_other_families(name):
    torch.manual_seed(0)
    model = create_model(name, 10, 32).eval()
    reserve = noise_set(40)
    out = BTIDBF(rounds=1, epochs=1, mask_epochs=1, generator_epochs=1, generator_width=4, batch_size=20).purify(
        model, context(model, reserve))
    x = torch.rand(2, 3, 32, 32)
    assert out.eval()(x).shape == (2, 10)
    torch.manual_seed(1)  # same architecture: the state dict loads strictly into a fresh one
    create_model(name, 10, 32).load_state_dict(out.state_dict())
