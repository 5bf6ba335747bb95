"""Triggers and poisoning: exact pixels, rates, seeds; contract checks over every attack."""

from __future__ import annotations

import pytest
import torch

import backdoor_harness as bh
from backdoor_harness import registry
from backdoor_harness.data import ImageSet


def images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def dataset(n=1000, seed=0):
    return ImageSet(images(n, seed), torch.arange(n) % 10, [str(i) for i in range(10)])


def test_badnets_changes_exactly_the_3x3x3_patch():
    x = images()
    keep = x.clone()
    out = bh.create_attack("badnets").apply_trigger(x)
    assert torch.equal(x, keep), "the input was modified"
    assert out.dtype == torch.uint8
    changed = (out != x).any(0)  # [3, 32, 32]
    assert changed[:, 29:, 29:].all() and changed.sum() == 27
    assert (out[..., 29:, 29:] == 255).all()


ALL2ALL = [n for n in bh.list_attacks() if issubclass(registry.get_class("attack", n).Config, bh.AllToAllConfig)]


def test_all2all_where_the_papers_define_it():
    assert {"badnets", "wanet", "inputaware", "bpp"} <= set(ALL2ALL)
    assert not {"sig", "lc"} & set(ALL2ALL)  # clean-label: the label is the true one by definition


@pytest.mark.parametrize("name", ALL2ALL)
def test_all2all_targets(name):
    attack = bh.create_attack(name, mode="all2all")
    assert attack.target_labels(torch.tensor([0, 3, 9]), 10).tolist() == [1, 4, 0]
    assert attack.test_mask(torch.arange(10), 10).all()  # every image is poisoned at test time
    assert bh.create_attack(name).target_labels(torch.tensor([0, 3, 9]), 10).tolist() == [0, 0, 0]


def test_blended_is_the_stated_convex_combination():
    attack = bh.create_attack("blended", alpha=0.1, test_alpha=0.3)
    x = images()
    t = attack.pattern((3, 32, 32)).float()
    for train, a in ((True, 0.1), (False, 0.3)):
        expected = ((1 - a) * x.float() + a * t).round().clamp(0, 255).to(torch.uint8)
        assert torch.equal(attack.apply_trigger(x, train=train), expected)
    assert torch.equal(attack.pattern((3, 32, 32)), bh.create_attack("blended").pattern((3, 32, 32)))
    assert not torch.equal(attack.pattern((3, 32, 32)),
                           bh.create_attack("blended", pattern_seed=1).pattern((3, 32, 32)))


def test_poisoning_rate_labels_and_seed():
    data = dataset()
    attack = bh.create_attack("badnets", poison_rate=0.07)
    p = attack.poison(data, torch.Generator().manual_seed(0))
    idx = p.poison_indices
    assert len(idx) == 70
    assert (p.labels[idx] == 0).all()
    clean = ~p.poison_mask
    assert torch.equal(p.labels[clean], data.labels[clean])
    # before augmentation: triggers in the pixels of poisoned samples only
    assert (p.images[idx][..., -3:, -3:] == 255).all()
    assert torch.equal(p.images[clean], data.images[clean])
    assert torch.equal(attack.poison(data, torch.Generator().manual_seed(0)).poison_mask, p.poison_mask)
    assert not torch.equal(attack.poison(data, torch.Generator().manual_seed(1)).poison_mask, p.poison_mask)


def test_after_augment_leaves_pixels_and_sets_stamp_fn():
    data = dataset()
    p = bh.create_attack("badnets", stamp="after_augment").poison(data, torch.Generator().manual_seed(0))
    assert torch.equal(p.images, data.images) and p.stamp == "after_augment"
    assert (p.stamp_fn(data.images[:2])[..., -3:, -3:] == 255).all()


def ready(name, data, seed=0):
    """The attack with its resources generated (``prepare``) at the smallest settings, as the prepare job would."""
    from backdoor_harness.contracts import PrepareContext
    from backdoor_harness.models import create_model
    from backdoor_harness.train import fit

    cls = registry.get_class("attack", name)
    small = {k: 1 for k, f in cls.Config.model_fields.items()
             if f.annotation is int and any(k == b or k.endswith("_" + b) for b in BUDGET)}
    attack = bh.create_attack(name, **small)
    if attack.prepares():
        torch.manual_seed(0)
        clean = create_model({"name": "tiny_cnn", "kwargs": {"width": 4}}, 10, 32).eval()
        attack.prepare(PrepareContext(train=data, device=torch.device("cpu"),
                                      generator=torch.Generator().manual_seed(seed), seed=seed,
                                      fit=lambda *a, **k: fit(*a, **{"progress": False, **k}),
                                      clean_model=clean if attack.prepare_needs_clean_model else None))
        fresh = bh.create_attack(name, **small)  # what a later job sees: the state restored from the cache
        fresh.load_state_dict(attack.state_dict())
        attack = fresh
    return attack


BUDGET = ("epochs", "steps", "iterations", "iters")


@pytest.mark.parametrize("name", bh.list_attacks())
def test_attack_contract(name):
    data = dataset(500)
    attack = ready(name, data)
    out = attack.apply_trigger(data.images[:8], train=False)
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out, attack.apply_trigger(data.images[:8], train=False))
    if not attack.training_controlled:
        p = attack.poison(data, torch.Generator().manual_seed(0))
        assert int(p.poison_mask.sum()) == round(attack.config.poison_rate * len(data))
        assert p.images.dtype == torch.uint8 and p.images.shape == data.images.shape
        # deterministic for a seed: the same samples, pixels and labels
        q = attack.poison(data, torch.Generator().manual_seed(0))
        assert torch.equal(p.poison_mask, q.poison_mask) and torch.equal(p.labels, q.labels)
        assert torch.equal(p.images, q.images)
    else:  # its training step poisons the batch itself and returns one loss
        from backdoor_harness.contracts import StepInfo
        from backdoor_harness.models import create_model

        torch.manual_seed(0)
        model = create_model({"name": "tiny_cnn", "kwargs": {"width": 4}}, 10, 32)
        loss = attack.training_loss(model, data.images[:32].float() / 255, data.labels[:32],
                                    StepInfo(0, 0, 10, torch.Generator().manual_seed(0)))
        assert loss.ndim == 0 and torch.isfinite(loss)
    test = attack.poison_test(data)
    true = test.meta["true_labels"]
    assert (attack.target_labels(true, 10) != true).all()  # the test trigger only on non-target images
    assert len(test) == int(attack.test_mask(data.labels, 10).sum())
    assert test.images.dtype == torch.uint8
    # the config round-trips
    assert type(attack.config)(**attack.config.model_dump()) == attack.config
