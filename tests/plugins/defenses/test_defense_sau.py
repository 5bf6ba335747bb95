"""SAU's mechanism, tested directly on the tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from backdoor_harness.models import create_model
from backdoor_harness.plugins.defenses.sau import (SAU, js_divergence, shared_pgd, shared_pgd_objective,
                                                   shared_unlearning_loss)

from helpers import check_contract, context, moved, noise_set, same, tiny

QUICK = dict(epochs=1, pgd_steps=1, batch_size=12, pgd_init="random")  # one batch; the seed draws delta_0


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def js(a, b):
    p, q = softmax(a), softmax(b)
    m = [(u + v) / 2 for u, v in zip(p, q)]
    return 0.5 * sum(u * math.log(u / w) + v * math.log(v / w) for u, v, w in zip(p, q, m))


# -------------------------------------------------------------------- the losses, by hand


def test_pgd_objective_equals_a_hand_calculation():
    # f(x+d), f0(x+d); clean predictions; labels
    adv = [[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    adv_ref = [[0.0, 0.0, 3.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    clean, clean_ref, y = [0, 1, 2], [0, 1, 1], [0, 1, 2]
    # sample 0: both fooled (1 != 0, 2 != 0) but to different labels -> not shared
    # sample 1: both fooled to label 0 -> shared (no JS term, no adversarial CE)
    # sample 2: neither fooled (f keeps 2, f0 keeps 1) -> CE of both enters L_adv, JS enters
    loss, shared = shared_pgd_objective(torch.tensor(adv), torch.tensor(adv_ref), torch.tensor(clean),
                                        torch.tensor(clean_ref), torch.tensor(y), beta_adv=0.01, beta_shared=1.0)
    assert shared.tolist() == [False, True, False]
    ce = lambda row, k: -math.log(softmax(row)[k])  # noqa: E731
    l_adv = -(ce(adv[2], 2) + ce(adv_ref[2], 2)) / (2 * 3)
    l_js = (js(adv[0], adv_ref[0]) + js(adv[2], adv_ref[2])) / 3
    assert loss.item() == pytest.approx(0.01 * l_adv + l_js, rel=1e-5)
    # the JS helper itself: symmetric, zero on equal logits, ln 2 for disjoint one-hots
    assert js_divergence(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]])).item() == pytest.approx(0, abs=1e-7)
    far = js_divergence(torch.tensor([[60.0, 0.0]]), torch.tensor([[0.0, 60.0]])).item()
    assert far == pytest.approx(math.log(2), rel=1e-5)


def test_shared_unlearning_loss_equals_a_hand_calculation():
    ln3 = math.log(3)
    adv = torch.tensor([[0.0, 0.0, ln3], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [30.0, 0.0, 0.0]], requires_grad=True)
    adv_ref = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    clean_ref = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 2, 0])
    # f0's adversarial labels: 2, 2, 2, 1; its clean predictions: 0, 2, 0, 0
    # sample 0: 2 != y=0 and != 0 -> counted; r = 3/5 -> -log(0.4 + 1e-6) - log(1 + 1e-6 - 0.6)
    # sample 1: 2 == f0's clean prediction -> not counted
    # sample 2: 2 == y -> not counted
    # sample 3: 1 != 0, != 0 -> counted; r ~ e^-30, clamped: -log(1e-6 + 0.999) - log(1 + 1e-6 - 0.001)
    loss = shared_unlearning_loss(adv, adv_ref, clean_ref, y)
    expected = (-math.log(0.4 + 1e-6) - math.log(0.4 + 1e-6) - 2 * math.log(0.999 + 1e-6)) / 2 / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert adv.grad[0, 2] > 0  # descending lowers f's probability of f0's adversarial label
    assert adv.grad[1].abs().sum() == 0 and adv.grad[2].abs().sum() == 0
    # nothing fools f0: the loss is zero but still differentiable
    none = shared_unlearning_loss(adv, clean_ref, clean_ref, y)
    assert none.item() == 0 and none.requires_grad


# -------------------------------------------------------------------- shared PGD


@pytest.mark.parametrize("init", ["max", "random"])
def test_pgd_stays_in_the_eps_ball_and_in_the_image_range(init):
    ref, model = tiny(), moved(tiny())
    x = noise_set(6).images.float() / 255  # uniform pixels: many within eps of 0 or 1
    y = torch.arange(6)
    cfg = SAU.Config(eps=0.1, pgd_step_size=0.04, pgd_steps=1, pgd_init=init)
    delta = shared_pgd(model, ref, x, y, cfg, torch.Generator().manual_seed(0))
    assert delta.abs().max() <= 0.1 + 1e-6
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    assert delta.abs().max() > 0.05  # it did perturb
    # without the clip, the +eps start leaves [0, 1] (so the clip above is what holds it)
    free = shared_pgd(model, ref, x, y, cfg.model_copy(update={"clip_images": False}), torch.Generator())
    assert free.abs().max() <= 0.1 + 1e-6 and ((x + free).max() > 1 or (x + free).min() < 0)


def test_a_pgd_step_descends_the_objective_by_its_sign():
    ref, model = tiny(), moved(tiny())
    x = noise_set(8).images.float() / 255
    y = torch.arange(8)
    cfg = SAU.Config(eps=0.05, pgd_step_size=0.01, pgd_steps=1, pgd_init="zero", clip_images=False)
    delta = shared_pgd(model, ref, x, y, cfg, torch.Generator())
    # by hand: gradient of the objective at delta = 0, one signed descent step
    d = torch.zeros_like(x, requires_grad=True)
    with torch.no_grad():
        pred, pred_ref = model(x).argmax(1), ref(x).argmax(1)
    loss, _ = shared_pgd_objective(model(x + d), ref(x + d), pred, pred_ref, y, cfg.beta_adv, cfg.beta_shared)
    (g,) = torch.autograd.grad(loss, d)
    assert torch.equal(delta, (-0.01 * g.sign()).clamp(-0.05, 0.05))


# -------------------------------------------------------------------- the unlearning step


def test_one_sau_step_is_an_adam_step_on_clean_ce_plus_the_shared_loss():
    backdoored = tiny()
    data = noise_set(12)
    cfg = SAU.Config(epochs=1, batch_size=12, pgd_steps=1)
    out = SAU(cfg).purify(backdoored, context(backdoored, data, seed=3)).model

    # by hand, with the same batch order (one randperm from the same seed)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    x, y = data.images[perm].float() / 255, data.labels[perm]
    model, ref = copy.deepcopy(backdoored), copy.deepcopy(backdoored)
    delta = shared_pgd(model, ref, x, y, cfg, torch.Generator())
    with torch.no_grad():
        adv_ref, clean_ref = ref(x + delta), ref(x)
    l_sar = shared_unlearning_loss(model(x + delta), adv_ref, clean_ref, y)
    assert l_sar.item() > 0  # f0 is fooled on some samples: the shared term is active here
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999))
    (F.cross_entropy(model(x), y) + l_sar).backward()
    opt.step()
    for (name, p), q in zip(out.named_parameters(), model.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name
    # eval mode throughout: BN running statistics untouched
    for (name, b), b0 in zip(out.named_buffers(), backdoored.buffers()):
        assert torch.equal(b, b0), name
    # and the shared term matters: an Adam step on CE alone lands elsewhere
    plain = copy.deepcopy(backdoored)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-4, betas=(0.9, 0.999))
    F.cross_entropy(plain(x), y).backward()
    opt.step()
    assert not all(torch.allclose(p, q, rtol=1e-5, atol=1e-7) for p, q in zip(plain.parameters(), out.parameters()))


def test_contract_on_the_tiny_model():
    model = tiny()
    defense = SAU(SAU.Config(**QUICK))
    # another seed: another random start of PGD
    out = check_contract(model, defense, lambda seed: defense.purify(model, context(model, n=12, seed=seed)).model,
                         seeds_differ=True)
    assert not same(out, model)  # the output moved
    with pytest.raises(ValueError):
        SAU.Config(eps=0)
    with pytest.raises(ValueError):
        SAU.Config(pgd_init="gaussian")
    with pytest.raises(ValueError):
        SAU.Config(adam_beta1=1.0)


def test_defaults_follow_the_config():
    cfg = SAU.Config()
    assert (cfg.eps, cfg.pgd_step_size, cfg.pgd_steps, cfg.pgd_init) == (0.2, 0.2, 5, "max")
    assert (cfg.beta_adv, cfg.beta_shared, cfg.lambda_clean, cfg.lambda_at, cfg.lambda_shared) == (0.01, 1, 1, 0, 1)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.outer_steps) == (100, 256, 1e-4, 0, 1)
    assert (cfg.augment, cfg.train_mode) == (False, False)


def test_trains_a_vit():
    """SAU's adversarial unlearning moves a ViT's weights (its run on every family is in test_defenses.py)."""
    spec = {"name": "vit_tiny_patch16_224", "adapt_stem": False,
            "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}}
    torch.manual_seed(0)
    model = create_model(spec, 10, 32).eval()
    out = SAU(epochs=1, pgd_steps=1, batch_size=10).purify(model, context(model, noise_set(10))).model
    assert not same(out, model)
