"""The harness trainer against the standard PyTorch pipeline: same model, same data, same process.

    python benchmarks/trainer.py                       # CPU: 1,024 images, 1 epoch; GPU: 50,000, 3 epochs
    python benchmarks/trainer.py --models preact_resnet18 --images 50000 --epochs 5 --compile

For each model it trains the same network on the same CIFAR-10 images:

- ``baseline``: the loop everyone writes first: a ``torch.utils.data.Dataset``
  holding HWC uint8 arrays (as ``torchvision.datasets.CIFAR10``) and giving
  PIL images through ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``,
  ``ToTensor`` and ``Normalize``; a ``DataLoader`` with worker processes
  (``--loader-workers``, persistent, pinned memory on CUDA); fp32; SGD
  (lr 0.01, momentum 0.9, weight decay 5e-4); batch 128. The model is the
  harness model's inner network, so normalization happens once, in the loader.
- ``harness``: :func:`backdoor_harness.train.fit` with the same optimizer and
  batch size (and, as further rows, ``--batch`` sizes and ``--compile``).

Each is warmed up with one untimed pass over 256 images, then timed over
``--epochs`` epochs (CUDA synchronized at both ends). Reported: images/s, the
ratio to the baseline, and the peak memory while it trained: on CUDA the peak
allocated by torch; on the CPU the peak resident memory of this process plus
its DataLoader workers, sampled every 10 ms from /proc (Linux).
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
from backdoor_harness.models import channel_stats, create_model
from backdoor_harness.train import Recipe, default_device, fit

MODELS = ["tiny_cnn", "preact_resnet18", "mobilenetv2_100"]


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
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def loader(data: ImageSet) -> DataLoader:
        return DataLoader(PILImages(data, transform), batch_size=128, shuffle=True, num_workers=workers,
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


def harness(model: nn.Module, train: ImageSet, epochs: int, device: torch.device, batch: int,
            compile: bool, warmup: ImageSet) -> float:
    """Images/s of the harness trainer with the baseline's optimizer, at batch size ``batch``."""
    recipe = Recipe(epochs=epochs, batch_size=batch, lr=0.01, schedule="constant")
    kw = {"device": device, "progress": False, "compile": compile}
    fit(model, warmup, recipe.model_copy(update={"epochs": 1}), generator=torch.Generator().manual_seed(1), **kw)
    sync(device)
    t0 = time.perf_counter()
    fit(model, train, recipe, generator=torch.Generator().manual_seed(0), **kw)
    sync(device)
    return epochs * len(train) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--images", type=int, help="training images (default: 50,000 on CUDA, 1,024 on CPU)")
    parser.add_argument("--epochs", type=int, help="timed epochs (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--batch", type=int, nargs="+", default=[128], help="harness batch sizes to time")
    parser.add_argument("--compile", action="store_true", help="also time the harness with torch.compile")
    parser.add_argument("--loader-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
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

    rows = []
    for model_name in args.models:
        def fresh() -> nn.Module:
            torch.manual_seed(0)
            mean, std = channel_stats(train.images)
            return create_model(model_name, full.num_classes, full.image_size, mean, std)

        with PeakMemory(device) as mem:
            base = baseline(fresh().net, train, epochs, device, args.loader_workers, warmup)
        rows.append([model_name, "baseline: DataLoader + PIL, fp32, batch 128", f"{base:,.0f}", "1.00",
                     f"{mem.peak_mb:,.0f}"])
        variants = [(b, False) for b in args.batch] + ([(b, True) for b in args.batch] if args.compile else [])
        for batch, comp in variants:
            with PeakMemory(device) as mem:
                ips = harness(fresh(), train, epochs, device, batch, comp, warmup)
            what = f"harness, batch {batch}" + (", torch.compile" if comp else "")
            rows.append([model_name, what, f"{ips:,.0f}", f"{ips / base:.2f}", f"{mem.peak_mb:,.0f}"])
        print(tabulate(rows[-1 - len(variants):], tablefmt="plain", disable_numparse=True), flush=True)
    mem_col = "peak MB (CUDA allocated)" if cuda else "peak MB (RSS, incl. loader workers)"
    print()
    print(tabulate(rows, headers=["model", "trainer", "images/s", "x baseline", mem_col], tablefmt="github",
                   disable_numparse=True,
                   colalign=("left", "left", "right", "right", "right")))


if __name__ == "__main__":
    main()
