"""NC (Neural Cleanse)'s mechanism, tested directly: the anomaly index by hand,
the cost schedule, a planted trigger found as the outlier, unlearning at true labels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backdoor_harness.data import ImageSet
from backdoor_harness.plugins.defenses.nc import (NC, ReversedTrigger, anomaly_index, flagged_classes,
                                                   reverse_engineer, stamp, unlearning_set)
from backdoor_harness.train import Recipe, fit, predict

from helpers import CLASSES, CPU, check_contract, context, learnable_set, noise_set, same, tiny


def white_patch(images):
    """BadNets' 3x3 white square in the bottom-right corner."""
    out = images.clone()
    out[..., -3:, -3:] = 255
    return out


# --------------------------------------------------------------------------
# Outlier detection: a pure function, by hand
# --------------------------------------------------------------------------


def test_anomaly_index_by_hand():
    l1 = [10, 100, 102, 98, 110, 95, 100, 101, 99, 97]
    # sorted: 10 95 97 98 99 | 100 100 101 102 110 -> median (99 + 100) / 2 = 99.5
    # |L1 - 99.5|: 89.5 .5 2.5 1.5 10.5 4.5 .5 1.5 .5 2.5 -> sorted .5 .5 .5 1.5 1.5 | 2.5 2.5 4.5 10.5 89.5
    # -> median 2.0, MAD = 1.4826 * 2.0
    mad = 1.4826 * 2.0
    expected = [abs(v - 99.5) / mad for v in l1]
    index = anomaly_index(l1)
    assert index.dtype == torch.float64
    assert torch.allclose(index, torch.tensor(expected, dtype=torch.float64))
    assert index[0] == pytest.approx(89.5 / 2.9652)
    # class 4 (110) is as anomalous (3.54 > 2) but on the large side: only small masks are flagged
    assert index[4] > 2
    assert flagged_classes(l1) == [0]
    # torch.median would take the lower middle (99), not the paper's median
    assert anomaly_index(l1)[8] == 0.5 / mad


def test_flagged_classes_are_ordered_by_l1_and_mad_zero_is_handled():
    l1 = [2, 1, 50, 50, 51, 49, 50, 52, 48, 50]
    # median 50; deviations 48 49 0 0 1 1 0 2 2 0 -> median 1, MAD 1.4826
    assert flagged_classes(l1) == [1, 0]  # smallest L1 first
    assert flagged_classes(l1, threshold=50 / 1.4826) == []  # 49 / 1.4826 = 33.05 is not > 33.7
    # all but one equal: MAD = 0, the odd one out is infinitely anomalous
    index = anomaly_index([5.0, 5.0, 5.0, 1.0])
    assert index.tolist() == [0.0, 0.0, 0.0, math.inf]
    assert flagged_classes([5.0, 5.0, 5.0, 1.0]) == [3]
    assert flagged_classes([5.0, 5.0, 5.0, 9.0]) == []  # large side


# --------------------------------------------------------------------------
# Reverse engineering
# --------------------------------------------------------------------------


class Constant(nn.Module):
    """Predicts ``label`` on every image (the input enters with weight 0)."""

    def __init__(self, label):
        super().__init__()
        self.label = label

    def forward(self, x):
        return F.one_hot(torch.full((len(x),), self.label), 10).float() * 10 + 0 * x.mean((1, 2, 3))[:, None]


def test_cost_schedule_and_fallback():
    reserve = noise_set(40)
    cfg = NC.Config(nc_epochs=12, batch_size=20, patience=5, init_cost=1e-3, cost_multiplier=2.0)
    # every stamped image reaches class 3: lambda doubles after each 5 successful epochs
    hit = reverse_engineer(Constant(3), reserve, 3, cfg, torch.Generator().manual_seed(0), CPU)
    assert hit.costs == pytest.approx([1e-3] * 5 + [2e-3] * 5 + [4e-3] * 2)
    assert hit.reached and hit.epochs == 12
    # only the L1 term acts: the best mask (the smallest epoch-mean L1) is below the start, 0.88 per pixel
    assert hit.l1 < 0.88 * 32 * 32
    assert hit.mask.shape == (1, 32, 32) and hit.pattern.shape == (3, 32, 32)
    # never reaches class 4: lambda is divided by 2 ** 1.5 after each 5 failed epochs; the first epoch's mask stays
    miss = reverse_engineer(Constant(3), reserve, 4, cfg, torch.Generator().manual_seed(0), CPU)
    assert miss.costs == pytest.approx([1e-3] * 5 + [1e-3 / 2 ** 1.5] * 5 + [1e-3 / 8] * 2)
    assert not miss.reached
    one = reverse_engineer(Constant(3), reserve, 4, NC.Config(nc_epochs=1, batch_size=20),
                           torch.Generator().manual_seed(0), CPU)
    assert torch.equal(miss.mask, one.mask)


