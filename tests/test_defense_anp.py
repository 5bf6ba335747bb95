"""ANP's mechanism, tested directly on the tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from backdoor_harness.layers import norm_layers
from backdoor_harness.models import create_model, model_family
from backdoor_harness.plugins.defenses.anp import ANP, PerturbedBatchNorm, optimize_masks, prune_neurons
from backdoor_harness.train import random_crop_flip

import helpers
from helpers import CPU, check_contract, context, noise_set

#: a few steps with a large mask lr, so that masks reach both ends of [0, 1] and some fall below 0.2
QUICK = dict(iterations=2, batch_size=16, lr=30.0)


def tiny(seed=0):
    """The tiny model with random BN shifts (as after training; at init they are 0 and xi has no gradient)."""
    model = helpers.tiny(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, bn in norm_layers(model):
            bn.bias.copy_(0.1 * torch.randn(bn.bias.shape, generator=g))
    return model


def test_one_iteration_equals_a_hand_computation():
    model, data = tiny(), noise_set(40)
    eps, alpha, lr = 0.4, 0.2, 0.2
    cfg = ANP.Config(iterations=1, batch_size=16, eps=eps, alpha=alpha, lr=lr, momentum=0.9)
    got = optimize_masks(model, data.images, data.labels, cfg, CPU, torch.Generator().manual_seed(3))

    # by hand, drawing from the generator in the same order: batch, augmentation, perturbation start
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, len(data), (16,), generator=g)
    x, y = random_crop_flip(data.images[idx], g).float() / 255, data.labels[idx]
    net = PerturbedBatchNorm(copy.deepcopy(model).train())
    sizes = net.sizes()
    start = (torch.rand(2 * sum(sizes), generator=g) * 2 - 1) * eps
    pert = [t.clone().requires_grad_() for t in start.split(sizes + sizes)]
    ones = [torch.ones(s) for s in sizes]
    grads = torch.autograd.grad(F.cross_entropy(net(x, ones, pert[:len(sizes)], pert[len(sizes):]), y), pert)
    moved = [(p.detach() + eps * gr.sign()).clamp(-eps, eps) for p, gr in zip(pert, grads)]  # ascent, projected
    delta, xi = moved[:len(sizes)], moved[len(sizes):]
    unprojected = torch.cat([(p.detach() + eps * gr.sign()).abs() for p, gr in zip(pert, grads)])
    assert unprojected.max() > eps  # without the projection a step of eps from U(-eps, eps) leaves the budget
    m = [torch.ones(s, requires_grad=True) for s in sizes]
    loss = alpha * F.cross_entropy(net(x, m), y) + (1 - alpha) * F.cross_entropy(net(x, m, delta, xi), y)
    expected = [(1 - lr * gr).clamp(0, 1) for gr in torch.autograd.grad(loss, m)]  # first momentum step = gradient

    names = [n for n, _ in norm_layers(model)]
    assert list(got.masks) == names
    for i, name in enumerate(names):
        assert torch.allclose(got.delta[name], delta[i], atol=1e-6), name
        assert torch.allclose(got.xi[name], xi[i], atol=1e-6), name
        assert torch.allclose(got.masks[name], expected[i], atol=1e-5), name
    assert any((got.masks[n] < 1).any() for n in names)  # the masks moved
    # the perturbation is adversarial: it raises the loss above the natural one
    assert F.cross_entropy(net(x, ones, delta, xi), y) > F.cross_entropy(net(x, ones), y)


def test_masks_stay_in_unit_interval_and_perturbations_within_eps():
    model, data = tiny(), noise_set(40)
    cfg = ANP.Config(**{**QUICK, "eps": 0.3})  # a huge lr: unclipped masks would leave [0, 1]
    got = optimize_masks(model, data.images, data.labels, cfg, CPU, torch.Generator().manual_seed(0))
    masks = torch.cat(list(got.masks.values()))
    assert masks.min() >= 0 and masks.max() <= 1
    assert (masks == 0).any() and (masks == 1).any()  # clipped at both ends
    for pert in (got.delta, got.xi):
        flat = torch.cat(list(pert.values())).abs()
        assert flat.max() <= 0.3 + 1e-7
        assert torch.isclose(flat.max(), torch.tensor(0.3))  # a step of eps from U(-eps, eps) reaches the bound
    # the model it was given is untouched (a working copy did the train-mode passes)
    assert all(torch.equal(v, tiny().state_dict()[k]) for k, v in model.state_dict().items())


def test_eps_zero_uses_the_natural_loss_only():
    model, data = tiny(), noise_set(40)
    got = optimize_masks(model, data.images, data.labels, ANP.Config(**{**QUICK, "eps": 0.0}), CPU,
                         torch.Generator().manual_seed(0))
    assert all(not t.any() for t in list(got.delta.values()) + list(got.xi.values()))
    assert all(((m >= 0) & (m <= 1)).all() for m in got.masks.values())


def test_pruning_zeroes_exactly_the_neurons_below_threshold():
    model = tiny()
    layers = norm_layers(model)
    g = torch.Generator().manual_seed(0)
    masks = {name: torch.rand(bn.num_features, generator=g) for name, bn in layers}
    masks[layers[0][0]][0] = 0.2  # exactly at the threshold: kept (strict <)
    before = {name: (bn.weight.detach().clone(), bn.bias.detach().clone()) for name, bn in layers}
    pruned = copy.deepcopy(model)
    count = prune_neurons(pruned, masks, 0.2)
    assert count == sum(int((m < 0.2).sum()) for m in masks.values()) > 0
    for name, bn in norm_layers(pruned):
        cut = masks[name] < 0.2
        w0, b0 = before[name]
        assert not bn.weight[cut].any() and not bn.bias[cut].any()
        assert torch.equal(bn.weight[~cut], w0[~cut]) and torch.equal(bn.bias[~cut], b0[~cut])
    # the authors' rule: the scale only
    scale_only = copy.deepcopy(model)
    prune_neurons(scale_only, masks, 0.2, prune_bias=False)
    for name, bn in norm_layers(scale_only):
        cut = masks[name] < 0.2
        assert not bn.weight[cut].any() and torch.equal(bn.bias, before[name][1])


def test_purify_prunes_where_the_masks_end_low():
    model = tiny()
    defense = ANP(ANP.Config(**QUICK, threshold=0.5))
    found = defense.optimize_masks(model, context(model, n=40))
    out = defense.purify(model, context(model, n=40))  # the same seed: the same masks
    pruned = 0
    for (name, bn), (_, bn0) in zip(norm_layers(out), norm_layers(model)):
        cut = found.masks[name] < 0.5
        pruned += int(cut.sum())
        assert not bn.weight[cut].any() and not bn.bias[cut].any()
        assert torch.equal(bn.weight[~cut], bn0.weight[~cut]) and torch.equal(bn.bias[~cut], bn0.bias[~cut])
        assert torch.equal(bn.running_mean, bn0.running_mean) and torch.equal(bn.running_var, bn0.running_var)
    assert pruned > 0


def test_threshold_zero_prunes_nothing():
    model = tiny()
    out = ANP(ANP.Config(**QUICK, threshold=0.0)).purify(model, context(model, n=40))
    assert all(torch.equal(v, out.state_dict()[k]) for k, v in model.state_dict().items())


def test_contract_on_the_tiny_model():
    model = tiny()
    defense = ANP(ANP.Config(**QUICK))
    check_contract(model, defense, lambda seed: defense.purify(model, context(model, n=40, seed=seed)),
                   seeds_differ=True)
    for bad in (dict(alpha=1.5), dict(eps=-0.1), dict(threshold=1.1), dict(momentum=1.0), dict(iterations=0)):
        with pytest.raises(ValueError):
            ANP.Config(**bad)


def test_defaults_follow_the_paper():
    cfg = ANP.Config()
    assert (cfg.eps, cfg.alpha, cfg.anp_steps, cfg.lr, cfg.momentum) == (0.4, 0.2, 1, 0.2, 0.9)
    assert (cfg.iterations, cfg.batch_size, cfg.threshold) == (2000, 128, 0.2)


def test_needs_batchnorm():
    from backdoor_harness.errors import HarnessError

    vit = create_model({"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1,
                                                                   "embed_dim": 32, "num_heads": 2},
                        "adapt_stem": False}, 10, 32)
    assert not ANP().supports(model_family(vit))
    with pytest.raises(HarnessError, match="BatchNorm"):
        ANP(ANP.Config(iterations=1, batch_size=4)).purify(vit, context(vit, n=40))
