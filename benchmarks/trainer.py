"""The harness trainer against the standard PyTorch pipeline: same model, same data, same process.

    python benchmarks/trainer.py                       # CPU: 1,024 images, 1 epoch; GPU: 50,000, 3 epochs
    python benchmarks/trainer.py --models preact_resnet18 --images 50000 --epochs 5 --compile
    python benchmarks/trainer.py --models preact_resnet18 --batch 512 --compile default reduce-overhead

For each model it trains the same network on the same CIFAR-10 images:

- ``baseline``: the loop everyone writes first: a ``torch.utils.data.Dataset``
  holding HWC uint8 arrays (as ``torchvision.datasets.CIFAR10``) and giving
  PIL images through ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``,
  ``ToTensor`` and ``Normalize``; a ``DataLoader`` with worker processes
  (``--loader-workers``, persistent, pinned memory on CUDA); fp32; SGD
  (lr 0.01, momentum 0.9, weight decay 5e-4); batch 128. The model is the
  harness model's inner network, so normalization happens once, in the loader.
- ``harness``: :func:`backdoor_harness.train.fit` with the same optimizer at
  each ``--batch`` size, its learning rate scaled from the baseline's 0.01 at
  batch 128 (``--lr-scale``, default ``linear``: 0.04 at batch 512), and as
  further rows through ``torch.compile`` in each ``--compile`` mode (``--compile``
  alone: the default mode; several modes: a row per mode and batch size).

Each is warmed up untimed (the baseline: one pass over 256 images; the harness:
two passes over one full batch plus the timed set's last, partial one, so that
``torch.compile`` compiles, and records its CUDA graphs, for both batch shapes
before the timer starts), then timed over ``--epochs`` epochs (CUDA synchronized
at both ends). Reported: the learning rate, images/s, the ratio to the baseline,
and the peak memory while it trained: on CUDA the peak allocated by torch; on
the CPU the peak resident memory of this process plus its DataLoader workers,
sampled every 10 ms from /proc (Linux). After the table, issue 16's targets for
PreAct-ResNet-18 (one job >= 30,000 images/s; >= 10x the baseline of the same
run), met or not, with the best harness row.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tabulate import tabulate
from torch.utils.data import DataLoader, Dataset

from backdoor_harness.data import DataSpec, ImageSet, load_dataset
from backdoor_harness.errors import HarnessError
from backdoor_harness.models import channel_stats, create_model
from backdoor_harness.train import COMPILE_MODES, Recipe, compile_mode, default_device, fit

MODELS = ["tiny_cnn", "preact_resnet18", "mobilenetv2_100"]
#: the baseline's optimizer: SGD at this learning rate for this batch size
BASE_LR, BASE_BATCH = 0.01, 128
#: issue 16's targets: PreAct-ResNet-18 at 32x32, one job
TARGET_IMAGES_S, TARGET_RATIO = 30_000, 10.0


class PILImages(Dataset):
    """CIFAR-10 the way torchvision holds it: an HWC uint8 array, one PIL image per item."""

    def __init__(self, data: ImageSet, transform):
        self.data = data.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = data.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak, else sampled RSS of this process + children."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak_mb = float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif Path("/proc/self/status").exists():
            self._stop, self._peak = threading.Event(), 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        me = os.getpid()
        while not self._stop.wait(0.01):
            self._peak = max(self._peak, _rss_kb(me) + sum(_rss_kb(c) for c in _children(me)))

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self.peak_mb = self._peak / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def baseline(net: nn.Module, train: ImageSet, epochs: int, device: torch.device, workers: int,
             warmup: ImageSet) -> float:
    """Images/s of the standard loop (see the module docstring)."""
    import torchvision.transforms as T

    mean, std = channel_stats(train.images)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(mean, std)])
    cuda = device.type == "cuda"
    net.to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=BASE_LR, momentum=0.9, weight_decay=5e-4)

    def loader(data: ImageSet) -> DataLoader:
        return DataLoader(PILImages(data, transform), batch_size=BASE_BATCH, shuffle=True, num_workers=workers,
                          pin_memory=cuda, persistent_workers=workers > 0)

    def epoch(batches) -> None:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    epoch(loader(warmup))
    batches = loader(train)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        epoch(batches)
    sync(device)
    return epochs * len(train) / (time.perf_counter() - t0)


def recipe_for(batch: int, epochs: int, lr_scale: str | None) -> Recipe:
    """The baseline's optimizer at batch size ``batch``: lr 0.01 at batch 128, scaled by ``lr_scale``."""
    return Recipe(epochs=epochs, batch_size=batch, lr=BASE_LR, lr_scale=lr_scale, lr_ref_batch=BASE_BATCH,
                  schedule="constant")


def warmup_set(full: ImageSet, train: ImageSet, batch: int, generator: torch.Generator) -> ImageSet:
    """Images whose batches have the timed set's shapes: one full batch and the timed set's last,
    partial one (if any), so nothing compiles while the timer runs."""
    n = min(len(full), batch + len(train) % batch)
    return full.subset(torch.randperm(len(full), generator=generator)[:n])


def harness(model: nn.Module, train: ImageSet, epochs: int, device: torch.device, recipe: Recipe,
            compile: str | None, warmup: ImageSet) -> float:
    """Images/s of the harness trainer with ``recipe`` (epochs aside), compiled in mode ``compile``."""
    recipe = recipe.model_copy(update={"epochs": epochs})
    kw = {"device": device, "progress": False, "compile": compile or False}
    # two passes: torch.compile compiles each batch shape on its first, CUDA graphs record on the second
    fit(model, warmup, recipe.model_copy(update={"epochs": 2}), generator=torch.Generator().manual_seed(1), **kw)
    sync(device)
    t0 = time.perf_counter()
    fit(model, train, recipe, generator=torch.Generator().manual_seed(0), **kw)
    sync(device)
    return epochs * len(train) / (time.perf_counter() - t0)