class Wired(nn.Module):
    """A hard-wired classifier: the class whose colour is nearest the image's mean
    colour, plus a backdoor: a bright 3x3 bottom-right patch adds to class 0's logit."""

    def __init__(self):
        super().__init__()
        self.colours = nn.Parameter(torch.rand(10, 3, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        logits = -40 * (x.mean((2, 3))[:, None, :] - self.colours).pow(2).sum(-1)
        patch = x[:, :, -3:, -3:].mean((1, 2, 3))
        return logits + F.one_hot(torch.zeros(len(x), dtype=torch.int64), 10) * (300 * F.relu(patch - 0.8))[:, None]


def test_planted_trigger_is_the_l1_outlier():
    g = torch.Generator().manual_seed(1)
    x = 0.7 * torch.rand(128, 3, 1, 1, generator=g) + 0.3 * torch.rand(128, 3, 32, 32, generator=g)
    reserve = ImageSet((x * 255).round().to(torch.uint8), torch.arange(128) % 10, CLASSES)
    model = Wired().eval()
    defense = NC(nc_epochs=20, batch_size=32)
    triggers, report = defense.scan(model, context(model, reserve, family="tiny_cnn"))  # Wired declares no family
    l1 = torch.tensor(report["l1"])
    assert int(l1.argmin()) == 0
    assert report["anomaly_index"][0] > 2
    assert report["flagged"][0] == 0
    assert report["reached"][0]
    assert l1[0] < 30 < l1[1:].min()  # about the 9 pixels of the patch, the others need large masks
    mask = triggers[0].mask[0]
    assert mask[-3:, -3:].sum() > 0.6 * mask.sum()  # it sits on the patch
    assert triggers[0].pattern[:, -3:, -3:].mean() > 0.8  # and is bright there
    assert report["median"] == pytest.approx(float(l1.median() + l1.sort().values[5]) / 2)


# --------------------------------------------------------------------------
# Unlearning
# --------------------------------------------------------------------------


def test_unlearning_set_stamps_a_fifth_at_true_labels():
    reserve = noise_set(50)
    mask = torch.zeros(1, 32, 32)
    mask[0, :4, :4] = 1.0
    mask[0, 4, 4] = 0.5
    pattern = torch.full((3, 32, 32), 1.0)
    trig = ReversedTrigger(7, mask, pattern, True, 1, [1e-3])
    other = ReversedTrigger(2, torch.ones(1, 32, 32), torch.zeros(3, 32, 32), True, 1, [1e-3])
    data = unlearning_set(reserve, [trig, other], 0.2, torch.Generator().manual_seed(0))
    assert len(data) == 40 + 10 + 10  # 80% clean, then the other 20% once per trigger
    clean, first, second = data.images[:40], data.images[40:50], data.images[50:]
    # the same draw, by hand
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    keep, chosen = perm[:40], perm[40:]
    assert torch.equal(clean, reserve.images[keep])
    # TRUE labels: never the flagged classes' targets
    assert torch.equal(data.labels[:40], reserve.labels[keep])
    assert torch.equal(data.labels[40:50], reserve.labels[chosen])
    assert torch.equal(data.labels[50:], reserve.labels[chosen])
    # the stamp, by hand: inside the mask the pattern, half-way at (4, 4), the image elsewhere
    src = reserve.images[chosen]
    assert (first[..., :4, :4] == 255).all()
    half = 0.5 * src[..., 4, 4].float() + 0.5 * 255
    assert (first[..., 4, 4].float() - half).abs().max() <= 0.5 + 1e-3  # rounded
    assert torch.equal(first[..., 5:, :], src[..., 5:, :])
    assert (second == 0).all()  # a full mask of black
    assert torch.equal(stamp(src, mask, pattern), first)


def test_purify_finds_and_unlearns_a_trained_backdoor():
    # a tiny CNN with a BadNets backdoor to class 0 (20% poisoned), on 16x16 images to keep it fast
    model = tiny(image_size=16)
    train = learnable_set(1000, 1, size=16)
    images, labels = train.images.clone(), train.labels.clone()
    images[:200], labels[:200] = white_patch(images[:200]), 0
    fit(model, ImageSet(images, labels, CLASSES), Recipe(epochs=15, lr=0.05, augment=False), device=CPU,
        generator=torch.Generator().manual_seed(0), progress=False)
    test = learnable_set(300, 3, size=16)
    victims = test.images[test.labels != 0]

    def asr(m):
        return float((predict(m, white_patch(victims), CPU) == 0).float().mean())

    def acc(m):
        return float((predict(m, test.images, CPU) == test.labels).float().mean())

    assert asr(model) > 0.9 and acc(model) > 0.9
    reserve = learnable_set(100, 2, size=16)
    seen = []

    def recording_fit(m, data, recipe, **kw):
        seen.append((data, recipe))
        return fit(m, data, recipe, **{"progress": False, **kw})

    defense = NC(nc_epochs=15, batch_size=16, epochs=3)
    scans = []
    real_scan = defense.scan

    def recording_scan(m, c):  # keeps the reversed triggers, which the report does not hold
        scans.append(real_scan(m, c))
        return scans[-1]

    defense.scan = recording_scan
    out, report = defense.purify(model, context(model, reserve, fit_fn=recording_fit))
    (triggers, scanned), = scans
    assert scanned is report  # the scan's report, with "unlearned" set
    l1 = torch.tensor(report["l1"])
    assert report["flagged"][0] == 0 and report["unlearned"]
    assert int(l1.argmin()) == 0 and report["anomaly_index"][0] > 2
    assert l1[0] < 20  # about the 9 pixels of the planted patch
    # unlearning data: 80% of the reserve clean, 20% stamped per flagged class, at their true labels
    (data, recipe), = seen
    blocks = len(report["flagged"])
    assert len(data) == 80 + 20 * blocks and (recipe.epochs, recipe.lr) == (3, 0.01)
    assert sorted(data.labels[:100].tolist()) == sorted(reserve.labels.tolist())
    assert all(torch.equal(data.labels[80:100], data.labels[80 + 20 * b:100 + 20 * b]) for b in range(blocks))
    # each stamped image is a reserve image under class 0's reversed trigger, with that image's label
    candidates = triggers[0].apply(reserve.images)
    for img, label in zip(data.images[80:100], data.labels[80:100]):
        match = [j for j in range(100) if torch.equal(candidates[j], img)]
        assert match and int(reserve.labels[match[0]]) == int(label)
    assert asr(out) < 0.2 and acc(out) > 0.9
    assert asr(model) > 0.9  # the given model is untouched


def test_nothing_flagged_returns_an_unchanged_copy():
    model = tiny()

    def no_fit(*a, **k):
        raise AssertionError("nothing was flagged: no fine-tuning")

    defense = NC(nc_epochs=1, batch_size=50, anomaly_threshold=1e9)
    out, report = defense.purify(model, context(model, noise_set(100), fit_fn=no_fit))
    assert out is not model
    assert all(torch.equal(v, out.state_dict()[k]) for k, v in model.state_dict().items())
    assert report["flagged"] == [] and not report["unlearned"]
    assert len(report["l1"]) == len(report["anomaly_index"]) == 10


# --------------------------------------------------------------------------
# Contract and defaults
# --------------------------------------------------------------------------


def test_contract_on_the_tiny_model():
    model = tiny()
    # a threshold of 0.5 so that the random model's scan flags something and the unlearning runs
    defense = NC(nc_epochs=2, epochs=1, batch_size=50, anomaly_threshold=0.5)
    reports = []

    def run(seed):
        out, report = defense.purify(model, context(model, noise_set(100), seed))
        reports.append(report)
        return out

    out = check_contract(model, defense, run)
    assert reports[0]["unlearned"] and reports[0] == reports[1]  # the same scan for the same seed
    assert not same(out, model)  # it did tune
    for bad in ({"cost_multiplier": 1.0}, {"attack_success_threshold": 1.5}, {"unlearning_fraction": -0.1},
                {"nc_epochs": 0}, {"unknown": 1}):
        with pytest.raises(ValueError):
            NC.Config(**bad)


def test_defaults_follow_backdoorbench_and_the_paper():
    cfg = NC.Config()
    assert (cfg.nc_epochs, cfg.batch_size, cfg.mask_lr, cfg.init_cost) == (80, 256, 0.1, 1e-3)
    assert (cfg.cost_multiplier, cfg.patience, cfg.attack_success_threshold) == (2.0, 5, 0.99)
    assert (cfg.early_stop, cfg.early_stop_threshold, cfg.early_stop_patience) == (True, 0.99, 25)
    assert (cfg.anomaly_threshold, cfg.unlearning_fraction) == (2.0, 0.2)
    assert (cfg.epochs, cfg.lr, cfg.momentum, cfg.weight_decay) == (100, 0.01, 0.9, 5e-4)
    assert NC().needs == frozenset()  # a trigger-inverting defense: no oracle trigger
