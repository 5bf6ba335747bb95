"""PAM's mechanism, tested directly on the tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from backdoor_harness.data import ImageSet
from backdoor_harness.errors import HarnessError
from backdoor_harness.plugins.defenses.btidbf import InversionConfig
from backdoor_harness.plugins.defenses.pam import PAM, PathAwareLoss

from helpers import CLASSES, check_contract, context, moved, noise_set, one_step, tiny

QUICK = dict(rounds=2, epochs=1, mask_epochs=1, generator_epochs=2, pretrain_epochs=1, generator_width=4,
             batch_size=64)
#: our small generator with the hard bound and no pre-training (BTI-DBF version 1's inversion)
SMALL = dict(generator="small", bound="hard", pretrain_epochs=0)


def test_interpolated_step_equals_a_hand_computation():
    backdoored = tiny()  # W0
    model = moved(backdoored)  # W, the current solution
    data = noise_set(32)
    lr, rho = 0.1, 0.5

    # by hand: W_d = W0 - W, one global norm, W~ = W + rho W_d / ||W_d||, gradient at W~ applied to W
    w = [p.detach().clone() for p in model.parameters()]
    w_d = [p0.detach() - p for p0, p in zip(backdoored.parameters(), w)]
    norm = torch.sqrt(sum((d ** 2).sum() for d in w_d))
    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        for p, d in zip(probe.parameters(), w_d):
            p.add_(rho * d / norm)
    loss = F.cross_entropy(probe(data.images.float() / 255), data.labels)
    grads = torch.autograd.grad(loss, list(probe.parameters()))
    expected = [p - lr * g for p, g in zip(w, grads)]

    # the implementation: one step of fit with PAM's loss
    w0 = {n: p.detach().clone() for n, p in backdoored.named_parameters()}
    one_step(model, data, PathAwareLoss(w0, rho), lr)
    for (name, p), e in zip(model.named_parameters(), expected):
        assert torch.allclose(p, e, rtol=1e-5, atol=1e-6), name
    # BN buffers: not interpolated; the running statistics come from the pass at W~ (train mode)
    for (name, b), (_, b_hand) in zip(model.named_buffers(), probe.named_buffers()):
        assert torch.allclose(b.float(), b_hand.float(), rtol=1e-5, atol=1e-6), name

    # and that differs from a plain SGD step at W (the test can fail)
    plain = moved(backdoored)
    one_step(plain, data, None, lr)
    assert not all(torch.allclose(p, q, atol=1e-6) for p, q in zip(plain.parameters(), model.parameters()))


def test_the_shift_has_length_rho_towards_w0_with_one_global_norm():
    backdoored = tiny()
    model = moved(backdoored)
    w0 = {n: p.detach().clone() for n, p in backdoored.named_parameters()}
    e = PathAwareLoss(w0, 0.7).shift(model)
    flat = torch.cat([t.flatten() for t in e.values()])
    diff = torch.cat([(w0[n] - p.detach()).flatten() for n, p in model.named_parameters()])
    assert torch.allclose(flat.norm(), torch.tensor(0.7), rtol=1e-5)
    assert torch.allclose(flat, 0.7 * diff / diff.norm(), atol=1e-7)  # not per-layer: one direction overall


def test_first_step_at_w0_is_plain_sgd():
    backdoored = tiny()
    data = noise_set(32)
    w0 = {n: p.detach().clone() for n, p in backdoored.named_parameters()}
    shift = PathAwareLoss(w0, 0.5).shift(backdoored)
    assert all(not t.any() for t in shift.values())  # ||W0 - W|| = 0: e = 0, no division by zero
    pam, plain = copy.deepcopy(backdoored), copy.deepcopy(backdoored)
    one_step(pam, data, PathAwareLoss(w0, 0.5), 0.1)
    one_step(plain, data, None, 0.1)
    assert all(torch.equal(p, q) for p, q in zip(pam.state_dict().values(), plain.state_dict().values()))


@pytest.mark.parametrize("form", [dict(generator="unet"), SMALL], ids=["unet-soft", "small-hard"])
def test_contract_on_the_tiny_model(form):
    model = tiny()
    defense = PAM(PAM.Config(**{**QUICK, **form}))
    check_contract(model, defense, lambda seed: defense.purify(model, context(model, n=200, seed=seed)).model,
                   seeds_differ=True)
    assert PAM.Config(epochs=1).epochs == 1
    with pytest.raises(ValueError):
        PAM.Config(rho=-0.1)
    with pytest.raises(ValueError):
        PAM.Config(momentum=1.0)


def test_defaults_follow_the_code():
    cfg = PAM.Config()
    assert (cfg.rho, cfg.lr, cfg.momentum, cfg.weight_decay) == (0.5, 0.01, 0.1, 0.0)
    assert (cfg.rounds, cfg.epochs, cfg.poison_fraction, cfg.batch_size) == (3, 30, 0.2, 128)
    assert (cfg.mask_epochs, cfg.generator_epochs, cfg.norm_bound) == (20, 30, 0.3)
    # BTI-DBF's generator as the code: the 4-level U-Net of width 32, pre-trained 50 epochs, soft bound
    assert (cfg.generator, cfg.bound, cfg.pretrain_epochs, cfg.width) == ("unet", "soft", 50, 32)
    assert isinstance(cfg, InversionConfig) and PAM.version == "2"


def test_generator_options_reach_the_inversion():
    # 30x30 images: the U-Net (the default) refuses them before any training, the small generator takes them
    model = tiny(image_size=30)
    reserve = ImageSet(torch.randint(0, 256, (40, 3, 30, 30), generator=torch.Generator().manual_seed(0),
                                     dtype=torch.uint8), torch.arange(40) % 10, CLASSES)
    quick = dict(rounds=1, epochs=1, mask_epochs=1, generator_epochs=1, generator_width=4, batch_size=20)
    with pytest.raises(HarnessError, match="generator: small"):
        PAM(**quick).purify(model, context(model, reserve))
    out = PAM(**quick, **SMALL).purify(model, context(model, reserve)).model
    assert out(torch.rand(2, 3, 30, 30)).shape == (2, 10)
