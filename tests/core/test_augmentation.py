"""Augmentation is a property of the data set: GTSRB is never mirrored, CIFAR is, a recipe
overrides either, the reserve and fine-tuning defenses inherit it, and CIFAR job keys stand."""

from __future__ import annotations


from functools import partial

import pytest
import torch
import torch.nn.functional as F

from backdoor_harness.contracts import DefenseContext, PoisonedSet
from backdoor_harness.data import Augmentation, DatasetSource, ImageSet, load_source, _cache_key
from backdoor_harness.matrix import MatrixSpec, expand
from backdoor_harness.registry import create_dataset, get_class, names
from backdoor_harness.train import Recipe, augment_batch, draw_crop_flip, fit, shuffled_batches

CPU = torch.device("cpu")
GTSRB = get_class("dataset", "gtsrb").augmentation
CIFAR10 = get_class("dataset", "cifar10").augmentation


def column_coded(n: int, size: int = 8) -> ImageSet:
    """Every pixel holds 10 * (its column + 1): after a crop with zero padding, the non-zero columns of
    an image run upwards left to right, and downwards when it was mirrored."""
    cols = (10 * (torch.arange(size) + 1)).to(torch.uint8)
    images = cols.expand(n, 3, size, size).contiguous()
    return ImageSet(images, torch.arange(n) % 4, list("abcd"))


def mirrored(x: torch.Tensor) -> torch.Tensor:
    """Per image of a batch of ``column_coded`` crops (uint8 or [0, 1] floats): whether it was mirrored."""
    profile = x[:, 0].float().amax(1)  # [B, W]: a column's code, 0 where the column is padding
    out = []
    for row in profile:
        seen = row[row > 0]
        assert len(seen) >= 2, "a crop keeps at least half of the columns"
        steps = seen.diff()
        assert bool((steps > 0).all() or (steps < 0).all())
        out.append(bool(steps[0] < 0))
    return torch.tensor(out)


# -- the data sets' declarations ---------------------------------------------------------------------


def test_every_data_set_declares_its_augmentation():
    assert GTSRB == Augmentation(crop_padding=4, hflip=False)  # BackdoorBench: RandomCrop(pad 4), no flip
    assert CIFAR10 == Augmentation(crop_padding=4, hflip=True)  # RandomCrop(32, pad 4) + HFlip
    for name in ("cifar100", "tiny_imagenet"):
        assert get_class("dataset", name).augmentation == Augmentation()
    for name in names("dataset"):
        assert isinstance(get_class("dataset", name).augmentation, Augmentation)
    # GTSRB's training changed (no flips): a new version, so new job keys
    assert get_class("dataset", "gtsrb").version == "2"
    assert get_class("dataset", "cifar10").version == "1"


def test_imagefolder_options_choose_the_augmentation_not_the_decode_cache():
    plain = create_dataset("imagefolder", root="/x")
    signs = create_dataset("imagefolder", root="/x", hflip=False, crop_padding=2)
    assert plain.train_augmentation() == Augmentation()
    assert signs.train_augmentation() == Augmentation(crop_padding=2, hflip=False)
    assert _cache_key(plain) == _cache_key(signs)  # same pixels, one decode
    assert _cache_key(plain) != _cache_key(create_dataset("imagefolder", root="/x", size=16))


def test_loaded_sets_carry_the_source_augmentation_down_to_the_reserve(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))

    class Signs(DatasetSource):
        name = "signs_for_test"
        augmentation = Augmentation(crop_padding=2, hflip=False)

        def load(self):
            return column_coded(8), column_coded(4)

    for _ in range(2):  # decoded, then read from the cache
        train, test = load_source(Signs())
        assert train.augmentation == test.augmentation == Augmentation(crop_padding=2, hflip=False)
    reserve = train.subset(torch.tensor([0, 2, 4, 6]))
    assert reserve.augmentation == Signs.augmentation
    ctx = DefenseContext(reserve=reserve, num_classes=4, device=CPU, generator=torch.Generator().manual_seed(0),
                         seed=0, family="cnn", fit=fit)
    assert all(part.augmentation == Signs.augmentation for part in ctx.split(0.5))


# -- the trainer's augmentation function -------------------------------------------------------------


def test_gtsrb_default_never_flips_cifar_does():
    x = column_coded(512).images
    g = torch.Generator().manual_seed(0)
    assert not mirrored(augment_batch(x, g, GTSRB)).any()
    dy, dx, flip = draw_crop_flip(4096, torch.Generator().manual_seed(1), GTSRB.crop_padding, GTSRB.hflip)
    assert not flip.any() and dx.min() == 0 and dx.max() == 8 and dy.max() == 8  # still cropped
    flips = mirrored(augment_batch(x, torch.Generator().manual_seed(0), CIFAR10))
    assert 0.4 < flips.float().mean() < 0.6


