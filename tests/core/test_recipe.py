"""Recipes: the keys of existing results stay put, and the triangle schedule by hand."""

from __future__ import annotations

import pytest
import torch

from backdoor_harness.data import Augmentation, ImageSet
from backdoor_harness.train import RECIPES, Recipe, fit, resolve_recipe


def test_fields_added_later_enter_the_key_only_when_set():
    old = {"epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "augment"}
    for name in RECIPES:
        assert set(RECIPES[name].payload()) == old
    assert set(Recipe(schedule="triangle").payload()) == old | {"warmup"}
    assert set(Recipe(nesterov=True, label_smoothing=0.2).payload()) == old | {"nesterov", "label_smoothing"}
    assert set(Recipe(hflip=False).payload()) == old | {"hflip"}
    assert Recipe(hflip=True, crop_padding=0).payload() == {**Recipe().payload(), "hflip": True, "crop_padding": 0}
    assert resolve_recipe({"base": "cpu-quick", "hflip": False}).payload()["hflip"] is False


def test_recipe_overrides_the_data_sets_augmentation():
    gtsrb, cifar = Augmentation(hflip=False), Augmentation()
    assert Recipe().augmentation_for(gtsrb) == gtsrb  # None: the data set's own
    assert Recipe().augmentation_for(None) == Augmentation(crop_padding=4, hflip=True)  # unknown set: as before
    assert Recipe(hflip=True).augmentation_for(gtsrb) == Augmentation(crop_padding=4, hflip=True)
    assert Recipe(hflip=False).augmentation_for(cifar) == Augmentation(crop_padding=4, hflip=False)
    assert Recipe(crop_padding=2).augmentation_for(gtsrb) == Augmentation(crop_padding=2, hflip=False)
    assert Recipe(augment=False, hflip=True).augmentation_for(cifar) is None
    assert Recipe(crop_padding=0).augmentation_for(gtsrb) is None  # neither crop nor flip
    with pytest.raises(ValueError):
        Recipe(crop_padding=-1)


def test_triangle_schedule_by_hand():
    r = Recipe(schedule="triangle", warmup=0.2)
    # 10 steps, 2 of warm-up: 1/2, 1, then down by 1/8 per step
    assert [r.lr_factor(t, 10) for t in range(10)] == pytest.approx([0.5, 1, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8,
                                                                     2 / 8, 1 / 8])


def test_fit_follows_the_triangle_schedule(monkeypatch):
    made: list[torch.optim.SGD] = []
    real_sgd = torch.optim.SGD

    def sgd(*args, **kwargs):  # keep the optimizer fit makes, to read its learning rate
        made.append(real_sgd(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(torch.optim, "SGD", sgd)
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(40) % 4,
                    list("abcd"))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    recipe = resolve_recipe({"base": "cpu-quick", "epochs": 2, "batch_size": 8, "lr": 0.1, "schedule": "triangle",
                             "warmup": 0.2, "nesterov": True, "label_smoothing": 0.1})
    seen: list[float] = []
    fit(model, data, recipe, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
        progress=False, after_step=lambda m: seen.append(made[0].param_groups[0]["lr"]))
    assert made[0].defaults["nesterov"] is True
    # 10 steps, 2 of warm-up; after a step the optimizer holds the next step's rate
    assert seen == pytest.approx([0.1 * recipe.lr_factor(t + 1, 10) for t in range(10)])


def test_label_smoothing_by_hand():
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(16) % 4,
                    list("abcd"))

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))

    recipe = Recipe(epochs=1, batch_size=16, lr=1e-12, momentum=0.0, weight_decay=0.0, augment=False,
                    label_smoothing=0.5)
    got = fit(model(), data, recipe, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
              progress=False)["final_loss"]
    with torch.no_grad():
        logp = torch.log_softmax(model()(data.images.float() / 255), 1)
    ce = -logp[torch.arange(16), data.labels].mean()
    uniform = -logp.mean(1).mean()  # against the uniform distribution over the 4 classes
    assert got == pytest.approx(float(0.5 * ce + 0.5 * uniform), rel=1e-5)
