"""Timing benchmarks (pytest-benchmark): training step, evaluation, trigger stamping.

Run them with ``make bench`` (``benchmarks/run.py``: stores and compares
baselines per machine); they are not under the project's ``testpaths``, so
``make test`` never collects them, and pyproject's ``--benchmark-disable``
keeps them untimed unless ``--benchmark-enable`` is given.

Every timed function runs on CUDA when available (then it ends with
``torch.cuda.synchronize()``, so the timer sees the GPU work), else on the
CPU. On CUDA each is called once untimed before timing (lazy initialisation,
cuDNN autotuning, allocator warm-up); on the CPU the minimum and median of the
rounds (3 or more) cover a slow first call. The device name goes into
``benchmark.extra_info["device"]`` and into every group name.

On the CPU, ``predict`` of preact_resnet18 (about a minute per round on a
2-core box) is skipped unless ``BENCH_SLOW=1``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest
import torch

import backdoor_harness as bh
import machine
from backdoor_harness import registry
from backdoor_harness.contracts import PrepareContext
from backdoor_harness.data import ImageSet
from backdoor_harness.models import create_model
from backdoor_harness.train import RECIPES, fit, predict

DEVICE = machine.device()
DEVICE_NAME = machine.device_name(DEVICE)
MODELS = ("tiny_cnn", "preact_resnet18")
SLOW = os.environ.get("BENCH_SLOW", "") not in ("", "0")
CLASSES = [str(i) for i in range(10)]


def timed(benchmark, fn: Callable[[], Any], what: str) -> Any:
    """Time ``fn`` (synchronized on CUDA) under the group ``what [device]``; on CUDA after one untimed call."""
    benchmark.group = f"{what} [{DEVICE_NAME}]"
    benchmark.extra_info.update(device=DEVICE_NAME, torch=torch.__version__)

    def call() -> Any:
        out = fn()
        machine.sync(DEVICE)
        return out

    if DEVICE.type == "cuda":
        call()
    return benchmark(call)


def noise_images(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` uniform uint8 32x32 RGB images (on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def noise_set(n: int, seed: int = 0) -> ImageSet:
    return ImageSet(noise_images(n, seed), torch.arange(n) % 10, CLASSES)


def model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, 10, 32)


# --------------------------------------------------------------------------
# (a) one training step
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_train_step(benchmark, name):
    """One step of the default recipe (SGD with momentum and weight decay, random crop + flip, bf16
    autocast and channels_last on CUDA) on a batch of 128, through the harness's trainer itself.

    The step lives only inside ``fit``, so this times ``fit`` for one epoch over exactly 128 images:
    one forward + backward + optimizer step, plus ``fit``'s per-call set-up (optimizer and scheduler
    construction, ``.to(device)`` no-ops, the final loss read back). The images are on the device
    already, as ``fit`` keeps them after its first move.
    """
    net = model(name).to(DEVICE)
    batch = noise_set(128)
    batch = ImageSet(batch.images.to(DEVICE), batch.labels.to(DEVICE), CLASSES)
    recipe = RECIPES["backdoorbench"].model_copy(update={"epochs": 1})
    gen = torch.Generator().manual_seed(0)
    stats = timed(benchmark, lambda: fit(net, batch, recipe, device=DEVICE, generator=gen, progress=False),
                  "train step, batch 128")
    assert stats["final_loss"] == stats["final_loss"]  # finite: fit raises on a diverged loss


# --------------------------------------------------------------------------
# (b) evaluation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_predict(benchmark, name):
    """``predict`` over 2,000 images (batches of 1,024; bf16 autocast on CUDA), the images on the CPU
    as the runner passes them, so the host-to-device copies are timed too."""
    if name == "preact_resnet18" and DEVICE.type == "cpu" and not SLOW:
        pytest.skip("preact_resnet18 predict on the CPU takes about a minute a round; BENCH_SLOW=1 runs it")
    net = model(name).eval()
    images = noise_images(2000)
    preds = timed(benchmark, lambda: predict(net, images, DEVICE), "predict, 2,000 images")
    assert preds.shape == (2000,)


# --------------------------------------------------------------------------
# (c) trigger stamping
# --------------------------------------------------------------------------

#: int fields of an attack's config that only size ``prepare`` (as tests/plugins/attacks/test_triggers.py ``ready``)
BUDGET = ("epochs", "steps", "iterations", "iters")


def prepared(name: str) -> bh.Attack:
    """The attack ready to stamp. Attacks with ``prepare`` run it at the smallest budget (every
    ``BUDGET`` int field = 1) on 200 noise images on the CPU, as tests/plugins/attacks/test_triggers.py ``ready`` does:
    that changes the trigger's values, not its cost (pattern and encoder sizes are untouched)."""
    cls = registry.get_class("attack", name)
    if not cls.prepares():
        return bh.create_attack(name)
    small = {k: 1 for k, f in cls.Config.model_fields.items()
             if f.annotation is int and any(k == b or k.endswith("_" + b) for b in BUDGET)}
    attack = bh.create_attack(name, **small)
    torch.manual_seed(0)
    clean = create_model({"name": "tiny_cnn", "kwargs": {"width": 4}}, 10, 32).eval()
    cpu = torch.device("cpu")
    attack.prepare(PrepareContext(train=noise_set(200), device=cpu, generator=torch.Generator().manual_seed(0),
                                  seed=0, fit=lambda *a, **k: fit(*a, **{"progress": False, **k}),
                                  clean_model=clean if attack.prepare_needs_clean_model else None))
    return attack


@pytest.mark.parametrize("name", bh.list_attacks())
@pytest.mark.filterwarnings("ignore:inputaware. apply_trigger before training")
def test_apply_trigger(benchmark, name):
    """``apply_trigger(images, train=False)`` (the test-time trigger) of every registered attack on
    1,024 uint8 images on the device. InputAware stamps with its untrained generators (same cost)."""
    attack = prepared(name)
    images = noise_images(1024).to(DEVICE)
    out = timed(benchmark, lambda: attack.apply_trigger(images, train=False), "apply_trigger, 1,024 images")
    assert out.shape == images.shape and out.dtype == torch.uint8
