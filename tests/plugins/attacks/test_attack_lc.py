"""LC's mechanism: PGD within eps on target-class images only, the four-corner pattern, labels kept, state round-trip."""

from __future__ import annotations

import warnings

import pytest
import torch

from backdoor_harness.contracts import PrepareContext
from backdoor_harness.data import ImageSet
from backdoor_harness.errors import HarnessError
from backdoor_harness.plugins.attacks.lc import LC


def dataset(per_class=20, classes=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = per_class * classes
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                    torch.arange(n) % classes, [str(i) for i in range(classes)])


def tiny_model(classes=4, size=8):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * size * size, classes)).eval()


def prepared(data, **cfg):
    attack = LC(**cfg)
    model = tiny_model(data.num_classes, data.images.shape[-1])
    attack.prepare(PrepareContext(train=data, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                                  seed=0, fit=None, clean_model=model))
    return attack, model


def test_the_corner_pattern_pixels_exactly():
    x = torch.full((1, 3, 8, 10), 100, dtype=torch.uint8)
    keep = x.clone()
    out = LC().apply_trigger(x)
    assert torch.equal(x, keep) and out.dtype == torch.uint8
    W, B = 255, 0
    left = [[W, B, B], [B, W, B], [W, B, W]]
    right = [[B, B, W], [B, W, B], [W, B, W]]
    for c in range(3):
        assert out[0, c, :3, :3].tolist() == left and out[0, c, -3:, :3].tolist() == left
        assert out[0, c, :3, -3:].tolist() == right and out[0, c, -3:, -3:].tolist() == right
    mask = torch.ones(8, 10, dtype=torch.bool)
    mask[:3, :3] = mask[-3:, :3] = mask[:3, -3:] = mask[-3:, -3:] = False
    assert (out[..., mask] == 100).all()  # nothing else changes
    # reduced amplitude adds +-amplitude*255 and clips
    half = LC(amplitude=0.2).apply_trigger(x)
    assert half[0, 0, 0, :3].tolist() == [151, 49, 49]


def test_pgd_stays_within_eps_and_attacks_only_the_target_class():
    data = dataset()
    attack, model = prepared(data, target=2, pgd_steps=5)
    idx = attack.adv_index
    assert torch.equal(idx, (data.labels == 2).nonzero().flatten())
    adv = attack.adv_images
    assert adv.dtype == torch.uint8 and adv.shape == (20, 3, 8, 8)
    diff = adv.int() - data.images[idx].int()
    assert diff.abs().max() <= round(16 / 255 * 255) and diff.abs().max() >= 10  # moved, within the box
    # the perturbation raises the loss on the true label (untargeted, against the surrogate)
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert ce(model(adv.float() / 255), data.labels[idx]) > ce(model(data.images[idx].float() / 255),
                                                                   data.labels[idx]) + 0.1


def test_poison_replaces_by_adversarial_then_stamps_and_keeps_labels():
    data = dataset()
    attack, _ = prepared(data, target=1, pgd_steps=3, poison_rate=0.1)
    p = attack.poison(data, torch.Generator().manual_seed(0))
    idx = p.poison_indices
    assert len(idx) == 8 and (data.labels[idx] == 1).all()  # round(0.1 * 80) from the 20 of class 1
    assert torch.equal(p.labels, data.labels)
    row = {int(i): k for k, i in enumerate(attack.adv_index)}
    adv = attack.adv_images[[row[int(i)] for i in idx]]
    assert torch.equal(p.images[idx], attack.apply_trigger(adv))
    assert not torch.equal(p.images[idx], attack.apply_trigger(data.images[idx]))
    assert torch.equal(p.images[~p.poison_mask], data.images[~p.poison_mask])
    # after_augment: the adversarial pixels are in place, the trainer stamps the trigger
    q = LC(target=1, pgd_steps=3, stamp="after_augment")
    q.load_state_dict(attack.state_dict())
    pq = q.poison(data, torch.Generator().manual_seed(0))
    assert torch.equal(pq.images[idx], adv) and torch.equal(pq.stamp_fn(pq.images[idx]), p.images[idx])


def test_small_class_warns_with_the_reached_rate():
    data = dataset()
    attack, _ = prepared(data, pgd_steps=1, poison_rate=0.5)
    with pytest.warns(UserWarning, match="poison rate reached: 0.2500"):
        p = attack.poison(data, torch.Generator().manual_seed(0))
    assert int(p.poison_mask.sum()) == 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attack2, _ = prepared(data, pgd_steps=1, poison_rate=0.25)
        attack2.poison(data, torch.Generator().manual_seed(0))


def test_state_round_trip_and_mismatch():
    data = dataset()
    attack, _ = prepared(data, pgd_steps=3)
    fresh = LC(pgd_steps=3)
    fresh.load_state_dict(attack.state_dict())
    a = attack.poison(data, torch.Generator().manual_seed(4))
    b = fresh.poison(data, torch.Generator().manual_seed(4))
    assert torch.equal(a.images, b.images) and torch.equal(a.poison_mask, b.poison_mask)
    again, _ = prepared(data, pgd_steps=3)
    assert torch.equal(again.adv_images, attack.adv_images)  # deterministic
    with pytest.raises(HarnessError, match="do not fit"):
        fresh.poison(dataset(size=10), torch.Generator())
    with pytest.raises(HarnessError, match="another training set"):
        fresh.poison(dataset(per_class=10), torch.Generator())
    with pytest.raises(HarnessError, match="missing"):
        LC().poison(data, torch.Generator())


def test_poisoned_samples_are_clean_label_adversarial_and_stamped():
    """What the Retuning Attack retunes with (Attack.poisoned_samples): LC's own poisoned training samples."""
    data = dataset()
    attack, _ = prepared(data, target=1, pgd_steps=3, poison_rate=0.1)
    s = attack.poisoned_samples(data, 2, torch.Generator().manual_seed(0))
    assert len(s.labels) == 2 and (data.labels[s.source] == 1).all() and (s.labels == 1).all()
    row = {int(i): k for k, i in enumerate(attack.adv_index)}
    adv = attack.adv_images[[row[int(i)] for i in s.source]]
    assert torch.equal(s.images, attack.apply_trigger(adv))  # the adversarial image, then the trigger
    for clean, poisoned in zip(data.images[s.source], s.images):
        assert not torch.equal(clean, poisoned)
        assert not torch.equal(attack.apply_trigger(clean[None])[0], poisoned)  # not just the trigger
    assert len(attack.poisoned_samples(data, 2, torch.Generator(), flipped_only=True).labels) == 0
    with warnings.catch_warnings():  # the too-small-class warning belongs to poisoning the model, not to this draw
        warnings.simplefilter("error")
        big, _ = prepared(data, target=1, pgd_steps=1, poison_rate=0.5)
        assert len(big.poisoned_samples(data, 100, torch.Generator()).labels) == 20
