"""WaNet's mechanism: the warping field is a small displacement (bound derived in the module docstring),
bilinear warping of a linear ramp by hand, determinism for the seed, and the batch's backdoor/noise samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backdoor_harness.contracts import StepInfo
from backdoor_harness.plugins.attacks.wanet import BICUBIC_GAIN, WaNet, batch_count


def test_the_grid_is_a_small_displacement():
    attack = WaNet()  # k 4, s 0.5
    p = attack.control_grid()
    assert p.shape == (1, 2, 4, 4) and torch.isclose(p.abs().mean(), torch.tensor(1.0))
    assert p.abs().max() <= 2 * 4 ** 2  # a mean of 32 absolute values is at least the largest / 32
    h = w = 32
    disp = attack.grid(h, w) - attack.identity_grid(h, w)
    bound = 0.5 / h * BICUBIC_GAIN ** 2 * float(p.abs().max())
    assert 0 < disp.abs().max() <= bound + 1e-6
    assert bound <= 0.5 / h * BICUBIC_GAIN ** 2 * 2 * 4 ** 2  # the seed-free bound
    pixels = disp.abs().max() * (h - 1) / 2  # one normalized unit is (H - 1) / 2 pixels
    assert 0.05 < pixels < 1.0
    # the bicubic gain bound is attained-or-respected: interpolate a +-1 checkerboard of control points
    board = (torch.tensor([[1.0, -1.0] * 2, [-1.0, 1.0] * 2] * 2))[None, None]
    up = F.interpolate(board, size=(32, 32), mode="bicubic", align_corners=True)
    assert up.abs().max() <= BICUBIC_GAIN ** 2 + 1e-6


def test_warping_a_linear_ramp_samples_it_at_the_grid_points():
    # bilinear interpolation of a linear image is exact: x'(i, j) = 2 * col(i, j) + 3 * row(i, j)
    i, j = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    img = (2 * j + 3 * i).to(torch.uint8).expand(2, 3, 32, 32).contiguous()
    keep = img.clone()
    attack = WaNet()
    out = attack.apply_trigger(img)
    assert torch.equal(img, keep) and out.dtype == torch.uint8
    g = attack.grid(32, 32)[0]
    col, row = (g[..., 0] + 1) / 2 * 31, (g[..., 1] + 1) / 2 * 31
    expected = (2 * col + 3 * row)
    assert ((out[0, 0].float() - expected).abs() <= 0.5 + 1e-3).all()
    # and the image changes only slightly: at most (2 + 3) grey levels per pixel of displacement, plus rounding
    shift = (attack.grid(32, 32) - attack.identity_grid(32, 32)).abs().max() * 31 / 2
    diff = (out.float() - img.float()).abs()
    assert 0 < diff.max() <= 5 * shift + 0.5


def test_the_warp_is_deterministic_for_the_seed():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    a, b, c = WaNet(), WaNet(), WaNet(pattern_seed=1)
    assert torch.equal(a.grid(32, 32), b.grid(32, 32))
    assert torch.equal(a.apply_trigger(x), b.apply_trigger(x))
    assert torch.equal(a.apply_trigger(x, train=True), a.apply_trigger(x, train=False))
    assert not torch.equal(a.grid(32, 32), c.grid(32, 32))
    assert not torch.equal(a.apply_trigger(x), c.apply_trigger(x))
    # a vanishing warp is the identity (align_corners=True maps the grid onto the pixel centres)
    assert torch.equal(WaNet(s=1e-9).apply_trigger(x), x)


def test_backdoor_and_noise_samples_of_a_batch():
    g = torch.Generator().manual_seed(1)
    u8 = torch.randint(0, 256, (128, 3, 32, 32), generator=g, dtype=torch.uint8)
    x, y = u8.float() / 255, torch.randint(1, 10, (128,), generator=g)
    attack = WaNet()  # rate 0.1, cross_ratio 2
    xp, yp, nb, nc = attack.poison_batch(x, y, torch.Generator().manual_seed(0), 10)
    assert nb == 13 and nc == 26  # round(12.8), round(2 * 13)
    assert (yp[:nb] == 0).all()
    assert torch.equal(yp[nb:], y[nb:])  # noise samples (and clean ones) keep their true labels
    fixed = attack.warp(x, attack.grid(32, 32))
    assert torch.allclose(xp[:nb], fixed[:nb], atol=1e-6)
    assert torch.equal(xp[nb + nc:], x[nb + nc:]) and torch.equal(x, u8.float() / 255)
    # noise samples are warped, but not with the fixed grid, and each with its own noise
    noise_part = xp[nb:nb + nc]
    assert (noise_part - fixed[nb:nb + nc]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    assert (noise_part - x[nb:nb + nc]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    # still a small warp: on a smooth ramp the noise moves each sample point by at most 1/H more
    ramp = torch.linspace(0, 1, 32).expand(128, 3, 32, 32).contiguous()
    rp, _, _, _ = attack.poison_batch(ramp, y, torch.Generator().manual_seed(0), 10)
    step = 1 / 31
    max_shift = ((attack.grid(32, 32) - attack.identity_grid(32, 32)).abs().max() + 1 / 32) * 31 / 2
    assert (rp - ramp).abs().max() <= step * max_shift + 1e-5


def test_training_loss_and_counts():
    g = torch.Generator().manual_seed(0)
    assert batch_count(0.1, 104, g) == 10
    draws = [batch_count(0.001, 128, g) for _ in range(2000)]
    assert set(draws) <= {0, 1} and 0.08 < sum(draws) / 2000 < 0.18
    x = torch.rand(32, 3, 16, 16, generator=g)
    y = torch.randint(1, 10, (32,), generator=g)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    attack = WaNet(poison_rate=0.25, cross_ratio=1)
    loss = attack.training_loss(model, x, y, StepInfo(0, 0, 10, torch.Generator().manual_seed(3)))
    xp, yp, nb, nc = attack.poison_batch(x, y, torch.Generator().manual_seed(3), 10)
    assert nb == 8 and nc == 8
    assert torch.allclose(loss, F.cross_entropy(model(xp), yp))
