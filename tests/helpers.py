"""Shared test helpers: the seeded tiny model, random data and a CPU defense context.

Test modules import them as ``from helpers import ...`` (pytest puts ``tests/`` on the path)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from backdoor_harness.contracts import Attack, DefenseContext
from backdoor_harness.data import ImageSet
from backdoor_harness.models import create_model, model_family
from backdoor_harness.train import Recipe, fit

#: the repository root (this file stays at tests/helpers.py wherever the test modules sit)
ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
CLASSES = [str(i) for i in range(10)]


def tiny(seed: int = 0, *, width: int = 8, image_size: int = 32) -> nn.Module:
    """The tiny CNN for 10 classes in eval mode, initialised right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return create_model({"name": "tiny_cnn", "kwargs": {"width": width}}, 10, image_size).eval()


def noise_set(n: int = 100, seed: int = 0, *, generator: torch.Generator | None = None) -> ImageSet:
    """``n`` uniform uint8 32x32 images labelled ``arange(n) % 10``, drawn from ``generator``
    (default: a fresh one seeded ``seed``)."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 10,
                    CLASSES)


def learnable_set(n: int, seed: int, size: int = 32) -> ImageSet:
    """Each class a fixed coarse colour pattern plus noise: the tiny model learns it in a few epochs."""
    protos = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.6 * F.interpolate(protos[y], size=size, mode="nearest") + 0.4 * torch.rand(n, 3, size, size, generator=g)
    return ImageSet((x * 255).round().to(torch.uint8), y, CLASSES)


def context(model: nn.Module, reserve: ImageSet | None = None, seed: int = 0, *, n: int = 100,
            fit_fn: Callable[..., Any] | None = None, attack: Attack | None = None, family: str | None = None,
            generator: torch.Generator | None = None) -> DefenseContext:
    """A CPU defense context for 10 classes. Defaults: ``noise_set(n, seed)`` as the reserve, a fresh
    generator seeded ``seed``, ``model_family(model)`` and the harness's ``fit`` without progress bars."""
    return DefenseContext(reserve=reserve if reserve is not None else noise_set(n, seed), num_classes=10, device=CPU,
                          generator=generator if generator is not None else torch.Generator().manual_seed(seed),
                          seed=seed, family=family or model_family(model),
                          fit=fit_fn or (lambda *a, **k: fit(*a, **{"progress": False, **k})), attack=attack)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state dict."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def moved(model: nn.Module, scale: float = 0.05, seed: int = 1) -> nn.Module:
    """A copy of ``model`` with every parameter moved off it by ``scale`` times Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def one_step(model: nn.Module, data: ImageSet, loss_fn: Callable[..., torch.Tensor], lr: float) -> None:
    """One plain full-batch SGD step (momentum 0, no weight decay) through the harness's trainer."""
    recipe = Recipe(epochs=1, batch_size=len(data), lr=lr, momentum=0.0, weight_decay=0.0, schedule="constant",
                    augment=False)
    fit(model, data, recipe, device=CPU, generator=torch.Generator().manual_seed(0), loss_fn=loss_fn, progress=False)


def same(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models hold exactly the same state."""
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def check_contract(model: nn.Module, defense: Any, run: Callable[[int], nn.Module], *,
                   seeds_differ: bool = False) -> nn.Module:
    """The defense contract, checked on ``model`` with ``run(seed)`` (``torch.manual_seed(seed)`` is
    set first): the output is a model of the same shape in eval mode; the given model is untouched;
    the same seed gives the same weights (and, with ``seeds_differ``, another seed other weights);
    the weights load strictly into a copy of the given architecture (no added modules, parameters or
    buffers) and no hook is left behind; the config round-trips through JSON. Returns run(0)'s model."""
    given = state(model)

    def call(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return run(seed)

    out = call(0)
    x = torch.rand(4, 3, 32, 32)
    assert out(x).shape == model(x).shape
    assert not out.training
    assert all(torch.equal(given[k], v) for k, v in model.state_dict().items()), "the given model was changed"
    assert same(out, call(0)), "not deterministic for a seed"
    if seeds_differ:
        assert not same(out, call(1)), "another seed gave the same weights"
    copy.deepcopy(model).load_state_dict(out.state_dict())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in out.modules())
    assert type(defense.config).model_validate_json(defense.config.model_dump_json()) == defense.config
    return out


# -- a published leaderboard in a temporary folder (submission and verification tests) ------------


def published_site(root: Path, matrix: str) -> Path:
    """``root`` made a repository-like folder: ``configs/m.yaml`` (``matrix``), ``leaderboard/published.yaml``
    naming it, and one honest exported run of it (``run.jsonl``, on the CPU)."""
    from backdoor_harness import cli

    (root / "configs").mkdir()
    (root / "configs" / "m.yaml").write_text(matrix)
    (root / "leaderboard").mkdir()
    (root / "leaderboard" / "published.yaml").write_text("matrices: [configs/m.yaml]\nrecords: leaderboard/records\n")
    work = root / "work"
    assert cli.main(["run", str(root / "configs" / "m.yaml"), "--workdir", str(work), "--no-progress",
                     "--device", "cpu"]) == 0
    assert cli.main(["export", "--workdir", str(work), "--out", str(root / "run.jsonl")]) == 0
    return root


def fresh_board(site: Path, root: Path) -> Path:
    """A published leaderboard of ``site``'s matrix in ``root`` with nothing published yet: its published.yaml."""
    import shutil

    shutil.copytree(site / "configs", root / "configs")
    (root / "leaderboard").mkdir()
    published = root / "leaderboard" / "published.yaml"
    shutil.copy(site / "leaderboard" / "published.yaml", published)
    return published


# -- matrix files --------------------------------------------------------------------------------


def write_matrix(tmp_path: Path, text: str, name: str = "matrix.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def matrix_error(tmp_path: Path, text: str) -> str:
    """The message of load_matrix's HarnessError on ``text`` (`harness validate` exits 2 with it on
    stderr); it names the file."""
    import pytest

    from backdoor_harness.errors import HarnessError
    from backdoor_harness.matrix import load_matrix

    path = write_matrix(tmp_path, text)
    with pytest.raises(HarnessError) as err:
        load_matrix(path)
    assert path.name in str(err.value)
    return str(err.value)


#: a small valid matrix file, for tests that break one key of it
GOOD_MATRIX = """
datasets: [{name: cifar10, train_per_class: 10}]
models: [tiny_cnn]
attacks: [{name: badnets, config: {stamp: after_augment}}]
defenses: [none, ft]
evaluators: [clean_acc, asr]
recipe: cpu-quick
"""


def tiny_matrix(name: str) -> str:
    """A tiny two-row matrix (BadNets; none and a one-epoch FT; C-Acc and ASR) named ``name``, as YAML:
    what the submission and README tests run and publish."""
    return f"""\
name: {name}
datasets: [{{name: cifar10, train_per_class: 20, test_per_class: 10}}]
models: [{{name: tiny_cnn, kwargs: {{width: 8}}}}]
attacks: [{{name: badnets, config: {{stamp: after_augment}}}}]
defenses: [none, {{name: ft, config: {{epochs: 1}}}}]
evaluators: [clean_acc, asr]
recipe: {{base: cpu-quick, epochs: 1}}
"""
