"""Recipes: the keys of existing results stay put, the triangle schedule and the lr scaling by hand,
and the torch.compile modes (parsed and passed on; nothing is compiled here)."""

from __future__ import annotations

import os

import pytest
import torch

from backdoor_harness import cli, scheduler
from backdoor_harness.cli import main as harness
from backdoor_harness.data import Augmentation, ImageSet
from backdoor_harness.errors import HarnessError
from backdoor_harness.train import COMPILE_MODES, RECIPES, Recipe, compile_mode, fit, resolve_recipe

from helpers import ROOT


def test_fields_added_later_enter_the_key_only_when_set():
    old = {"epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "augment"}
    for name in RECIPES:
        assert set(RECIPES[name].payload()) == old
    assert set(Recipe(schedule="triangle").payload()) == old | {"warmup"}
    assert set(Recipe(nesterov=True, label_smoothing=0.2).payload()) == old | {"nesterov", "label_smoothing"}
    assert set(Recipe(hflip=False).payload()) == old | {"hflip"}
    assert Recipe(hflip=True, crop_padding=0).payload() == {**Recipe().payload(), "hflip": True, "crop_padding": 0}
    assert resolve_recipe({"base": "cpu-quick", "hflip": False}).payload()["hflip"] is False
    assert set(Recipe(lr_scale="linear").payload()) == old | {"lr_scale", "lr_ref_batch"}
    assert Recipe(lr_scale="sqrt", lr_ref_batch=256).payload() == {**Recipe().payload(), "lr_scale": "sqrt",
                                                                   "lr_ref_batch": 256}
    assert Recipe(lr_ref_batch=256).payload() == Recipe().payload()  # without lr_scale it changes nothing


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


def _tiny_fit(monkeypatch, recipe: Recipe, made: list | None = None, **kwargs) -> tuple[list, dict]:
    """fit a linear model on 40 random images with torch.optim.SGD recorded (into ``made``, read while fit
    runs); (optimizers made, fit's stats)."""
    made = [] if made is None else made
    real_sgd = torch.optim.SGD

    def sgd(*args, **kw):
        made.append(real_sgd(*args, **kw))
        return made[-1]

    monkeypatch.setattr(torch.optim, "SGD", sgd)
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(40) % 4,
                    list("abcd"))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    stats = fit(model, data, recipe, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                progress=False, **kwargs)
    return made, stats


def test_fit_follows_the_triangle_schedule(monkeypatch):
    recipe = resolve_recipe({"base": "cpu-quick", "epochs": 2, "batch_size": 8, "lr": 0.1, "schedule": "triangle",
                             "warmup": 0.2, "nesterov": True, "label_smoothing": 0.1})
    seen: list[float] = []
    made: list[torch.optim.SGD] = []
    _tiny_fit(monkeypatch, recipe, made, after_step=lambda m: seen.append(made[0].param_groups[0]["lr"]))
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


def test_lr_scaled_with_the_batch_size_by_hand():
    assert Recipe(lr=0.1, batch_size=512).effective_lr == 0.1  # no lr_scale: lr as given
    assert Recipe(lr=0.1, batch_size=512, lr_scale="linear").effective_lr == pytest.approx(0.4)  # 0.1 * 512 / 128
    assert Recipe(lr=0.1, batch_size=64, lr_scale="linear").effective_lr == pytest.approx(0.05)
    assert Recipe(lr=0.1, batch_size=512, lr_scale="linear", lr_ref_batch=256).effective_lr == pytest.approx(0.2)
    assert Recipe(lr=0.1, batch_size=512, lr_scale="sqrt").effective_lr == pytest.approx(0.2)  # 0.1 * sqrt(4)
    assert Recipe(lr=0.1, batch_size=128, lr_scale="linear").effective_lr == pytest.approx(0.1)
    with pytest.raises(ValueError):
        Recipe(lr_scale="cubic")
    with pytest.raises(ValueError):
        Recipe(lr_scale="linear", lr_ref_batch=0)


def test_fit_trains_at_the_scaled_lr(monkeypatch):
    recipe = Recipe(epochs=1, batch_size=16, lr=0.01, lr_scale="linear", lr_ref_batch=4, schedule="constant")
    made, stats = _tiny_fit(monkeypatch, recipe)
    assert made[0].defaults["lr"] == pytest.approx(0.04)  # 0.01 * 16 / 4
    assert "peak_mem_mib" not in stats  # only on CUDA


