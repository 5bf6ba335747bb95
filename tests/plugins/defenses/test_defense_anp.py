"""ANP's mechanism, tested directly on the tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from backdoor_harness.layers import norm_layers
from backdoor_harness.models import create_model, model_family
from backdoor_harness.errors import HarnessError
from backdoor_harness.metrics import accuracy
from backdoor_harness.plugins.defenses import anp as anp_module
from backdoor_harness.plugins.defenses.anp import (ANP, NeuronMasks, PerturbedBatchNorm, choose_threshold,
                                                   optimize_masks, prune_neurons)
from backdoor_harness.train import predict, random_crop_flip

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
    defense = ANP(ANP.Config(**QUICK, thresholds=[0.5]))
    found = defense.optimize_masks(model, context(model, n=40))
    out = defense.purify(model, context(model, n=40)).model  # the same seed: the same masks
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
    out = ANP(ANP.Config(**QUICK, thresholds=[0.0])).purify(model, context(model, n=40)).model
    assert all(torch.equal(v, out.state_dict()[k]) for k, v in model.state_dict().items())


def test_contract_on_the_tiny_model():
    model = tiny()
    for cfg in (ANP.Config(**QUICK), ANP.Config(**QUICK, thresholds=[0.2])):  # with and without the selection
        defense = ANP(cfg)
        check_contract(model, defense, lambda seed: defense.purify(model, context(model, n=40, seed=seed)).model,
                       seeds_differ=True)
    for bad in (dict(alpha=1.5), dict(eps=-0.1), dict(thresholds=[0.5, 1.1]), dict(thresholds=[]),
                dict(thresholds=[-0.1]), dict(acc_ratio=0.0), dict(val_ratio=1.0), dict(momentum=1.0),
                dict(iterations=0)):
        with pytest.raises(ValueError):
            ANP.Config(**bad)


def test_the_old_threshold_key_says_how_to_get_the_old_behaviour():
    with pytest.raises(ValueError, match=r"thresholds: \[0.3\]"):
        ANP.Config(threshold=0.3)


def test_defaults_follow_the_paper():
    cfg = ANP.Config()
    assert (cfg.eps, cfg.alpha, cfg.anp_steps, cfg.lr, cfg.momentum) == (0.4, 0.2, 1, 0.2, 0.9)
    assert (cfg.iterations, cfg.batch_size) == (2000, 128)
    # paper 000's range 0.4-0.9 at BackdoorBench's step 0.05; BackdoorBench's acc_ratio; paper 003's val share
    assert cfg.thresholds == (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
    assert (cfg.acc_ratio, cfg.val_ratio) == (0.1, 0.1)
    assert ANP.Config(thresholds=[0.9, 0.5, 0.5, 0.7]).thresholds == (0.5, 0.7, 0.9)  # sorted, no repeats


def test_choose_threshold_takes_the_largest_admissible_one():
    # acc0 0.8, acc_ratio 0.1: admissible when the drop is below 0.08 (or there is none)
    cands = [(0.4, 0.79), (0.5, 0.75), (0.6, 0.70), (0.7, 0.73), (0.8, 0.60)]
    assert choose_threshold(0.8, cands, 0.1) == 0.7  # 0.6 fails, 0.7 passes again: every candidate is tried
    assert choose_threshold(0.8, cands, 0.07) == 0.5
    assert choose_threshold(0.8, cands, 0.3) == 0.8
    assert choose_threshold(1.0, [(0.4, 0.75), (0.5, 0.5)], 0.25) is None  # a drop of exactly 25%: not below it
    assert choose_threshold(0.5, [(0.4, 0.9), (0.9, 0.1)], 0.1) == 0.4  # an increase never disqualifies
    assert choose_threshold(0.0, [(0.4, 0.0)], 0.1) == 0.4  # nor does no change at zero accuracy


#: constructed masks: every layer cycles through these values, so each threshold of GRID prunes a known set
MASK_VALUES = torch.tensor([0.35, 0.45, 0.55, 0.65, 0.75, 0.95])
GRID = [0.4, 0.5, 0.6, 0.7, 0.8]


def constructed_masks(model):
    return {name: MASK_VALUES.repeat(bn.num_features // 6 + 1)[:bn.num_features] for name, bn in norm_layers(model)}


def fake_scoring(monkeypatch, model, accs, acc0):
    """ANP with the constructed masks, and a validation accuracy read off how many neurons a model has pruned:
    ``acc0`` unpruned, ``accs[i]`` pruned at GRID[i]. Returns the list of the scored models' pruned counts."""
    masks = constructed_masks(model)
    monkeypatch.setattr(anp_module, "optimize_masks",
                        lambda m, images, labels, cfg, device, gen, aug=None: NeuronMasks(masks, {}, {}))
    by_count = {0: acc0}
    for t, acc in zip(GRID, accs):
        by_count[sum(int((m < t).sum()) for m in masks.values())] = acc
    assert len(by_count) == len(GRID) + 1
    seen = []

    def score(m, images, labels, device):
        count = sum(int((bn.weight == 0).sum()) for _, bn in norm_layers(m))
        seen.append(count)
        return by_count[count]

    monkeypatch.setattr(anp_module, "validation_accuracy", score)
    return masks, seen


