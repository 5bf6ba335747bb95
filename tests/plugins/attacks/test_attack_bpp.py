"""BppAttack's mechanism: the 8 squeezing levels by hand, the per-batch poison and negative counts and labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backdoor_harness.contracts import StepInfo
from backdoor_harness.plugins.attacks.bpp import Bpp, batch_count


def batch(b=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8)
    return u8, u8.float() / 255, torch.randint(1, 10, (b,), generator=g)  # no image of the target class 0


def test_a_ramp_maps_to_exactly_eight_levels():
    ramp = torch.arange(256, dtype=torch.uint8).repeat(3, 1, 1)[None]  # [1, 3, 1, 256]
    keep = ramp.clone()
    out = Bpp().apply_trigger(ramp)
    assert torch.equal(ramp, keep) and out.dtype == torch.uint8
    # levels round(255 k / 7): 0, 36.4, 72.9, 109.3, 145.7, 182.1, 218.6, 255
    assert sorted(set(out.flatten().tolist())) == [0, 36, 73, 109, 146, 182, 219, 255]
    # boundaries half-way between levels, at 255 (k + 1/2) / 7: 18.2, 54.6, 91.1, 127.5, ...
    o = out[0, 0, 0]
    assert o[18] == 0 and o[19] == 36 and o[54] == 36 and o[55] == 73
    assert o[127] == 109 and o[128] == 146 and o[236] == 219 and o[237] == 255
    assert (o.diff() >= 0).all()
    assert torch.equal(Bpp().apply_trigger(out), out)  # squeezing is idempotent
    # two levels: a threshold at 127.5
    two = Bpp(squeeze_num=2).apply_trigger(ramp)[0, 0, 0]
    assert (two[:128] == 0).all() and (two[128:] == 255).all()


def test_training_batch_poisons_round_rate_b_and_adds_true_label_negatives():
    u8, x, y = batch(128)
    attack = Bpp()  # rate 0.1, neg_ratio 0.1
    xp, yp, nb, nn = attack.poison_batch(x, y, torch.Generator().manual_seed(0), 10)
    assert nb == 13 and nn == 13  # round(12.8)
    assert (yp[:nb] == 0).all() and torch.equal(yp[nb:], y[nb:])
    squeezed = attack.apply_trigger(u8[:nb]).float() / 255
    assert torch.equal(xp[:nb], squeezed)
    assert torch.equal(xp[nb + nn:], x[nb + nn:])  # the rest is untouched
    assert torch.equal(x, u8.float() / 255)  # the input batch is not modified
    # each negative is x_i + (Q(x_j) - x_j) for another image j of the batch, clamped
    residual = attack.apply_trigger(u8).float() - u8.float()
    for i in range(nb, nb + nn):
        got = xp[i] * 255
        cands = [j for j in range(128) if j != i
                 and torch.allclose(got, (u8[i].float() + residual[j]).clamp(0, 255), atol=1e-3)]
        assert cands, f"negative {i} is not a residual-shifted image"
        assert not torch.allclose(got, attack.apply_trigger(u8[i:i + 1])[0].float(), atol=1e-3)


def test_counts_for_other_batches_and_low_rates():
    g = torch.Generator().manual_seed(0)
    assert batch_count(0.1, 104, g) == 10 and batch_count(0.1, 106, g) == 11  # round(10.4), round(10.6)
    assert batch_count(0.05, 128, g) == 6
    # below one image per batch: one image with probability rate * B
    draws = [batch_count(0.001, 128, g) for _ in range(2000)]
    assert set(draws) <= {0, 1} and 0.08 < sum(draws) / 2000 < 0.18
    _, x, y = batch(128)
    xp, yp, nb, nn = Bpp(poison_rate=0.0).poison_batch(x, y, g, 10)
    assert nb == nn == 0 and torch.equal(xp, x) and torch.equal(yp, y)


def test_training_loss_is_cross_entropy_on_the_poisoned_batch():
    _, x, y = batch(64)
    attack = Bpp(poison_rate=0.25, neg_ratio=0.25)
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3 * 32 * 32, 10)

        def forward(self, inp):
            seen.append(inp)
            return self.lin(inp.flatten(1))

    model = Recorder()
    loss = attack.training_loss(model, x, y, StepInfo(0, 0, 10, torch.Generator().manual_seed(5)))
    xp, yp, nb, nn = attack.poison_batch(x, y, torch.Generator().manual_seed(5), 10)
    assert nb == 16 and nn == 16
    assert torch.equal(seen[0], xp)
    assert torch.allclose(loss, F.cross_entropy(model.lin(xp.flatten(1)), yp))
    loss.backward()
    assert model.lin.weight.grad is not None


def test_the_batch_poisoning_step_is_one_implementation():
    """BppAttack, WaNet and Input-Aware share one batch count and the CE-on-the-poisoned-batch step."""
    from backdoor_harness.plugins.attacks import inputaware, wanet

    assert batch_count is wanet.batch_count is inputaware.batch_count
    assert issubclass(Bpp, wanet.BatchPoisoning) and issubclass(wanet.WaNet, wanet.BatchPoisoning)
    assert Bpp.training_loss is wanet.WaNet.training_loss is wanet.BatchPoisoning.training_loss
    assert Bpp.training_controlled and wanet.WaNet.training_controlled
