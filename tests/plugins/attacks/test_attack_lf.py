"""LF's mechanism: the pattern lives in the low-frequency DFT window and the L_inf budget, pushes a surrogate to
the target, is added and clipped; state round-trip and determinism of prepare."""

from __future__ import annotations

import pytest
import torch

from backdoor_harness.contracts import PrepareContext
from backdoor_harness.data import ImageSet
from backdoor_harness.errors import HarnessError
from backdoor_harness.plugins.attacks.lf import LF, lowpass, lowpass_mask


def dataset(per_class=40, classes=4, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = per_class * classes
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                    torch.arange(n) % classes, [str(i) for i in range(classes)])


def tiny_model(classes=4, size=12):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * size * size, classes)).eval()
    with torch.no_grad():
        model[-1].weight.mul_(4)  # a confident surrogate, so that 30 steps visibly move its decisions
    return model


CFG = dict(freq_window=2, eps=20.0, num_images=100, iterations=30, step_size=4.0, batch_size=50, target=1)


def prepared(data, seed=0, **cfg):
    attack = LF(**{**CFG, **cfg})
    model = tiny_model(data.num_classes, data.images.shape[-1])
    attack.prepare(PrepareContext(train=data, device=torch.device("cpu"),
                                  generator=torch.Generator().manual_seed(seed), seed=seed, fit=None,
                                  clean_model=model))
    return attack, model


def test_lowpass_window_by_hand():
    m = lowpass_mask(8, 8, 1)
    # signed indices of an 8-point DFT: 0 1 2 3 -4 -3 -2 -1; radius 1 keeps 0, 1, -1 in each axis
    keep = [0, 1, 7]
    assert m.sum() == 9 and all(m[i, j] for i in keep for j in keep)
    # a constant and a one-period cosine pass, a 3-period cosine is removed
    j = torch.arange(8, dtype=torch.float64)
    low = torch.cos(2 * torch.pi * j / 8).expand(8, 8) + 2
    high = torch.cos(2 * torch.pi * 3 * j / 8).expand(8, 8)
    assert torch.allclose(lowpass(low, 1), low) and torch.allclose(lowpass(high, 1), torch.zeros(8, 8, dtype=torch.float64), atol=1e-12)


def test_pattern_is_low_frequency_within_budget_and_pushes_to_target():
    data = dataset()
    attack, model = prepared(data)
    p = attack.pattern
    assert p.shape == (3, 12, 12) and p.dtype == torch.float32
    spec = torch.fft.fft2(p.double()).abs()
    outside = ~lowpass_mask(12, 12, 2)
    assert spec[:, outside].max() < 1e-3 * spec.max()  # no energy outside the window
    assert spec[:, ~outside].max() > 1.0
    assert p.abs().max() <= 20.0 + 1e-4 and p.abs().max() > 10  # within the budget, and used
    # it pushes the surrogate towards the target: lower target loss than clean images, and than the opposite pattern
    others = data.images[data.labels != 1]
    t = torch.ones(len(others), dtype=torch.int64)
    with torch.no_grad():
        def ce(x):
            return float(torch.nn.functional.cross_entropy(model(x.float() / 255), t))
        clean, pushed, opposite = ce(others), ce(attack.apply_trigger(others)), ce((others - p).clamp(0, 255))
    assert pushed < clean - 0.05 and opposite > clean


def test_apply_trigger_is_additive_rounded_and_clipped():
    attack = LF()
    pattern = torch.zeros(3, 4, 4)
    pattern[0] = 10.4
    pattern[1] = -20.6
    pattern[2, 0, 0] = 300.0
    attack.load_state_dict({"pattern": pattern})
    x = torch.tensor([5, 100, 250], dtype=torch.uint8).view(3, 1, 1).expand(3, 4, 4).unsqueeze(0).clone()
    keep = x.clone()
    out = attack.apply_trigger(x)
    assert torch.equal(x, keep) and out.dtype == torch.uint8
    assert (out[0, 0] == 15).all()  # 5 + 10.4 -> 15
    assert (out[0, 1] == 79).all()  # 100 - 20.6 = 79.4 -> 79
    assert out[0, 2, 0, 0] == 255 and (out[0, 2].flatten()[1:] == 250).all()  # clipped
    low = attack.apply_trigger(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    assert (low[0, 1] == 0).all()  # clipped below


def test_state_round_trip_and_determinism():
    data = dataset()
    attack, _ = prepared(data, seed=3, iterations=5)
    fresh = LF(**CFG)
    fresh.load_state_dict(attack.state_dict())
    a = attack.poison(data, torch.Generator().manual_seed(0))
    b = fresh.poison(data, torch.Generator().manual_seed(0))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert len(a.poison_indices) == round(0.1 * 160) and (a.labels[a.poison_indices] == 1).all()
    again, _ = prepared(data, seed=3, iterations=5)
    other, _ = prepared(data, seed=4, iterations=5)
    assert torch.equal(again.pattern, attack.pattern)
    assert not torch.equal(other.pattern, attack.pattern)


def test_window_must_be_low_pass_and_pattern_needed():
    with pytest.raises(HarnessError, match="not a low-pass window"):
        prepared(dataset(size=8), freq_window=4)
    with pytest.raises(HarnessError, match="missing"):
        LF().apply_trigger(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