def test_cifar_draws_keep_their_order():
    """CIFAR's augmentation draws exactly what the trainer always drew (dy, dx, flips), so cached
    CIFAR results stay reproducible under their unchanged keys."""
    dy, dx, flip = draw_crop_flip(100, torch.Generator().manual_seed(7), CIFAR10.crop_padding, CIFAR10.hflip)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(dy, torch.randint(0, 9, (100,), generator=g))
    assert torch.equal(dx, torch.randint(0, 9, (100,), generator=g))
    assert torch.equal(flip, torch.rand(100, generator=g) < 0.5)


def test_no_padding_means_no_crop():
    x = column_coded(64).images
    out = augment_batch(x, torch.Generator().manual_seed(0), Augmentation(crop_padding=0, hflip=True))
    flips = mirrored(out)
    assert flips.any() and not flips.all()
    assert torch.equal(out[~flips], x[~flips]) and torch.equal(out[flips], x[flips].flip(-1))
    assert augment_batch(x, torch.Generator(), Augmentation(crop_padding=0, hflip=False)) is x


def test_shuffled_batches_follow_the_reserve_augmentation():
    data = column_coded(64)
    batches = shuffled_batches(data.images, data.labels, 16, torch.Generator().manual_seed(0),
                               augmentation=GTSRB, floats=False)
    assert not any(mirrored(x).any() for x, _ in batches)
    batches = shuffled_batches(data.images, data.labels, 64, torch.Generator().manual_seed(0), floats=False)
    assert mirrored(next(batches)[0]).any()  # no augmentation given: the old crop + flip


# -- what fit feeds the model ------------------------------------------------------------------------


def seen_flips(data, recipe: Recipe, fit_fn=fit, **kwargs) -> torch.Tensor:
    """Train a linear model with ``fit_fn`` and return, for every image of every batch it saw, whether
    it was mirrored (read off the batches the loss receives)."""
    seen: list[torch.Tensor] = []

    def loss(model, xf, yb, info):
        seen.append(mirrored(xf))
        return F.cross_entropy(model(xf), yb)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    fit_fn(model, data, recipe, device=CPU, generator=torch.Generator().manual_seed(0), loss_fn=loss,
           progress=False, **kwargs)
    return torch.cat(seen)


RECIPE = dict(epochs=3, batch_size=16, lr=1e-3)


def test_fit_never_flips_gtsrb_and_flips_cifar():
    data = column_coded(64)
    gtsrb = ImageSet(data.images, data.labels, data.classes, augmentation=GTSRB)
    cifar = ImageSet(data.images, data.labels, data.classes, augmentation=CIFAR10)
    assert len(seen_flips(gtsrb, Recipe(**RECIPE))) == 3 * 64
    assert not seen_flips(gtsrb, Recipe(**RECIPE)).any()
    assert seen_flips(cifar, Recipe(**RECIPE)).any()
    assert seen_flips(data, Recipe(**RECIPE)).any()  # a set of unknown origin: crop + flip, as before


def test_recipe_overrides_the_data_set():
    data = column_coded(64)
    gtsrb = ImageSet(data.images, data.labels, data.classes, augmentation=GTSRB)
    cifar = ImageSet(data.images, data.labels, data.classes, augmentation=CIFAR10)
    assert not seen_flips(cifar, Recipe(**RECIPE, hflip=False)).any()
    assert seen_flips(gtsrb, Recipe(**RECIPE, hflip=True)).any()
    assert not seen_flips(cifar, Recipe(**RECIPE, augment=False)).any()


def test_explicit_augmentation_reaches_a_poisoned_set():
    """What the runner hands over with the cell's data set, for training sets that carry none
    (an attacker's ``PoisonedSet``, a defense's own mix)."""
    data = column_coded(64)
    poisoned = PoisonedSet(data.images, data.labels, torch.zeros(64, dtype=torch.bool))
    assert seen_flips(poisoned, Recipe(**RECIPE)).any()
    assert not seen_flips(poisoned, Recipe(**RECIPE), augmentation=GTSRB).any()
    assert seen_flips(poisoned, Recipe(**RECIPE, hflip=True), augmentation=GTSRB).any()