def test_compile_modes_are_parsed_and_a_bad_one_is_refused():
    assert [compile_mode(v) for v in (None, False, "", "0")] == [None] * 4
    assert compile_mode(True) == compile_mode("1") == "default"
    assert [compile_mode(m) for m in COMPILE_MODES] == list(COMPILE_MODES)
    for bad in ("fast", "max_autotune", "2", "Default"):
        with pytest.raises(HarnessError, match=r"unknown torch.compile mode .*modes: default, reduce-overhead, "
                                               r"max-autotune, max-autotune-no-cudagraphs"):
            compile_mode(bad)


def test_fit_compiles_in_the_mode_given(monkeypatch):
    seen: list[str | None] = []
    steps: list[int] = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: seen.append(mode) or model)  # nothing compiles
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    recipe = Recipe(epochs=1, batch_size=16, lr=0.01, schedule="constant")  # 40 images: 3 steps
    _tiny_fit(monkeypatch, recipe, compile="reduce-overhead")
    assert seen == ["reduce-overhead"] and len(steps) == 3  # CUDA graphs: each step marked as a new one
    _tiny_fit(monkeypatch, recipe, compile=True)
    _tiny_fit(monkeypatch, recipe, compile="max-autotune-no-cudagraphs")
    assert seen[1:] == ["default", "max-autotune-no-cudagraphs"] and len(steps) == 3
    _tiny_fit(monkeypatch, recipe, compile=False)
    _tiny_fit(monkeypatch, recipe, compile="max-autotune", loss_fn=lambda m, x, y, info: m(x).logsumexp(1).mean())
    assert len(seen) == 3  # not compiled: off, or with a loss_fn
    with pytest.raises(HarnessError, match="unknown torch.compile mode 'fast'"):
        _tiny_fit(monkeypatch, recipe, compile="fast")


@pytest.mark.parametrize("argv, env, expected", [
    (["--compile"], None, "1"),  # the default mode, as HARNESS_COMPILE=1 always meant
    (["--compile", "reduce-overhead"], None, "reduce-overhead"),
    (["--compile", "max-autotune", "--no-progress"], None, "max-autotune"),
    (["--compile", "1"], None, "1"),
    (["--compile", "0"], "max-autotune", "0"),  # the option wins over the environment
    ([], "max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),  # left as it is
    ([], None, None),
])
def test_harness_run_passes_the_compile_mode_on(monkeypatch, tmp_path, argv, env, expected):
    if env is None:
        monkeypatch.delenv("HARNESS_COMPILE", raising=False)
    else:
        monkeypatch.setenv("HARNESS_COMPILE", env)
    seen = []
    monkeypatch.setattr(scheduler, "run_matrix", lambda *a, **kw: seen.append(os.environ.get("HARNESS_COMPILE"))
                        or {"failed": 0, "blocked": 0})
    monkeypatch.setattr(cli, "write_plots", lambda workdir: [])
    assert harness(["run", str(ROOT / "configs/quickstart.yaml"), "--workdir", str(tmp_path), *argv]) == 0
    assert seen == [expected]


@pytest.mark.parametrize("argv, env", [(["--compile", "fast"], None), ([], "fast")])
def test_harness_run_refuses_a_bad_compile_mode_before_any_job(monkeypatch, tmp_path, capsys, argv, env):
    if env is None:
        monkeypatch.delenv("HARNESS_COMPILE", raising=False)
    else:
        monkeypatch.setenv("HARNESS_COMPILE", env)
    monkeypatch.setattr(scheduler, "run_matrix", lambda *a, **kw: pytest.fail("a job ran"))
    assert harness(["run", str(ROOT / "configs/quickstart.yaml"), "--workdir", str(tmp_path / "w"), *argv]) == 2
    err = capsys.readouterr().err
    assert "error: unknown torch.compile mode 'fast'" in err and "max-autotune-no-cudagraphs" in err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("env, expected", [(None, None), ("0", None), ("1", "default"),
                                           ("reduce-overhead", "reduce-overhead"), ("max-autotune", "max-autotune")])
def test_the_job_runner_trains_in_the_compile_mode_harness_run_set(monkeypatch, env, expected):
    """What `harness run --compile MODE` leaves in HARNESS_COMPILE is the mode every job is trained in
    (in this process, a worker or a Ray actor: each builds its JobRunner from the environment)."""
    from backdoor_harness.handlers import JobRunner

    if env is None:
        monkeypatch.delenv("HARNESS_COMPILE", raising=False)
    else:
        monkeypatch.setenv("HARNESS_COMPILE", env)
    assert JobRunner(None, {}, torch.device("cpu"), progress=False).compile == expected
