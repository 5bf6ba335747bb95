"""Built-in data-set sources: cifar10, imagefolder, cifar100, gtsrb, tiny_imagenet.

Registered through the ``backdoor_harness`` entry-point group like any plugin.
Each source searches the data roots (see :func:`backdoor_harness.toolkit.data_roots`)
for the layouts it knows, then falls back to a torchvision download; when
nothing works it says where it looked and how to provide the data.

Each source also declares the training augmentation of its images
(``augmentation``, see :class:`backdoor_harness.toolkit.Augmentation`), which a
recipe may override (``crop_padding``, ``hflip``):

- cifar10: random crop (4-pixel zero padding) + horizontal flip, BackdoorBench's
  CIFAR-10 train transform (``get_transform`` in its
  ``utils/aggregate_block/dataset_and_transform_generate.py``).
- gtsrb: random crop (4-pixel padding), **no flip**, as BackdoorBench (its
  ``get_transform`` crops every data set and flips only ``cifar10``); a mirrored
  traffic sign is another sign (keep right / keep left).
- cifar100, tiny_imagenet: crop + flip. BackdoorBench flips neither (only
  ``cifar10``); we keep the flip, the usual practice for these natural-image
  classes and what the harness always did (their job keys stand). A recipe with
  ``hflip: false`` trains them as BackdoorBench does.
- imagefolder: crop + flip by default; its options ``crop_padding`` and
  ``hflip`` set them for the tree at hand (e.g. ``hflip: false`` for signs or text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pydantic import Field

from backdoor_harness.toolkit import (Augmentation, DatasetSource, HarnessError, ImageSet, SourceConfig, cache_dir,
                                      data_roots, from_torchvision, hookimpl, read_imagefolder,
                                      read_imagefolder_archive, split_from_files)


class RootConfig(SourceConfig):
    """Attributes:
        root: a folder to read instead of searching the data roots.
        download: allow a torchvision download when nothing is found locally.
    """

    root: str | None = None
    download: bool = True


def _search(name: str, config: RootConfig, layouts: list[tuple[str, Callable[[Path], tuple[ImageSet, ImageSet]]]],
            download: Callable[[Path], tuple[ImageSet, ImageSet]] | None) -> tuple[ImageSet, ImageSet]:
    roots = [Path(config.root).expanduser()] if config.root else data_roots()
    looked = []
    for root in roots:
        for rel, reader in layouts:
            path = root / rel
            looked.append(str(path))
            if path.exists():
                return reader(path)
    if download is not None and config.download:
        target = cache_dir() / "torchvision"
        try:
            return download(target)
        except Exception as exc:  # offline, or a mirror is down
            looked.append(f"torchvision download into {target} ({type(exc).__name__}: {exc})")
    raise HarnessError(
        f"data set {name!r} not found. Looked in: {'; '.join(looked) or '(no data root exists)'}. "
        f"Set HARNESS_DATA to a folder holding one of these layouts, or pass options: {{root: PATH}} "
        f"in the matrix (and allow the download when online).")


class Cifar10(DatasetSource):
    """CIFAR-10; augmentation: random crop (padding 4) + horizontal flip (BackdoorBench's)."""

    name = "cifar10"
    classes = 10
    version = "1"
    augmentation = Augmentation(crop_padding=4, hflip=True)
    summary = "CIFAR-10: archive/ImageFolder tree under the data root, torchvision layout, or download"
    paper = "Krizhevsky, Learning Multiple Layers of Features from Tiny Images, 2009"
    Config = RootConfig

    def load(self) -> tuple[ImageSet, ImageSet]:
        from torchvision.datasets import CIFAR10

        return _search(self.name, self.config, [
            ("cifar10-jpeg.tar.gz", lambda p: read_imagefolder_archive(p, None)),
            ("cifar10-jpeg", lambda p: read_imagefolder(p, None)),
            ("cifar10", lambda p: read_imagefolder(p, None)),
            # torchvision verifies the md5 of every batch before unpickling it
            ("cifar-10-batches-py", lambda p: from_torchvision(CIFAR10, p.parent, None, download=False)),
        ], lambda root: from_torchvision(CIFAR10, root, None, download=True))


class Cifar100(DatasetSource):
    """CIFAR-100; augmentation: random crop (padding 4) + horizontal flip (BackdoorBench: crop only)."""

    name = "cifar100"
    classes = 100
    version = "1"
    augmentation = Augmentation(crop_padding=4, hflip=True)
    summary = "CIFAR-100: ImageFolder tree under the data root, torchvision layout, or download"
    paper = "Krizhevsky, Learning Multiple Layers of Features from Tiny Images, 2009"
    Config = RootConfig

    def load(self) -> tuple[ImageSet, ImageSet]:
        from torchvision.datasets import CIFAR100

        return _search(self.name, self.config, [
            ("cifar100", lambda p: read_imagefolder(p, None)),
            ("cifar-100-python", lambda p: from_torchvision(CIFAR100, p.parent, None, download=False)),
        ], lambda root: from_torchvision(CIFAR100, root, None, download=True))


class SizedRootConfig(RootConfig):
    size: int = Field(default=32, gt=0, description="images are resized to size x size")


class Gtsrb(DatasetSource):
    """GTSRB; augmentation: random crop (padding 4), never a flip (as BackdoorBench).

    Version 2: images are no longer mirrored in training (version 1 flipped them,
    turning e.g. "keep right" into "keep left" under its label).
    """

    name = "gtsrb"
    classes = 43
    version = "2"
    augmentation = Augmentation(crop_padding=4, hflip=False)
    summary = "GTSRB traffic signs resized to `size` (32): ImageFolder tree, torchvision layout, or download"
    paper = "Stallkamp et al., The German Traffic Sign Recognition Benchmark, IJCNN 2011"
    Config = SizedRootConfig

    def load(self) -> tuple[ImageSet, ImageSet]:
        from torchvision.datasets import GTSRB

        size = self.config.size
        return _search(self.name, self.config, [
            ("gtsrb/train", lambda p: read_imagefolder(p.parent, size)),
            ("gtsrb/GTSRB", lambda p: from_torchvision(GTSRB, p.parent.parent, size, split="train", download=False)),
        ], lambda root: from_torchvision(GTSRB, root, size, split="train", download=True))


def _read_tiny_imagenet(root: Path, size: int) -> tuple[ImageSet, ImageSet]:
    """The original tiny-imagenet-200 layout: val/ labels come from val_annotations.txt."""
    if (root / "test").is_dir() and any((root / "test").iterdir()) and not (root / "val").is_dir():
        return read_imagefolder(root, size)

    train_files = {c.name: [(str(p.relative_to(c)), p) for p in sorted(c.rglob("*.JPEG"))]
                   for c in (root / "train").iterdir() if c.is_dir()}
    val_files: dict[str, list] = {c: [] for c in train_files}
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        fname, wnid = line.split("\t")[:2]
        val_files[wnid].append((fname, root / "val" / "images" / fname))
    (xtr, ytr, classes), (xte, yte, _) = split_from_files(train_files, size), split_from_files(val_files, size)
    return ImageSet(xtr, ytr, classes), ImageSet(xte, yte, classes)


class TinyImagenet(DatasetSource):
    """Tiny-ImageNet; augmentation: random crop (padding 4) + horizontal flip (BackdoorBench: crop only)."""

    name = "tiny_imagenet"
    classes = 200
    version = "1"
    augmentation = Augmentation(crop_padding=4, hflip=True)
    summary = "Tiny-ImageNet (200 classes, 64x64): tiny-imagenet-200 layout or an ImageFolder tree; no download"
    paper = "Le and Yang, Tiny ImageNet Visual Recognition Challenge, 2015"
    class Config(RootConfig):
        size: int = Field(default=64, gt=0)

    def load(self) -> tuple[ImageSet, ImageSet]:
        return _search(self.name, self.config, [
            ("tiny-imagenet-200", lambda p: _read_tiny_imagenet(p, self.config.size)),
            ("tiny_imagenet", lambda p: _read_tiny_imagenet(p, self.config.size)),
        ], None)


class ImageFolderConfig(SourceConfig):
    """Attributes:
        root: folder with ``train/<class>/`` and ``test/<class>/`` (or a .tar/.tar.gz of such a tree).
        size: images are resized to ``size x size``.
        crop_padding: the training augmentation's random-crop padding (0: no crop).
        hflip: mirror training images at random; set ``false`` when a mirrored image
            belongs to another class (signs, digits, text).
    """

    root: str
    size: int = Field(default=32, gt=0)
    crop_padding: int = Field(default=4, ge=0)
    hflip: bool = True


class ImageFolder(DatasetSource):
    """Any image-folder tree; its augmentation comes from its options (default crop + flip)."""

    name = "imagefolder"
    version = "1"
    summary = "any train/<class>/ + test/<class>/ tree (or its .tar.gz), resized to `size`"
    paper = "-"
    Config = ImageFolderConfig

    def train_augmentation(self) -> Augmentation:
        return Augmentation(crop_padding=self.config.crop_padding, hflip=self.config.hflip)

    def load(self) -> tuple[ImageSet, ImageSet]:
        root = Path(self.config.root).expanduser()
        if not root.exists():
            raise HarnessError(f"imagefolder root {root} does not exist; set options: {{root: PATH}} "
                               f"to a folder with train/<class>/ and test/<class>/")
        if root.is_file():
            return read_imagefolder_archive(root, self.config.size)
        return read_imagefolder(root, self.config.size)


@hookimpl
def harness_datasets():
    return [Cifar10, Cifar100, Gtsrb, TinyImagenet, ImageFolder]
