"""D3's mechanism (distance-driven detoxification), tested directly on the tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import backdoor_harness as bh
from backdoor_harness.models import classifier, create_model
from backdoor_harness.plugins.defenses.d3 import D3, d3_objective, select_layers, warm_up, weight_distance
from backdoor_harness.train import random_crop_flip

from helpers import check_contract, context, noise_set, tiny

QUICK = dict(epochs=2, batch_size=32)  # 4 steps on 64 images
#: the tiny model's seed, not 0: torch.rand from a generator seeded 0 replays the global stream that initialised
#: the first conv (kaiming-uniform), so the "random" warm-up would hand that conv its own weights back
SEED = 5


def frobenius(t: torch.Tensor) -> float:
    """||t||_F by hand, in double precision."""
    return math.sqrt(sum(v * v for v in t.detach().double().flatten().tolist()))


def by_name(model):
    return dict(model.named_parameters())


# -- the objective -------------------------------------------------------------


def test_loss_equals_a_hand_computation_for_small_and_large_lambda():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 3.0, 0.0]])
    labels = torch.tensor([0, 2, 1])
    eps, d = 0.2, torch.tensor(0.7)
    ce = [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits.tolist(), labels.tolist())]
    assert ce[0] < eps < ce[1]  # one sample inside the margin: the hinge is per sample
    h = sum(max(0.0, c - eps) for c in ce) / 3
    assert h != pytest.approx(max(0.0, sum(ce) / 3 - eps))  # not the hinge of the mean
    for lmd, expected in [(0.5, 0.5 * h - 0.7), (1.0, h - 0.7), (10.0, (10 * h - 0.7) / 11)]:
        got = d3_objective(logits, labels, d, lmd, eps)
        assert got.item() == pytest.approx(expected, rel=1e-6), lmd


def test_distance_is_a_sum_of_plain_frobenius_norms():
    w = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 2.0], [2.0, 4.0]])]
    w0 = [torch.zeros(2), torch.zeros(2, 2)]
    assert weight_distance(w, w0).item() == pytest.approx(5.0 + 5.0)  # not sqrt(50), not 25 + 25


# -- the warm-up ------------------------------------------------------------------


def test_warm_up_modes_do_what_they_say():
    model = tiny(SEED)
    weights = [m.weight.detach().clone() for m in select_layers(model, "all")]
    norms = [frobenius(w) for w in weights]

    def warmed(mode, seed=0):
        ws = [w.clone() for w in weights]
        warm_up(ws, mode, torch.Generator().manual_seed(seed))
        return ws

    assert all(not w.any() for w in warmed("middle"))
    assert all(torch.equal(w, -w0) for w, w0 in zip(warmed("far"), weights))
    assert all(torch.equal(w, w0) for w, w0 in zip(warmed("near"), weights))
    random = warmed("random")
    for w, w0, c in zip(random, weights, norms):
        assert frobenius(w) == pytest.approx(c, rel=1e-5)  # each weight keeps its own norm
        cos = (w * w0).sum() / (w.norm() * w0.norm())
        assert abs(cos) < 0.3  # a fresh random direction, not the old weight
    # U(-0.5, 0.5) from the generator, in module order, then rescaled: by hand
    g = torch.Generator().manual_seed(0)
    for w, w0 in zip(random, weights):
        u = torch.rand(w0.shape, generator=g) - 0.5
        assert torch.allclose(w, u * w0.norm() / u.norm(), atol=1e-6)
        assert (w / (w0.norm() / u.norm())).abs().max() <= 0.5 + 1e-6
    assert all(torch.equal(a, b) for a, b in zip(random, warmed("random")))  # seeded
    assert not all(torch.equal(a, b) for a, b in zip(random, warmed("random", seed=1)))
    g = torch.Generator().manual_seed(0)
    for w, w0 in zip(warmed("noise"), weights):
        assert torch.allclose(w, w0 + torch.randn(w0.shape, generator=g) * w0.std(), atol=1e-6)


# -- the selection -------------------------------------------------------------------


def test_layer_selection():
    model = tiny(SEED)
    assert select_layers(model, "head") == [classifier(model)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert select_layers(model, "all") == convs + [classifier(model)]
    assert select_layers(model, D3.Config(layers="features").layers) == convs  # a substring of module names
    assert select_layers(model, ("features.9", "fc")) == [convs[-1], classifier(model)]
    with pytest.raises(bh.HarnessError, match="selects no"):
        select_layers(model, ("no_such_module",))


def test_config_defaults_and_validation():
    cfg = D3.Config()
    assert (cfg.lmd, cfg.eps, cfg.layers, cfg.warm_up) == (10.0, 0.1, "head", "random")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == (100, 256, 0.01, 0.9, 0.0)
    r = cfg.recipe()
    assert (r.schedule, r.augment, r.weight_decay, r.batch_size) == ("cosine", True, 0.0, 256)
    for value in ("head", "all", ("features", "fc")):
        c = D3.Config(layers=value)
        assert D3.Config.model_validate_json(c.model_dump_json()) == c
    assert D3.Config(layers=["fc"]).layers == ("fc",)
    for bad in (dict(lmd=-1), dict(eps=-0.1), dict(warm_up="zero"), dict(layers=()), dict(layers=("",)),
                dict(momentum=1.0), dict(epochs=0), dict(unknown=1)):
        with pytest.raises(ValueError):
            D3.Config(**bad)


# -- training ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def purified():
    """layers -> (backdoored, purified) with the code's lambda 0.5, two short epochs at lr 0.05."""
    model = tiny(SEED)
    return {layers: (model, D3(lmd=0.5, layers=layers, lr=0.05, **QUICK).purify(model, context(model, n=64)).model)
            for layers in ("head", "all")}


