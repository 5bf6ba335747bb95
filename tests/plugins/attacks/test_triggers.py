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


# -- BadNets' checkerboard (paper 000, Appendix B; BackdoorBench's trigger_image_grid.png) ------------------


def test_badnets_checkerboard_is_backdoorbenchs_grid_pixel_for_pixel():
    x = images()
    out = bh.create_attack("badnets", pattern="checkerboard").apply_trigger(x)
    # trigger_image_grid.png: rows/cols 29-31, 255 where (row + col) is even within the patch, 1 where odd
    grid = [[255, 1, 255], [1, 255, 1], [255, 1, 255]]
    for c in range(3):
        assert (out[:, c, 29:, 29:] == torch.tensor(grid, dtype=torch.uint8)).all()
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[29:, 29:] = False
    assert torch.equal(out[..., outside], x[..., outside])
    black = bh.create_attack("badnets", pattern="checkerboard", low_value=0).apply_trigger(x)
    assert black[0, 0, 29:, 29:].tolist() == [[255, 0, 255], [0, 255, 0], [255, 0, 255]]
    big = bh.create_attack("badnets", pattern="checkerboard", patch_size=4).apply_trigger(x)
    assert big[0, 1, 28:, 28:].tolist() == [[255, 1, 255, 1], [1, 255, 1, 255], [255, 1, 255, 1], [1, 255, 1, 255]]
    # the default is still the white square (old job keys keep their meaning)
    assert (bh.create_attack("badnets").apply_trigger(x)[..., 29:, 29:] == 255).all()
    with pytest.raises(bh.HarnessError, match="low_value"):
        bh.create_attack("badnets", low_value=0)
    with pytest.raises(bh.HarnessError, match="pattern"):
        bh.create_attack("badnets", pattern="grid")


# -- Blended's patterns ---------------------------------------------------------------------------------


def test_blended_gaussian_pattern_follows_the_documented_rule():
    attack = bh.create_attack("blended", pattern="gaussian", alpha=0.1, test_alpha=0.2)
    t = attack.pattern((3, 64, 64))
    g = torch.Generator().manual_seed(0)
    expected = (torch.randn((3, 64, 64), generator=g, dtype=torch.float64) * 63.75 + 127.5).round().clamp(0, 255)
    assert torch.equal(t, expected.to(torch.uint8))
    assert abs(t.float().mean().item() - 127.5) < 2 and 58 < t.float().std().item() < 64
    clipped = ((t == 0) | (t == 255)).float().mean().item()
    assert 0.02 < clipped < 0.08  # about 4.6% of N(0.5, 0.25^2) falls outside [0, 1]
    assert not torch.equal(t, bh.create_attack("blended").pattern((3, 64, 64)))  # not the uniform one
    x = images()
    blend = ((1 - 0.2) * x.float() + 0.2 * attack.pattern((3, 32, 32)).float()).round().to(torch.uint8)
    assert torch.equal(attack.apply_trigger(x, train=False), blend)
    wide = bh.create_attack("blended", pattern="gaussian", noise_mean=100, noise_std=10).pattern((3, 64, 64)).float()
    assert abs(wide.mean().item() - 100) < 1 and abs(wide.std().item() - 10) < 1
    with pytest.raises(bh.HarnessError, match="noise_std belongs to pattern gaussian"):
        bh.create_attack("blended", noise_std=10)