def test_purify_prunes_at_the_largest_threshold_within_the_tolerance(monkeypatch):
    model = tiny()
    masks, seen = fake_scoring(monkeypatch, model, [0.89, 0.85, 0.70, 0.82, 0.50], acc0=0.9)
    defense = ANP(ANP.Config(**QUICK, thresholds=GRID))  # acc_ratio 0.1: admissible while the drop is < 0.09
    out, rep = defense.purify(model, context(model, n=40))
    expected = copy.deepcopy(model)
    count = prune_neurons(expected, masks, 0.7)  # 0.6 fails (0.70), 0.7 passes (0.82), 0.8 fails (0.50)
    assert helpers.same(out, expected)
    assert rep["selected"] == 0.7 and rep["pruned"] == count and rep["neurons"] == 120
    assert rep["val_acc_unpruned"] == 0.9
    assert [c["val_acc"] for c in rep["candidates"]] == [0.89, 0.85, 0.70, 0.82, 0.50]
    assert [c["admissible"] for c in rep["candidates"]] == [True, True, False, True, False]
    assert [c["threshold"] for c in rep["candidates"]] == GRID
    assert seen == [0] + [c["pruned"] for c in rep["candidates"]]  # the unpruned model, then each candidate
    # a looser tolerance admits the most pruning, a tighter one less
    for ratio, chosen in ((0.5, 0.8), (0.06, 0.5), (0.02, 0.4), (0.005, None)):
        other = ANP(ANP.Config(**QUICK, thresholds=GRID, acc_ratio=ratio))
        assert other.purify(model, context(model, n=40)).report["selected"] == chosen, ratio


def test_purify_returns_the_unpruned_model_when_no_threshold_keeps_the_accuracy(monkeypatch):
    model = tiny()
    fake_scoring(monkeypatch, model, [0.5, 0.4, 0.3, 0.2, 0.1], acc0=0.9)
    defense = ANP(ANP.Config(**QUICK, thresholds=GRID))
    out, rep = defense.purify(model, context(model, n=40))
    assert helpers.same(out, model)
    assert rep["selected"] is None and rep["pruned"] == 0
    looser = ANP(ANP.Config(**QUICK, thresholds=GRID, acc_ratio=0.9))
    assert looser.purify(model, context(model, n=40)).report["selected"] == 0.8