@pytest.mark.parametrize("layers", ["head", "all"])
def test_projection_keeps_every_selected_norm_after_training(purified, layers):
    model, out = purified[layers]
    before = [frobenius(m.weight) for m in select_layers(model, layers)]
    after = select_layers(out, layers)
    assert len(after) == len(before) == (1 if layers == "head" else 5)
    for m, c in zip(after, before):
        assert frobenius(m.weight) == pytest.approx(c, rel=1e-5)
    # and training did move them: far from the backdoored weights
    for m, m0 in zip(after, select_layers(model, layers)):
        assert frobenius(m.weight - m0.weight) > 0.5 * frobenius(m0.weight)


def test_the_distance_term_pushes_away_from_the_initial_weights(purified):
    """From the random warm start, training increases ||W - W_init|| (the sign of -d is right)."""
    model, out = purified["head"]
    w0 = classifier(model).weight.detach().clone()
    start = [w0.clone()]
    warm_up(start, "random", torch.Generator().manual_seed(0))  # what purify draws first from the same seed
    assert frobenius(classifier(out).weight - w0) > frobenius(start[0] - w0) + 0.05 * frobenius(w0)


def test_non_selected_layers_are_trained_too(purified):
    model, out = purified["head"]
    old, new = by_name(model), by_name(out)
    for name in old:  # every parameter moved: convs, BN affine, the head's bias
        assert not torch.equal(old[name], new[name]), f"{name} was not trained"


def test_first_step_equals_a_hand_computation():
    """One step of purify (far warm-up, momentum 0, one batch) = the hand-made projected SGD step."""
    model, data, lr, lmd, eps = tiny(SEED), noise_set(32), 0.05, 10.0, 0.1
    out = D3(lmd=lmd, eps=eps, warm_up="far", epochs=1, batch_size=32, lr=lr, momentum=0.0).purify(
        model, context(model, data)).model

    hand = copy.deepcopy(model).train()
    w0 = classifier(model).weight.detach().clone()
    with torch.no_grad():
        classifier(hand).weight.neg_()
    g = torch.Generator().manual_seed(0)  # fit's draws: the order, then crop + flip
    perm = torch.randperm(len(data), generator=g)
    x = random_crop_flip(data.images[perm], g).float() / 255
    y = data.labels[perm]
    ce = F.cross_entropy(hand(x), y, reduction="none")
    h = torch.clamp(ce - eps, min=0).mean()
    d = torch.sqrt(((classifier(hand).weight - w0) ** 2).sum())
    loss = (lmd * h - d) / (lmd + 1)
    grads = torch.autograd.grad(loss, list(hand.parameters()))
    with torch.no_grad():
        for p, gr in zip(hand.parameters(), grads):
            p.sub_(lr * gr)
        w = classifier(hand).weight
        w.mul_(w0.norm() / w.norm())
    for (name, p), q in zip(out.named_parameters(), hand.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name


def test_contract_on_the_tiny_model_and_the_small_vit():
    model, data = tiny(SEED), noise_set(32)
    defense = D3(epochs=1, batch_size=32)
    out = check_contract(model, defense, lambda seed: defense.purify(model, context(model, data, seed=seed)).model)
    other = defense.purify(model, context(model, data, seed=1)).model
    assert not torch.equal(classifier(out).weight, classifier(other).weight)  # the warm-up uses ctx.generator

    spec = {"name": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
            "adapt_stem": False}
    torch.manual_seed(0)
    vit = create_model(spec, 10, 32).eval()
    out = D3(epochs=1, batch_size=32).purify(vit, context(vit, noise_set(32))).model
    assert out(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert frobenius(classifier(out).weight) == pytest.approx(frobenius(classifier(vit).weight), rel=1e-5)
    create_model(spec, 10, 32).load_state_dict(out.state_dict())
