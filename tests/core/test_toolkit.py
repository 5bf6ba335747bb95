"""The plugin authors' toolkit: ``fit(on_epoch=...)``, ``Recipe.tuning``, ``capture`` /
``eval_mode``, the model-family sets, and the rules the built-in defenses and the example
package keep (only ``backdoor_harness.toolkit`` imported; every defense returning ``Purified``
is checked in test_defenses.py)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import CPU, ROOT, context, learnable_set, noise_set, same, tiny

import backdoor_harness as bh
from backdoor_harness import toolkit
from backdoor_harness.preflight import quick_config
from backdoor_harness.registry import get_class
from backdoor_harness.toolkit import (BATCHNORM_FAMILIES, CONV_FAMILIES, SPATIAL_FAMILIES, HarnessError, Recipe,
                                      capture, eval_mode, features, fit, unwrap)

EXAMPLE = ROOT / "examples" / "harness-head-reinit"


# --------------------------------------------------------------------------
# fit(on_epoch=...)
# --------------------------------------------------------------------------


def _recipe(epochs: int) -> Recipe:
    return Recipe(epochs=epochs, batch_size=20, lr=0.05, schedule="constant")


def test_on_epoch_false_stops_training_where_a_shorter_run_ends():
    data = learnable_set(60, 0)
    seen = []

    def stop_after_two(epoch, loss):
        seen.append((epoch, loss))
        return epoch < 1  # False after the second epoch

    stopped, g = tiny(0), torch.Generator().manual_seed(0)
    stats = fit(stopped, data, _recipe(5), device=CPU, generator=g, progress=False, on_epoch=stop_after_two)
    short, g2 = tiny(0), torch.Generator().manual_seed(0)
    fit(short, data, _recipe(2), device=CPU, generator=g2, progress=False)
    assert [e for e, _ in seen] == [0, 1]
    assert all(isinstance(loss, float) for _, loss in seen) and seen[-1][1] == stats["final_loss"]
    assert same(stopped, short)  # exactly two epochs ran
    assert torch.equal(g.get_state(), g2.get_state())  # and nothing was drawn for a third
    assert not stopped.training


def test_on_epoch_none_goes_on_and_the_next_epoch_trains_in_train_mode():
    data = learnable_set(40, 1)
    calls, modes = [], []

    def look(epoch, _loss):
        calls.append(epoch)
        model.eval()  # as a validation pass would leave it

    def loss_fn(m, x, y, _step):
        modes.append(m.training)
        return nn.functional.cross_entropy(m(x), y)

    model = tiny(0)
    fit(model, data, _recipe(3), device=CPU, generator=torch.Generator().manual_seed(0), progress=False,
        on_epoch=look, loss_fn=loss_fn)
    assert calls == [0, 1, 2]
    assert all(modes) and len(modes) == 3 * 2
    plain = tiny(0)
    fit(plain, data, _recipe(3), device=CPU, generator=torch.Generator().manual_seed(0), progress=False,
        loss_fn=loss_fn)
    assert same(model, plain)  # a callback that only looks changes nothing


# --------------------------------------------------------------------------
# Recipe.tuning
# --------------------------------------------------------------------------

# what each call site built before Recipe.tuning, written out field by field
OLD = {
    "ft": lambda c: Recipe(epochs=c.epochs, lr=c.lr, batch_size=c.batch_size, momentum=c.momentum,
                           weight_decay=c.weight_decay),
    "ep": lambda c: Recipe(epochs=c.epochs, lr=c.lr, batch_size=c.batch_size, momentum=c.momentum,
                           weight_decay=c.weight_decay),
    "fst": lambda c: Recipe(epochs=c.epochs, lr=c.lr, batch_size=c.batch_size, momentum=c.momentum,
                            weight_decay=c.weight_decay),
    "fp": lambda c: Recipe(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                           weight_decay=c.weight_decay, schedule="cosine", augment=c.augment),
    "d3": lambda c: Recipe(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                           weight_decay=c.weight_decay, schedule="cosine", augment=True),
    "ftsam": lambda c: Recipe(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                              weight_decay=c.weight_decay, schedule="cosine", augment=True),
    "nc": lambda c: Recipe(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                           weight_decay=c.weight_decay, schedule="cosine", augment=True),
    "pam": lambda c: Recipe(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                            weight_decay=c.weight_decay, schedule="constant", augment=True),
    "gradprune": lambda c: Recipe(epochs=c.tune_epochs, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                                  weight_decay=c.weight_decay, schedule="constant", augment=False),
}
#: configs off every default the recipe reads (and ftsam's label smoothing, which it must not)
ODD = {"epochs": 3, "lr": 0.123, "batch_size": 7, "momentum": 0.5, "weight_decay": 0.0321}
EXTRA = {"fp": {"augment": False}, "ftsam": {"label_smoothing": 0.3}, "gradprune": {"tune_epochs": 4},
         "nad": {"schedule": "cosine", "teacher_epochs": 2, "teacher_lr": 0.2}}


def _configs(name):
    cls = get_class("defense", name)
    fields = cls.Config.model_fields
    odd = {k: v for k, v in {**ODD, **EXTRA.get(name, {})}.items() if k in fields}
    return [cls.Config(), cls.Config(**odd)]


@pytest.mark.parametrize("name", ["ft", "ep", "fst", "fp", "d3", "ftsam", "nc"])
def test_config_recipes_are_the_old_constructions(name):
    for cfg in _configs(name):
        assert cfg.recipe() == OLD[name](cfg)


def test_nad_recipes_are_the_old_constructions():
    for c in _configs("nad"):
        for teacher in (True, False):
            old = Recipe(epochs=c.teacher_epochs if teacher else c.epochs, lr=c.teacher_lr if teacher else c.lr,
                         batch_size=c.batch_size, momentum=c.momentum, weight_decay=c.weight_decay,
                         schedule=c.schedule, augment=True)
            assert c.recipe(teacher=teacher) == old


@pytest.mark.parametrize("name", ["gradprune", "pam"])
def test_recipes_built_inside_purify_are_the_old_constructions(name):
    model = tiny(0)
    for cfg in _configs(name):
        small = {**cfg.model_dump(), **{k: v for k, v in quick_config(name).items() if k != "tune_epochs"},
                 "max_prune_steps": 0}
        cfg = type(cfg)(**{k: v for k, v in small.items() if k in type(cfg).model_fields})
        seen = []

        def record(m, data, recipe, **kw):
            seen.append(recipe)
            return {"images_per_s": 0.0, "wall_s": 0.0, "final_loss": 0.0}  # no training needed

        defense = get_class("defense", name)(cfg)
        attack = bh.create_attack("badnets") if "oracle_trigger" in defense.needs else None
        defense.purify(model, context(model, noise_set(40), fit_fn=record, attack=attack))
        assert seen and all(r == OLD[name](cfg) for r in seen)


def test_tuning_takes_same_named_fields_then_overrides():
    class Cfg(bh.PluginConfig):
        epochs: int = 4
        lr: float = 0.2
        threshold: float = 0.5  # not a recipe field: ignored

    r = Recipe.tuning(Cfg())
    assert (r.epochs, r.lr, r.batch_size, r.schedule) == (4, 0.2, 128, "cosine")
    assert Recipe.tuning(Cfg(), epochs=9, schedule="constant") == Recipe(epochs=9, lr=0.2, schedule="constant")
    assert Recipe.tuning({"epochs": 2, "other": 1}) == Recipe(epochs=2)
    with pytest.raises(HarnessError, match="'epoch' is not a recipe field"):
        Recipe.tuning(Cfg(), epoch=3)
    with pytest.raises(HarnessError, match="pydantic model or a mapping"):
        Recipe.tuning(42)


def test_the_example_package_recipe_is_the_old_one():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import harness_head_reinit as example
    finally:
        sys.path.remove(str(EXAMPLE))
    for cfg in (example.HeadReinitConfig(), example.HeadReinitConfig(epochs=3, lr=0.5, batch_size=9)):
        assert cfg.recipe() == Recipe(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size)


# --------------------------------------------------------------------------
# capture and eval_mode
# --------------------------------------------------------------------------


def test_capture_records_calls_in_finishing_order_in_eval_mode():
    model = tiny(0).train()
    net = unwrap(model)
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    seen_modes = []
    with capture(model, convs) as cap, torch.no_grad():
        seen_modes.append(model.training)
        feats = features(model, torch.rand(2, 3, 32, 32))
        features(model, torch.rand(2, 3, 32, 32))
    assert seen_modes == [False]
    assert model.training and all(m.training for m in model.modules())  # restored
    assert cap.names() == [n for n, _ in convs] * 2  # each conv, in order, on each pass
    first, last = cap.first(), cap.last()
    assert list(first) == [n for n, _ in convs]
    assert all(first[n] is cap.calls[i] and last[n] is cap.calls[len(convs) + i] for i, (n, _) in enumerate(convs))
    assert all(c.output.dim() == 4 for c in cap.calls) and feats.dim() == 4
    assert all(isinstance(c.args, tuple) and c.module is dict(convs)[c.name] for c in cap.calls)
    assert all(not m._forward_hooks for m in model.modules())
    cap.clear()
    assert cap.calls == []


def test_capture_removes_its_hooks_and_restores_each_mode_on_error():
    model = tiny(0).train()
    net = unwrap(model)
    frozen = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)][0]
    frozen.eval()  # a mixed-mode model: each module gets its own mode back
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, dict(net.named_modules())) as cap:
            model(torch.rand(1, 3, 32, 32))
            assert not any(m.training for m in model.modules())
            raise RuntimeError("boom")
    assert cap.calls
    assert [m.training for m in model.modules()] == before
    assert all(not m._forward_hooks for m in model.modules())


def test_capture_without_evaluate_leaves_the_modes_and_eval_mode_restores():
    model = tiny(0).train()
    with capture(model, [("x", unwrap(model))], evaluate=False) as cap:
        assert model.training
        model(torch.rand(1, 3, 32, 32))
    assert cap.names() == ["x"] and model.training
    with pytest.raises(ValueError):
        with eval_mode(model) as m:
            assert m is model and not model.training
            raise ValueError
    assert all(m.training for m in model.modules())


# --------------------------------------------------------------------------
# The defenses and the example package keep to the toolkit
# --------------------------------------------------------------------------


def test_family_sets_are_the_defenses_own():
    assert CONV_FAMILIES < BATCHNORM_FAMILIES < SPATIAL_FAMILIES
    for name in ("clp", "fp", "gradprune"):
        assert get_class("defense", name).families == CONV_FAMILIES
    assert get_class("defense", "anp").families == CONV_FAMILIES | {"regnet"}
    assert get_class("defense", "nad").families == CONV_FAMILIES | {"regnet", "convnext"}
    for name in ("btidbf", "d3", "ep", "fst", "ft", "ftsam", "ibau", "nc", "none", "pam", "sau"):  # any model
        assert get_class("defense", name).families == frozenset({"*"})


def _harness_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "backdoor_harness" or m.startswith("backdoor_harness.")}


@pytest.mark.parametrize("path", sorted((ROOT / "plugins" / "defenses").glob("*.py"))
                         + sorted((EXAMPLE / "harness_head_reinit").glob("*.py")), ids=lambda p: p.name)
def test_plugins_import_only_the_toolkit(path):
    bad = {m for m in _harness_imports(path)
           if m != "backdoor_harness.toolkit" and not m.startswith("backdoor_harness.plugins.")}
    assert not bad, f"{path.name} imports {sorted(bad)}; import from backdoor_harness.toolkit"


def test_toolkit_all_is_true():
    assert all(hasattr(toolkit, n) for n in toolkit.__all__)
    for n in ("capture", "eval_mode", "Capture", "Call", "CONV_FAMILIES", "BATCHNORM_FAMILIES", "SPATIAL_FAMILIES",
              "Purified", "Recipe", "fit"):
        assert n in toolkit.__all__
