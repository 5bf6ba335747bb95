"""SSBA's mechanism: a bounded, sample-specific residual from a trained encoder whose code a decoder reads back;
deterministic prepare, state round-trip."""

from __future__ import annotations

import pytest
import torch

from backdoor_harness.contracts import PrepareContext
from backdoor_harness.data import ImageSet
from backdoor_harness.errors import HarnessError
from backdoor_harness.plugins.attacks.ssba import SSBA

SMALL = dict(code_bits=8, width=8, code_channels=8, residual_scale=0.1, batch_size=16, lr=3e-3, l2_weight=0.0)


def dataset(n=64, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                    torch.arange(n) % 4, list("abcd"))


def prepared(seed=0, **cfg):
    attack = SSBA(**{**SMALL, **cfg})
    attack.prepare(PrepareContext(train=dataset(), device=torch.device("cpu"),
                                  generator=torch.Generator().manual_seed(seed), seed=seed, fit=None))
    return attack


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is many times faster than two on a shared CPU
    try:
        return prepared(epochs=30)
    finally:
        torch.set_num_threads(threads)


def test_residual_is_bounded_sample_specific_and_the_input_is_kept(trained):
    x = dataset(32, seed=1).images
    keep = x.clone()
    y = trained.apply_trigger(x)
    assert torch.equal(x, keep) and y.dtype == torch.uint8 and y.shape == x.shape
    d = y.int() - x.int()
    assert d.abs().max() <= round(0.1 * 255)  # |x' - x| <= residual_scale (rounded) everywhere
    assert d.abs().float().mean() > 2  # it does change the image
    # sample-specific: the encoder's (unclipped) residuals of two images differ (one fixed pattern would give
    # exactly 0). Most of the residual saturates at +-residual_scale, so the difference is a fraction of a grey
    # level on average: 0.34-0.64 with torch 2.14.1; the bound sits well above float noise and below that.
    with torch.no_grad():
        res = 255 * trained.residual(x.float() / 255, trained.code().expand(len(x), -1))
    assert ((res[0] - res[1:]).abs().mean((1, 2, 3)) > 0.1).all()
    # the exact formula: clip(round(x + 255 * scale * tanh(E(x, code))))
    with torch.no_grad():
        r = trained.residual(x.float() / 255, trained.code().expand(len(x), -1))
    assert torch.equal(y, (x.float() + 255 * r).round().clamp(0, 255).to(torch.uint8))
    assert torch.equal(trained.apply_trigger(x), y)  # deterministic


def test_decoder_reads_the_code_better_than_chance(trained):
    x = dataset(64, seed=2).images
    code = trained.code()
    acc = (trained.decode(trained.apply_trigger(x)) == code).float().mean()
    # and with random codes (what it was trained on): well above 0.5 bit accuracy
    bits = torch.randint(0, 2, (64, 8), generator=torch.Generator().manual_seed(3)).float()
    with torch.no_grad():
        enc = (x.float() + 255 * trained.residual(x.float() / 255, bits)).round().clamp(0, 255).to(torch.uint8)
    rand_acc = (trained.decode(enc) == bits).float().mean()
    print(f"fixed-code bit acc {acc:.3f}, random-code bit acc {rand_acc:.3f}")
    assert rand_acc > 0.56  # 512 bits: chance is 0.5 +- 0.022
    # the fixed code's bit accuracy is not asserted: with 8 bits and one code it swings with the seed at this scale


def test_prepare_is_deterministic_for_a_seed_and_the_state_round_trips(trained):
    a, b, c = prepared(epochs=1), prepared(epochs=1), prepared(seed=1, epochs=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if k.startswith("encoder."))
    assert "code" in sa and any(k.startswith("encoder.") for k in sa) and any(k.startswith("decoder.") for k in sa)
    x = dataset(16, seed=4).images
    fresh = SSBA(**SMALL, epochs=30)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.apply_trigger(x), trained.apply_trigger(x))
    with pytest.raises(HarnessError):
        SSBA(**SMALL).apply_trigger(x)  # no encoder yet
    with pytest.raises(HarnessError):
        SSBA(**{**SMALL, "code_seed": 5}).load_state_dict(trained.state_dict())  # another code


def test_poisoning_is_all_to_one_at_the_rate(trained):
    data = dataset(40, seed=5)
    p = trained.poison(data, torch.Generator().manual_seed(0))
    idx = p.poison_indices
    assert len(idx) == 4 and (p.labels[idx] == 0).all()
    if p.stamp == "before_augment":
        assert torch.equal(p.images[idx], trained.apply_trigger(data.images[idx]))
