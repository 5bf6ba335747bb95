"""SIG's mechanism: the sinusoid's exact amplitude and row profile, clean-label selection, the small-class warning."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from backdoor_harness.data import ImageSet
from backdoor_harness.plugins.attacks.sig import SIG


def dataset(per_class=100, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = per_class * classes
    return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                    torch.arange(n) % classes, [str(i) for i in range(classes)])


def test_the_added_signal_is_a_horizontal_sinusoid_of_amplitude_delta():
    x = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)  # 100 +- 40 never clips
    keep = x.clone()
    out = SIG().apply_trigger(x, train=True)
    assert torch.equal(x, keep) and out.dtype == torch.uint8
    diff = out.int() - x.int()
    # the same profile on every row and channel, varying along the columns only
    assert (diff == diff[:1, :1, :1, :]).all()
    row = diff[0, 0, 0]
    expected = [round(40 * math.sin(2 * math.pi * j * 6 / 32)) for j in range(32)]
    assert row.tolist() == expected
    # by hand: column 0 is 0, column 1 is 40 sin(3 pi / 8) = 36.96, column 4 is a trough, column 12 a crest
    assert row[0] == 0 and row[1] == 37 and row[4] == -40 and row[12] == 40
    assert diff.abs().max() == 40


def test_amplitude_on_natural_range_pixels_and_clipping():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    out = SIG().apply_trigger(x)
    v = torch.tensor([40 * math.sin(2 * math.pi * j * 6 / 32) for j in range(32)])
    raw = x.float() + v
    free = (raw >= 0) & (raw <= 255)
    diff = out.float() - x.float()
    assert torch.equal(diff[free], v.expand_as(raw)[free].round())
    assert diff[free].abs().max() == 40
    assert (out[raw < 0] == 0).all() and (out[raw > 255] == 255).all()


def test_test_delta_and_frequency():
    attack = SIG(delta=20, test_delta=30, f=2)
    x = torch.full((1, 3, 8, 16), 128, dtype=torch.uint8)
    train = attack.apply_trigger(x, train=True).int() - 128
    test = attack.apply_trigger(x, train=False).int() - 128
    # f = 2 over 16 columns: crests at columns 2 and 10, troughs at 6 and 14
    assert train[0, 0, 0, [2, 6, 10, 14]].tolist() == [20, -20, 20, -20]
    assert test[0, 0, 0, [2, 6, 10, 14]].tolist() == [30, -30, 30, -30]


def test_clean_label_poisons_only_the_target_class_and_keeps_labels():
    data = dataset()
    attack = SIG(poison_rate=0.05, target=3)
    p = attack.poison(data, torch.Generator().manual_seed(0))
    idx = p.poison_indices
    assert len(idx) == 50  # round(0.05 * 1000), from the 100 images of class 3
    assert (data.labels[idx] == 3).all()
    assert torch.equal(p.labels, data.labels)  # no label is flipped
    assert torch.equal(p.images[idx], attack.apply_trigger(data.images[idx], train=True))
    assert torch.equal(p.images[~p.poison_mask], data.images[~p.poison_mask])
    again = attack.poison(data, torch.Generator().manual_seed(0)).poison_mask
    other = attack.poison(data, torch.Generator().manual_seed(1)).poison_mask
    assert torch.equal(again, p.poison_mask) and not torch.equal(other, p.poison_mask)


def test_backdoorbench_rate_is_the_whole_target_class():
    data = dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rate 0.1 of 1000 = 100 = exactly class 0: no warning
        idx = SIG().select_poison(data.labels, torch.Generator().manual_seed(0))
    assert sorted(idx.tolist()) == (data.labels == 0).nonzero().flatten().tolist()


def test_too_small_target_class_poisons_all_of_it_and_warns():
    data = dataset()
    with pytest.warns(UserWarning, match=r"has only 100.*poison rate reached: 0\.1000"):
        idx = SIG(poison_rate=0.2).select_poison(data.labels, torch.Generator().manual_seed(0))
    assert sorted(idx.tolist()) == (data.labels == 0).nonzero().flatten().tolist()


def test_test_set_excludes_the_target_class():
    data = dataset(per_class=5)
    test = SIG().poison_test(data)
    assert len(test) == 45 and (test.meta["true_labels"] != 0).all() and (test.labels == 0).all()

