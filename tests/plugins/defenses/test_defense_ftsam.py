"""FT-SAM's mechanism, tested directly on the tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from backdoor_harness.plugins.defenses.ftsam import FTSAM, SharpnessAwareLoss, smoothed_cross_entropy
from backdoor_harness.train import Recipe, fit

from helpers import CPU, check_contract, context, noise_set, one_step, tiny

QUICK = dict(epochs=1, batch_size=16)


def test_smoothed_cross_entropy_matches_its_definition():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 2])
    s = 0.2
    logp = torch.log_softmax(logits, 1)
    # by hand: 1 - s on the label, s / (K - 1) = 0.1 on each of the two others
    by_hand = -(0.8 * logp[0, 0] + 0.1 * logp[0, 1] + 0.1 * logp[0, 2]
                + 0.8 * logp[1, 2] + 0.1 * logp[1, 0] + 0.1 * logp[1, 1]) / 2
    assert torch.allclose(smoothed_cross_entropy(logits, labels, s), by_hand)
    assert torch.allclose(smoothed_cross_entropy(logits, labels, 0.0), F.cross_entropy(logits, labels))
    # not torch's convention (s / K everywhere plus 1 - s on the label)
    assert not torch.allclose(smoothed_cross_entropy(logits, labels, s), F.cross_entropy(logits, labels,
                                                                                         label_smoothing=s))


# plain SAM at SAM's usual 0.05: at larger radii the tiny model's gradient at W + e becomes sensitive to the
# batch order fit draws (a BN channel of near-zero batch variance), beyond float tolerance
@pytest.mark.parametrize("adaptive,eta,rho", [(True, 0.0, 0.5), (True, 0.01, 0.5), (False, 0.0, 0.05)])
def test_sam_step_equals_a_hand_computation(adaptive, eta, rho):
    model = tiny()
    data = noise_set(32)
    x, y = data.images.float() / 255, data.labels
    lr, s = 0.1, 0.1

    # by hand: g at W (train mode), e = rho T^2 g / ||T g|| (T = |W| + eta) or rho g / ||g||, one global norm;
    # then the gradient at W + e, applied to W
    at_w = copy.deepcopy(model).train()
    g = torch.autograd.grad(smoothed_cross_entropy(at_w(x), y, s), list(at_w.parameters()))
    w = [p.detach().clone() for p in model.parameters()]
    t = [p.abs() + eta if adaptive else torch.ones_like(p) for p in w]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    e = [rho * ti * ti * gi / norm for ti, gi in zip(t, g)]
    flat_e = torch.cat([v.flatten() for v in e])
    if not adaptive:
        assert torch.allclose(flat_e.norm(), torch.tensor(rho), rtol=1e-5)  # plain SAM: ||e|| = rho
    at_w_e = copy.deepcopy(model).train()
    with torch.no_grad():
        for p, ei in zip(at_w_e.parameters(), e):
            p.add_(ei)
    g_e = torch.autograd.grad(smoothed_cross_entropy(at_w_e(x), y, s), list(at_w_e.parameters()))
    expected = [wi - lr * gi for wi, gi in zip(w, g_e)]

    one_step(model, data, SharpnessAwareLoss(rho, adaptive, eta, s), lr)
    for (name, p), ex in zip(model.named_parameters(), expected):
        assert torch.allclose(p, ex, rtol=1e-5, atol=1e-6), name
    # BN running statistics come from the pass at W only (the perturbed pass leaves them alone)
    for (name, b), b_hand in zip(model.named_buffers(), at_w.buffers()):
        assert torch.allclose(b.float(), b_hand.float(), rtol=1e-5, atol=1e-6), name
    assert any(not torch.allclose(b.float(), b2.float()) for b, b2 in zip(model.buffers(), at_w_e.buffers()))

    # and the step differs from a plain step at W with the same loss (the test can fail)
    plain = tiny()
    one_step(plain, data, lambda m, xb, yb, _: smoothed_cross_entropy(m(xb), yb, s), lr)
    assert not all(torch.allclose(p, q, atol=1e-6) for p, q in zip(plain.parameters(), model.parameters()))


def test_adaptive_ascent_leaves_zero_weights_in_place_with_eta_zero():
    model = tiny()
    with torch.no_grad():
        next(model.parameters())[0].zero_()  # one filter at exactly 0
    data = noise_set(16)
    e = SharpnessAwareLoss(1.0, adaptive=True, eta=0.0).ascent(model.train(), data.images.float() / 255,
                                                                data.labels)
    first = next(iter(e.values()))
    assert not first[0].any() and first[1:].abs().sum() > 0  # T = |W|: a zero weight is not perturbed


def test_rho_zero_is_plain_fine_tuning():
    model = tiny()
    reserve = noise_set(32)
    cfg = dict(rho=0.0, label_smoothing=0.0, epochs=2, batch_size=16)
    out = FTSAM(**cfg).purify(model, context(model, reserve)).model
    plain = copy.deepcopy(model)
    recipe = Recipe(epochs=2, batch_size=16, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                    augment=True)
    fit(plain, reserve, recipe, device=CPU, generator=torch.Generator().manual_seed(0), progress=False)
    for (k, v), v2 in zip(out.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(v.float(), v2.float(), rtol=1e-5, atol=1e-7), k
    # rho > 0 does differ
    sam = FTSAM(**{**cfg, "rho": 1.0}).purify(model, context(model, reserve)).model
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(sam.parameters(), plain.parameters()))


def test_contract_on_the_tiny_model():
    model = tiny()
    defense = FTSAM(**QUICK)
    check_contract(model, defense, lambda seed: defense.purify(model, context(model, n=32, seed=seed)).model,
                   seeds_differ=True)
    for bad in (dict(rho=-0.1), dict(label_smoothing=1.0), dict(momentum=1.0), dict(epochs=0), dict(eta=-1)):
        with pytest.raises(ValueError):
            FTSAM.Config(**bad)


def test_defaults_follow_paper_000_and_backdoorbench():
    cfg = FTSAM.Config()
    assert (cfg.rho, cfg.adaptive, cfg.eta, cfg.label_smoothing) == (1.0, True, 0.0, 0.1)
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.momentum, cfg.weight_decay) == (0.01, 20, 256, 0.9, 5e-4)