def targets(rows: list[dict], device_name: str) -> list[str]:
    """Issue 16's one-job targets against the PreAct-ResNet-18 rows: met / not met, with the figures."""
    pre = [r for r in rows if r["model"] == "preact_resnet18"]
    head = f"targets (issue 16; PreAct-ResNet-18, one job, on {device_name}):"
    if not pre:
        return [head, "- not measured: preact_resnet18 is not among --models"]
    base = next(r for r in pre if r["baseline"])
    best = max((r for r in pre if not r["baseline"]), key=lambda r: r["ips"])
    ratio = best["ips"] / base["ips"]
    met = {True: "met", False: "NOT met"}
    return [head,
            f"- >= {TARGET_IMAGES_S:,} images/s: {met[best['ips'] >= TARGET_IMAGES_S]} "
            f"({best['ips']:,.0f} images/s, {best['trainer']})",
            f"- >= {TARGET_RATIO:.0f}x the standard loop in the same run: {met[ratio >= TARGET_RATIO]} "
            f"({ratio:.2f}x: {best['ips']:,.0f} against {base['ips']:,.0f} images/s)"]


def parse_modes(values: list[str] | None) -> list[str]:
    """``--compile`` values as modes, each once: ``None`` (no ``--compile``) -> none; ``[]`` (``--compile``
    alone) -> ``["default"]``. Raises HarnessError for a value that is not a mode."""
    if values is None:
        return []
    modes = [compile_mode(v) for v in values] if values else ["default"]
    return [m for i, m in enumerate(modes) if m is not None and m not in modes[:i]]


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/core/test_queue.py parses the GPU queue's commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--images", type=int, help="training images (default: 50,000 on CUDA, 1,024 on CPU)")
    parser.add_argument("--epochs", type=int, help="timed epochs (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--batch", type=int, nargs="+", default=[128], help="harness batch sizes to time")
    parser.add_argument("--lr-scale", choices=["linear", "sqrt", "none"], default="linear",
                        help=f"the harness's lr at a batch size other than {BASE_BATCH}: {BASE_LR} scaled "
                             "linearly (default), by the square root, or not at all")
    parser.add_argument("--compile", nargs="*", metavar="MODE",
                        help="also time the harness through torch.compile, a row per MODE and batch size "
                             f"(modes: {', '.join(COMPILE_MODES)}; none given: default)")
    parser.add_argument("--loader-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--device", default=None)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        modes = parse_modes(args.compile)
    except HarnessError as err:
        parser.error(str(err))
    lr_scale = None if args.lr_scale == "none" else args.lr_scale
    device = torch.device(args.device) if args.device else default_device()
    cuda = device.type == "cuda"
    images = args.images or (50_000 if cuda else 1_024)
    epochs = args.epochs or (3 if cuda else 1)
    if cuda:
        torch.backends.cudnn.benchmark = True

    full, _ = load_dataset(DataSpec(name="cifar10"))
    g = torch.Generator().manual_seed(0)
    train = full.subset(torch.randperm(len(full), generator=g)[:images])
    warmup = full.subset(torch.randperm(len(full), generator=g)[:256])
    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, torch {torch.__version__}, {images} CIFAR-10 images, {epochs} timed epoch(s), "
          f"baseline DataLoader workers {args.loader_workers}")

    rows: list[dict] = []
    for model_name in args.models:
        def fresh() -> nn.Module:
            torch.manual_seed(0)
            mean, std = channel_stats(train.images)
            return create_model(model_name, full.num_classes, full.image_size, mean, std)

        first = len(rows)
        with PeakMemory(device) as mem:
            base = baseline(fresh().net, train, epochs, device, args.loader_workers, warmup)
        rows.append({"model": model_name, "trainer": f"baseline: DataLoader + PIL, fp32, batch {BASE_BATCH}",
                     "lr": BASE_LR, "ips": base, "mem": mem.peak_mb, "baseline": True})
        for mode in [None, *modes]:
            for batch in args.batch:
                recipe = recipe_for(batch, epochs, lr_scale)
                warm = warmup_set(full, train, batch, torch.Generator().manual_seed(1))
                with PeakMemory(device) as mem:
                    ips = harness(fresh(), train, epochs, device, recipe, mode, warm)
                what = f"harness, batch {batch}" + (f", torch.compile {mode}" if mode else "")
                rows.append({"model": model_name, "trainer": what, "lr": recipe.effective_lr, "ips": ips,
                             "mem": mem.peak_mb, "baseline": False})
        print(tabulate([cells(r, base) for r in rows[first:]], tablefmt="plain", disable_numparse=True),
              flush=True)
    mem_col = "peak MiB (CUDA allocated)" if cuda else "peak MiB (RSS, incl. loader workers)"
    print()
    bases = {r["model"]: r["ips"] for r in rows if r["baseline"]}
    print(tabulate([cells(r, bases[r["model"]]) for r in rows],
                   headers=["model", "trainer", "lr", "images/s", "x baseline", mem_col], tablefmt="github",
                   disable_numparse=True, colalign=("left", "left", "right", "right", "right", "right")))
    print()
    print("\n".join(targets(rows, name)))


def cells(row: dict, base: float) -> list[str]:
    return [row["model"], row["trainer"], f"{row['lr']:g}", f"{row['ips']:,.0f}", f"{row['ips'] / base:.2f}",
            f"{row['mem']:,.0f}"]


if __name__ == "__main__":
    main()