def test_runner_fit_hands_over_the_cells_augmentation(monkeypatch):
    """Every job's ``fit`` (an attacked model's training, a defense's or an attack's fine-tuning)
    gets the augmentation of the cell's data set, whatever set it trains on."""
    from backdoor_harness import handlers
    from backdoor_harness.jobs import PluginCall, PurifyJob, TrainJob
    from backdoor_harness.store import Cell

    data = column_coded(64)
    gtsrb = ImageSet(data.images, data.labels, data.classes, augmentation=GTSRB)
    monkeypatch.setattr(handlers, "load_dataset", lambda spec: (gtsrb, gtsrb))
    cell = Cell(dataset="gtsrb", seed=0)
    train = TrainJob(label="train", cell=cell, seed=0, versions={}, data={"name": "gtsrb"}, model={}, recipe={})
    purify = PurifyJob(label="purify", cell=cell, seed=0, versions={}, defense=PluginCall("none"), reserve={},
                       train=train.key)
    runner = handlers.JobRunner(store=None, jobs={train.key: train, purify.key: purify}, device=CPU, progress=False)
    poisoned = PoisonedSet(data.images, data.labels, torch.zeros(64, dtype=torch.bool))
    mix = ImageSet(data.images, data.labels, data.classes)  # a defense's own set, built without a source
    for job in (train, purify):
        for training_set in (poisoned, mix):
            assert not seen_flips(training_set, Recipe(**RECIPE), fit_fn=partial(runner.fit, job)).any()
        assert seen_flips(poisoned, Recipe(**RECIPE, hflip=True), fit_fn=partial(runner.fit, job)).any()


def test_fit_crops_with_the_data_sets_padding():
    data = column_coded(32)
    seen: list[torch.Tensor] = []

    def loss(model, xf, yb, info):
        seen.append(xf)
        return F.cross_entropy(model(xf), yb)

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    aug = Augmentation(crop_padding=1, hflip=False)
    fit(model, ImageSet(data.images, data.labels, data.classes, augmentation=aug), Recipe(**RECIPE), device=CPU,
        generator=torch.Generator().manual_seed(0), loss_fn=loss, progress=False)
    codes = torch.cat(seen)[:, 0].amax(1)  # [N, W]
    # a 1-pixel pad loses at most one column of the 8 (shifted by up to 1), never more
    assert ((codes > 0).sum(1) >= 7).all()
    assert ((codes > 0).sum(1) == 7).any()


# -- job keys ------------------------------------------------------------------------------------------


def clean_train_key(dataset, recipe) -> str:
    spec = MatrixSpec.model_validate({"datasets": [dataset], "models": ["tiny_cnn"], "attacks": ["badnets"],
                                      "defenses": ["none"], "evaluators": ["clean_asr"], "recipe": recipe})
    return next(j.key for j in expand(spec) if j.kind == "train" and j.cell.attack is None)


#: keys of the clean training job, computed before data sets declared their augmentation
BEFORE = {
    ("cifar10", "backdoorbench"): "8c9a8ea91c100ee6335ff0c5",
    ("cifar10", "cpu-quick"): "a3c4f9fb514ef9fdd5774779",
    ("cifar10", "no-augment"): "c4d3f9989d2b1a6d48e3431b",
    ("cifar10-subset", "cpu-quick"): "3d27a496306c4604549adee9",
    ("cifar100", "backdoorbench"): "11cda01852cdda203a94bb7d",
    ("tiny_imagenet", "backdoorbench"): "67a1ab04ae60004dabf885fb",
    ("imagefolder", "backdoorbench"): "9653ac0b43086000baa82ed3",
    ("gtsrb", "backdoorbench"): "7d277f38ff48e5712a15e95e",
    ("gtsrb", "cpu-quick"): "3663dc6f4970499108c70a76",
}
DATASETS = {"cifar10-subset": {"name": "cifar10", "train_per_class": 10},
            "imagefolder": {"name": "imagefolder", "options": {"root": "/x"}}}
RECIPES = {"no-augment": {"base": "cpu-quick", "augment": False}}


@pytest.mark.parametrize("dataset,recipe", [k for k in BEFORE if k[0] != "gtsrb"])
def test_keys_of_flipped_data_sets_stand(dataset, recipe):
    assert clean_train_key(DATASETS.get(dataset, dataset), RECIPES.get(recipe, recipe)) == BEFORE[dataset, recipe]


def test_gtsrb_keys_change_and_overrides_enter_keys():
    for recipe in ("backdoorbench", "cpu-quick"):
        assert clean_train_key("gtsrb", recipe) != BEFORE["gtsrb", recipe]
    base = clean_train_key("cifar10", "cpu-quick")
    assert clean_train_key("cifar10", {"base": "cpu-quick", "hflip": False}) != base
    assert clean_train_key("cifar10", {"base": "cpu-quick", "crop_padding": 2}) != base
    assert clean_train_key("gtsrb", {"base": "cpu-quick", "hflip": True}) != clean_train_key("gtsrb", "cpu-quick")
