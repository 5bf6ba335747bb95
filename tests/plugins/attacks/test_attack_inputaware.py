"""Input-Aware Dynamic Backdoor's mechanism: the blend x + m(x)(g(x) - x) by hand, masks in [0, 1] and pushed
towards the density, input-specific triggers, cross samples at their true labels, G trained through the
trainer's backward, state round-trip and determinism for generator_seed. Tiny generators and 16x16 images."""

from __future__ import annotations

import warnings

import pytest
import torch

from backdoor_harness.contracts import StepInfo
from backdoor_harness.plugins.attacks.inputaware import InputAware

SMALL = {"width": 2}


@pytest.fixture(autouse=True)
def one_thread():
    """The generators' small convolutions are ~40x slower with 2 threads on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def images(n=8, seed=0, side=16):
    return torch.randint(0, 256, (n, 3, side, side), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def classifier():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))


def train(attack, steps, n=16, epoch=0):
    model = classifier()
    x, y = images(n).float() / 255, torch.arange(n) % 10
    for i in range(steps):
        loss = attack.training_loss(model, x, y, StepInfo(epoch, i, 10, torch.Generator().manual_seed(i)))
        loss.backward()
    return model


def test_the_trigger_is_the_masked_blend_by_hand_and_input_specific():
    attack = InputAware(**SMALL)
    train(attack, 1)
    x = images(2)
    keep = x.clone()
    out = attack.apply_trigger(x)
    assert torch.equal(x, keep) and out.dtype == torch.uint8 and out.shape == x.shape
    xf = x.float() / 255
    with torch.no_grad():
        g = torch.tanh(attack.G(xf)) / 2 + 0.5
        m = torch.tanh(attack.M(xf) * 20 - 10) / 2 + 0.5
    assert g.shape == (2, 3, 16, 16) and m.shape == (2, 1, 16, 16)
    expected = ((xf + m * (g - xf)) * 255).round().clamp(0, 255).to(torch.uint8)
    assert (out.int() - expected.int()).abs().max() <= 1  # float rounding at .5
    # input-aware: the two images get different patterns and masks (the same image gets the same)
    assert not torch.allclose(g[0], g[1]) and not torch.equal(m[0], m[1])
    assert torch.equal(attack.apply_trigger(x[:1]), out[:1])
    assert torch.equal(attack.apply_trigger(x, train=True), out)


def test_the_mask_loss_pushes_the_mask_towards_its_density():
    attack = InputAware(**SMALL, lambda_div=0.0, lr_M=0.05)
    x = images(16).float() / 255
    attack._ensure(torch.device("cpu"))
    with torch.no_grad():
        before = attack.mask(attack.M, x).mean()
    for _ in range(14):
        attack.train_mask_step(x)
    with torch.no_grad():
        last = attack.mask(attack.M.train(), x)  # the mask the 15th step scores (M in train mode, as the step sets)
    stats = attack.train_mask_step(x)
    with torch.no_grad():
        after = attack.mask(attack.M, x)
    assert before > 0.1 and after.mean() < before / 2  # towards mask_density 0.032
    # the reported norm term: the mask's mean excess over the density, before the step
    assert stats["norm"] == pytest.approx(float((last - attack.config.mask_density).clamp(min=0).mean()), rel=1e-5)
    assert stats["norm"] > 0


def test_cross_samples_keep_true_labels_and_carry_another_images_trigger():
    attack = InputAware(**SMALL, poison_rate=0.25, target=0)
    train(attack, 1)
    x, y = images(16, seed=3).float() / 255, torch.arange(16) % 10
    out, labels, div, nb, nc, partners = attack.poison_batch(x, y, torch.Generator().manual_seed(5), 10)
    assert (nb, nc) == (4, 4) and len(partners) == 4
    assert (labels[:nb] == 0).all() and torch.equal(labels[nb:], y[nb:])
    assert ((partners >= nb + nc) & (partners < 16)).all()  # another (clean) image of the batch
    with torch.no_grad():
        g = torch.tanh(attack.G(x)) / 2 + 0.5
        m = torch.tanh(attack.M(x) * 20 - 10) / 2 + 0.5
        assert torch.allclose(out[:nb], x[:nb] + m[:nb] * (g[:nb] - x[:nb]), atol=1e-6)
        src = partners[:nc]
        assert torch.allclose(out[nb:nb + nc], x[nb:nb + nc] + m[src] * (g[src] - x[nb:nb + nc]), atol=1e-6)
    assert torch.equal(out[nb + nc:], x[nb + nc:])
    assert div.requires_grad and torch.isfinite(div)
    # round(rate * B) backdoor samples; below one sample per batch, sometimes none
    assert attack.poison_batch(x, y, torch.Generator().manual_seed(0), 10)[3] == 4
    tiny = InputAware(**SMALL, poison_rate=0.01)
    tiny._ensure(torch.device("cpu"))
    counts = {tiny.poison_batch(x, y, torch.Generator().manual_seed(s), 10)[3] for s in range(20)}
    assert counts == {0, 1}


def test_the_pattern_generator_is_trained_through_the_trainers_backward():
    attack = InputAware(**SMALL, mask_epochs=0)
    model = classifier()
    x, y = images(16).float() / 255, torch.arange(16) % 10
    attack.training_loss(model, x, y, StepInfo(0, 0, 10, torch.Generator().manual_seed(0))).backward()
    g0 = {k: v.clone() for k, v in attack.state_dict().items()}
    assert all(p.grad is not None for p in attack.G.parameters())
    assert all(p.grad is None for p in attack.M.parameters())  # M: no gradient from the classifier's loss
    attack.training_loss(model, x, y, StepInfo(0, 1, 10, torch.Generator().manual_seed(1)))
    g1 = attack.state_dict()
    assert any(not torch.equal(g0[k], g1[k]) for k in g0 if k.startswith("G."))  # stepped at the next call
    assert all(torch.equal(g0[k], g1[k]) for k in g0 if k.startswith("M."))  # mask_epochs 0: M frozen


def test_state_round_trip_gives_identical_triggers():
    attack = InputAware(**SMALL)
    train(attack, 3)
    state = attack.state_dict()
    assert state and all(k.startswith(("G.", "M.")) for k in state)
    fresh = InputAware(**SMALL)
    fresh.load_state_dict(state)
    x = images(4, seed=9)
    assert torch.equal(fresh.apply_trigger(x), attack.apply_trigger(x))
    untrained = InputAware(**SMALL)
    with pytest.warns(UserWarning, match="UNTRAINED"):
        assert not torch.equal(untrained.apply_trigger(x), attack.apply_trigger(x))
    with pytest.raises(RuntimeError, match="does not fit"):
        InputAware(width=3).load_state_dict(state)


def test_determinism_for_generator_seed():
    a, b, c = InputAware(**SMALL), InputAware(**SMALL), InputAware(**SMALL, generator_seed=1)
    for attack in (a, b, c):
        train(attack, 2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    x = images(4, seed=2)
    assert torch.equal(a.apply_trigger(x), b.apply_trigger(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained generators: no warning
        a.apply_trigger(x)