def test_masks_learn_on_the_training_part_and_only_the_validation_part_scores(monkeypatch):
    model = tiny()
    ctx = context(model, n=60)
    train, val = context(model, n=60).split(0.1)  # the same seed: the split purify draws first
    assert len(val) == 10 and len(train) == 50
    learned, scored = [], []
    real_optimize, real_score = anp_module.optimize_masks, anp_module.validation_accuracy

    def optimize(m, images, labels, *a):
        learned.append((images, labels))
        return real_optimize(m, images, labels, *a)

    def score(m, images, labels, device):
        scored.append((images, labels))
        return real_score(m, images, labels, device)

    monkeypatch.setattr(anp_module, "optimize_masks", optimize)
    monkeypatch.setattr(anp_module, "validation_accuracy", score)
    defense = ANP(ANP.Config(**QUICK))
    out, rep = defense.purify(model, ctx)
    assert len(learned) == 1 and torch.equal(learned[0][0], train.images) and torch.equal(learned[0][1], train.labels)
    assert len(scored) == 1 + len(ANP.Config().thresholds)
    assert all(torch.equal(x, val.images) and torch.equal(y, val.labels) for x, y in scored)
    assert (rep["train_size"], rep["val_size"]) == (50, 10)

    # the reported accuracies are the pruned models' on the validation part, and the output is pruned at the choice
    ref = context(model, n=60)
    ref.split(0.1)  # advance the generator past the split, as purify does
    masks = real_optimize(model, train.images, train.labels, defense.config, CPU, ref.generator).masks
    base = accuracy(predict(copy.deepcopy(model), val.images, CPU), val.labels)
    assert rep["val_acc_unpruned"] == base
    for c in rep["candidates"]:
        pruned = copy.deepcopy(model)
        assert prune_neurons(pruned, masks, c["threshold"]) == c["pruned"]
        assert c["val_acc"] == accuracy(predict(pruned, val.images, CPU), val.labels)
    expected = copy.deepcopy(model)
    if rep["selected"] is not None:
        prune_neurons(expected, masks, rep["selected"])
    assert helpers.same(out, expected)
    assert len({c["pruned"] for c in rep["candidates"]}) > 1  # the grid spans different prunings


def test_a_single_threshold_is_the_old_fixed_threshold_rule():
    model = tiny()
    cfg = ANP.Config(**QUICK, thresholds=[0.2])
    defense = ANP(cfg)
    out, rep = defense.purify(model, context(model, n=40, seed=3))
    # version 1's purify: masks on the whole reserve (no split drawn), prune at 0.2
    data = noise_set(40, 3)
    masks = optimize_masks(model, data.images, data.labels, cfg, CPU, torch.Generator().manual_seed(3)).masks
    expected = copy.deepcopy(model)
    count = prune_neurons(expected, masks, 0.2)
    assert count > 0 and helpers.same(out, expected)
    assert rep["selected"] == 0.2 and rep["pruned"] == count and rep["val_acc_unpruned"] is None
    assert (rep["train_size"], rep["val_size"]) == (40, 0)


def test_val_ratio_zero_shares_the_reserve(monkeypatch):
    model = tiny()
    learned, scored = [], []
    real_optimize, real_score = anp_module.optimize_masks, anp_module.validation_accuracy
    monkeypatch.setattr(anp_module, "optimize_masks",
                        lambda m, x, y, *a: learned.append(x) or real_optimize(m, x, y, *a))
    monkeypatch.setattr(anp_module, "validation_accuracy",
                        lambda m, x, y, d: scored.append(x) or real_score(m, x, y, d))
    ctx = context(model, n=40)
    ANP(ANP.Config(**QUICK, val_ratio=0.0)).purify(model, ctx)
    assert all(x is ctx.reserve.images for x in learned + scored) and len(scored) == 12


def test_the_selection_needs_a_validation_image_per_class():
    model = tiny()
    with pytest.raises(HarnessError, match="at least 2 images per class"):
        ANP(ANP.Config(**QUICK)).purify(model, context(model, n=10))  # one image per class: nothing to hold out
    ANP(ANP.Config(**QUICK, thresholds=[0.2])).purify(model, context(model, n=10))  # no selection: fine


def test_needs_batchnorm():
    from backdoor_harness.errors import HarnessError

    vit = create_model({"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1,
                                                                   "embed_dim": 32, "num_heads": 2},
                        "adapt_stem": False}, 10, 32)
    assert not ANP().supports(model_family(vit))
    with pytest.raises(HarnessError, match="BatchNorm"):
        ANP(ANP.Config(iterations=1, batch_size=4)).purify(vit, context(vit, n=40))