def _png(path, size=(7, 5), seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def test_blended_file_pattern_is_the_image_resized(tmp_path):
    import hashlib

    import numpy as np
    from PIL import Image

    path = _png(tmp_path / "kitty.png")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    attack = bh.create_attack("blended", pattern="file", pattern_file=str(path), pattern_sha256=digest)
    t = attack.pattern((3, 32, 24))
    resized = np.asarray(Image.open(path).convert("RGB").resize((24, 32), Image.BILINEAR))
    assert t.shape == (3, 32, 24) and torch.equal(t, torch.from_numpy(resized.copy()).permute(2, 0, 1))
    x = images()
    assert torch.equal(attack.apply_trigger(x, train=True),
                       (0.8 * x.float() + 0.2 * attack.pattern((3, 32, 32)).float()).round().to(torch.uint8))
    # an RGBA or greyscale file is converted to RGB
    Image.open(path).convert("L").save(tmp_path / "grey.png")
    grey = bh.create_attack("blended", pattern="file", pattern_file=str(tmp_path / "grey.png"),
                            pattern_sha256=hashlib.sha256((tmp_path / "grey.png").read_bytes()).hexdigest())
    p = grey.pattern((3, 8, 8))
    assert torch.equal(p[0], p[1]) and torch.equal(p[1], p[2])


def test_blended_file_problems_are_config_errors(tmp_path):
    from backdoor_harness.matrix import MatrixSpec, validate_plugins

    path = _png(tmp_path / "p.png")
    with pytest.raises(bh.HarnessError, match="does not exist"):
        bh.create_attack("blended", pattern="file", pattern_file=str(tmp_path / "nope.png"), pattern_sha256="0" * 64)
    (tmp_path / "bad.png").write_text("not an image")
    import hashlib

    bad_sha = hashlib.sha256(b"not an image").hexdigest()
    with pytest.raises(bh.HarnessError, match="not an image Pillow can read"):
        bh.create_attack("blended", pattern="file", pattern_file=str(tmp_path / "bad.png"), pattern_sha256=bad_sha)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(bh.HarnessError, match=f"pattern_sha256: {digest}"):  # says what to write
        bh.create_attack("blended", pattern="file", pattern_file=str(path))
    with pytest.raises(bh.HarnessError, match="the file changed"):
        bh.create_attack("blended", pattern="file", pattern_file=str(path), pattern_sha256="a" * 64)
    with pytest.raises(bh.HarnessError, match="needs pattern_file"):
        bh.create_attack("blended", pattern="file")
    with pytest.raises(bh.HarnessError, match="pattern_file belongs to pattern file"):
        bh.create_attack("blended", pattern_file=str(path))
    # through a matrix: validation, before any job runs
    spec = MatrixSpec.model_validate({
        "datasets": [{"name": "cifar10", "train_per_class": 10, "test_per_class": 5}], "models": ["tiny_cnn"],
        "attacks": [{"name": "blended", "config": {"pattern": "file", "pattern_file": str(tmp_path / "nope.png"),
                                                   "pattern_sha256": digest}}],
        "defenses": ["none"], "evaluators": ["asr"]})
    with pytest.raises(bh.HarnessError, match=r"attacks\[0\].*does not exist"):
        validate_plugins(spec)
    # a file edited after the config was validated is refused when the pattern is built, not silently used
    attack = bh.create_attack("blended", pattern="file", pattern_file=str(path), pattern_sha256=digest)
    _png(path, seed=1)
    with pytest.raises(bh.HarnessError, match="the file changed"):
        attack.pattern((3, 32, 32))


def test_blended_file_content_is_in_the_job_key(tmp_path):
    import hashlib

    from backdoor_harness.matrix import MatrixSpec, expand

    def train_key(path):
        spec = MatrixSpec.model_validate({
            "datasets": [{"name": "cifar10", "train_per_class": 10, "test_per_class": 5}], "models": ["tiny_cnn"],
            "attacks": [{"name": "blended", "config": {
                "pattern": "file", "pattern_file": str(path),
                "pattern_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}],
            "defenses": ["none"], "evaluators": ["asr"]})
        return next(j.key for j in expand(spec) if j.kind == "train")

    path = _png(tmp_path / "p.png")
    first = train_key(path)
    assert train_key(path) == first
    _png(path, seed=1)  # same path, other content: the sha256 the config must now carry changes the key
    assert train_key(path) != first


# -- substitutes and the attack's own poisoned samples ---------------------------------------------------


@pytest.mark.parametrize("name", bh.list_attacks())
def test_substitute_is_none_or_a_phrase(name):
    attack = bh.create_attack(name)
    assert attack.substitute is None or (isinstance(attack.substitute, str) and attack.substitute.strip())


def test_generated_resources_are_declared_substitutes():
    for name in ("ssba", "lf", "lc", "blended"):
        assert bh.create_attack(name).substitute, name
    for name in ("badnets", "sig", "wanet", "bpp"):  # the reference trigger (or its exact generation rule)
        assert bh.create_attack(name).substitute is None, name
    # where the config picks the trigger, so does substitute: Blended's Gaussian noise is paper 000's
    assert bh.create_attack("blended", pattern="gaussian").substitute is None


@pytest.mark.parametrize("name", bh.list_attacks())
def test_poisoned_samples_contract(name):
    data = dataset(500)
    attack = ready(name, data)
    target = attack.config.target
    p = attack.poisoned_samples(data, 6, torch.Generator().manual_seed(0))
    assert len(p.labels) == 6 and p.poison_mask.all() and p.images.dtype == torch.uint8
    assert p.images.shape == (6, 3, 32, 32) and len(set(p.source.tolist())) == 6
    true = data.labels[p.source]
    if attack.clean_label:
        assert (true == target).all() and (p.labels == target).all()
    else:
        assert torch.equal(p.labels, attack.target_labels(true, 10))
    if attack.training_controlled:  # no poisoned training set: non-target images with the trigger
        assert (true != target).all()
        assert torch.equal(p.triggered_images(), attack.apply_trigger(data.images[p.source], train=True))
    q = attack.poisoned_samples(data, 6, torch.Generator().manual_seed(0))
    assert torch.equal(p.source, q.source) and torch.equal(p.images, q.images)
    flipped = attack.poisoned_samples(data, 6, torch.Generator().manual_seed(0), flipped_only=True)
    assert (flipped.labels != data.labels[flipped.source]).all()
    assert len(flipped.labels) == (0 if attack.clean_label else 6)
    assert len(attack.poisoned_samples(data, 0, torch.Generator()).labels) == 0


def test_poisoned_samples_of_badnets_are_its_poisoned_training_samples():
    data = dataset(500)
    attack = bh.create_attack("badnets", poison_rate=0.1)
    everything = attack.poisoned_samples(data, 10_000, torch.Generator().manual_seed(3))
    poisoned = attack.poison(data, torch.Generator().manual_seed(3))
    assert sorted(everything.source.tolist()) == poisoned.poison_indices.tolist()  # all 50 of them
    assert (data.labels[everything.source] == 0).any()  # target-class originals included, as the authors draw
    assert (everything.labels == 0).all() and (everything.images[..., 29:, 29:] == 255).all()
    late = bh.create_attack("badnets", stamp="after_augment").poisoned_samples(data, 4, torch.Generator())
    assert late.stamp == "after_augment" and torch.equal(late.images, data.images[late.source])
    assert (late.triggered_images()[..., 29:, 29:] == 255).all()
    assert torch.equal(late.images, data.images[late.source])  # triggered_images() copied


def test_poisoned_samples_shortcut_equals_running_the_poisoning():
    """Attacks that keep the default ``poison`` stamp only the drawn samples; the result is what
    running ``poison`` and drawing from it gives (which attacks with their own ``poison`` get)."""
    from backdoor_harness.plugins.attacks.badnets import BadNets
    from backdoor_harness.plugins.attacks.blended import Blended

    data = dataset(500)
    for cls, cfg in ((BadNets, {}), (BadNets, {"stamp": "after_augment"}), (Blended, {"poison_rate": 0.05})):
        class OwnPoison(cls):
            def poison(self, train, generator):
                return super().poison(train, generator)

        for flipped in (False, True):
            a = cls(**cfg).poisoned_samples(data, 7, torch.Generator().manual_seed(5), flipped_only=flipped)
            b = OwnPoison(**cfg).poisoned_samples(data, 7, torch.Generator().manual_seed(5), flipped_only=flipped)
            assert torch.equal(a.source, b.source) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.images, b.images) and a.stamp == b.stamp
            assert torch.equal(a.triggered_images(), b.triggered_images())
