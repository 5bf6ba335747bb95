"""Data sets as uint8 tensors: sources, decode cache, subsets, the defender's reserve.

A data set *source* (a plugin, see ``harness_datasets``) turns files into two
:class:`ImageSet` (train, test). The core decodes each source once, caches the
uint8 tensors as a safetensors file, and derives subsets and the defender's
reserve from them with seeded generators.

Augmentation is a property of the data set: each source declares the random
crop and flip its training images get (:class:`Augmentation`; GTSRB is never
mirrored, a mirrored traffic sign being another sign), the sets it loads carry
it (``ImageSet.augmentation``, kept by subsets and so by the defender's
reserve), and the trainer applies it unless the recipe overrides it.

Where data is looked for (first hit wins): ``$HARNESS_DATA``; else
``../shared/datasets`` next to the working directory or next to this checkout
(where development and CI keep it); else a torchvision download into the cache
(``$HARNESS_CACHE``, default ``~/.cache/backdoor-harness``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from .errors import HarnessError
from .plugin import NamedEntry, Plugin, PluginConfig
from .store import atomic_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


class Augmentation(BaseModel):
    """The random augmentation a data set's training images get, batch by batch, in the trainer.

    Attributes:
        crop_padding: random crop back to the image size out of the image zero-padded by
            this many pixels on every side (0: no crop).
        hflip: mirror each image left-right with probability 1/2. Off for data whose
            classes are not mirror-symmetric (traffic signs, digits, text).

    The default, crop with 4-pixel padding plus flip, is BackdoorBench's CIFAR-10
    train transform and what the trainer applied to every data set before data sets
    declared their own.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_padding: int = Field(default=4, ge=0)
    hflip: bool = True

    @property
    def active(self) -> bool:
        """Whether it changes any image (a crop or a flip)."""
        return self.crop_padding > 0 or self.hflip


@dataclass
class ImageSet:
    """Images and labels of one split.

    Attributes:
        images: uint8 ``[N, 3, H, W]``.
        labels: int64 ``[N]``.
        classes: class names, index = label.
        meta: extra per-sample tensors (e.g. ``true_labels`` of a poisoned test set).
        augmentation: the training augmentation of the data set these images come from
            (set by :func:`load_source` from the source's default, kept by :meth:`subset`);
            ``None`` where unknown, which the trainer treats as :class:`Augmentation`'s default.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    augmentation: Augmentation | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, index: torch.Tensor) -> "ImageSet":
        meta = {k: v[index] for k, v in self.meta.items() if isinstance(v, torch.Tensor)}
        return ImageSet(self.images[index], self.labels[index], self.classes, meta, self.augmentation)


# --------------------------------------------------------------------------
# Where things live
# --------------------------------------------------------------------------


def cache_dir() -> Path:
    path = Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "backdoor-harness"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _default_roots() -> list[Path]:
    """The data roots searched when ``$HARNESS_DATA`` is unset (existing or not)."""
    repo = Path(__file__).resolve().parent.parent
    roots = [Path.cwd().parent / "shared" / "datasets", repo.parent / "shared" / "datasets"]
    return list(dict.fromkeys(p.resolve() for p in roots))


def data_roots() -> list[Path]:
    """Candidate data roots, in the order they are searched."""
    if os.environ.get("HARNESS_DATA"):
        return [Path(os.environ["HARNESS_DATA"]).expanduser()]
    return [p for p in _default_roots() if p.is_dir()]


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


def _decode(data: bytes | Path, size: int | None) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def decode_all(items: list[bytes | Path], size: int | None) -> torch.Tensor:
    """Decode images in parallel threads (Pillow releases the GIL) into uint8 NCHW."""
    if not items:
        raise HarnessError("no images found to decode")
    # one task per chunk of images, not per image: 60,000 futures cost more than the decoding
    workers = os.cpu_count() or 1
    step = max(1, -(-len(items) // (4 * workers)))
    chunks = [items[i:i + step] for i in range(0, len(items), step)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = [a for chunk in pool.map(lambda c: [_decode(d, size) for d in c], chunks) for a in chunk]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise HarnessError(f"images have different sizes {sorted(shapes)[:3]}...; set `size` to resize them")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def split_from_files(files: dict[str, list], size: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    classes = sorted(files)
    items, labels = [], []
    for label, cls in enumerate(classes):
        members = sorted(files[cls], key=lambda m: m[0])
        items += [data for _, data in members]
        labels += [label] * len(members)
    return decode_all(items, size), torch.tensor(labels, dtype=torch.int64), classes


def read_imagefolder(root: Path, size: int | None) -> tuple[ImageSet, ImageSet]:
    """Read a ``train/<class>/*`` + ``test/<class>/*`` tree (files may sit in subfolders)."""
    splits = []
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            raise HarnessError(f"{root} has no {split}/ folder; an image-folder data set needs train/<class>/ and test/<class>/")
        files = {c.name: [(str(p.relative_to(c)), p) for p in c.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
                 for c in d.iterdir() if c.is_dir()}
        splits.append(split_from_files(files, size))
    (xtr, ytr, ctr), (xte, yte, cte) = splits
    if ctr != cte:
        raise HarnessError(f"{root}: train/ and test/ have different class folders")
    return ImageSet(xtr, ytr, ctr), ImageSet(xte, yte, cte)


def read_imagefolder_archive(path: Path, size: int | None) -> tuple[ImageSet, ImageSet]:
    """Read an image-folder tree straight out of a .tar(.gz) archive (``<top>/train/<class>/*``)."""
    files: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    with tarfile.open(path, "r|*") as tar:  # a stream: one pass, no seeking (faster than random access)
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or Path(member.name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            split_at = next((i for i, p in enumerate(parts) if p in files), None)
            if split_at is None or len(parts) < split_at + 3:
                continue
            split, cls = parts[split_at], parts[split_at + 1]
            files[split].setdefault(cls, []).append(("/".join(parts[split_at + 2:]), tar.extractfile(member).read()))
    (xtr, ytr, ctr), (xte, yte, cte) = (split_from_files(files[s], size) for s in ("train", "test"))
    return ImageSet(xtr, ytr, ctr), ImageSet(xte, yte, cte)


def from_torchvision(dataset_cls, root: Path, size: int | None, **kwargs) -> tuple[ImageSet, ImageSet]:
    """Decode a torchvision data set class (its own integrity checks apply)."""
    out = []
    for train in (True, False):
        extra = {"train": train} if "split" not in kwargs else {"split": "train" if train else "test"}
        ds = dataset_cls(str(root), **{**kwargs, **extra})
        xs, ys = [], []
        for img, label in ds:
            img = img.convert("RGB")
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            xs.append(np.asarray(img, dtype=np.uint8))
            ys.append(int(label))
        classes = list(getattr(ds, "classes", [str(i) for i in range(max(ys) + 1)]))
        out.append(ImageSet(torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(),
                            torch.tensor(ys, dtype=torch.int64), classes))
    return out[0], out[1]


# --------------------------------------------------------------------------
# Sources (plugins) and the spec of a data set in a matrix
# --------------------------------------------------------------------------


class SourceConfig(PluginConfig):
    """Base of a data-set source's ``Config``."""


class DatasetSource(Plugin):
    """A data-set source plugin: ``load(config) -> (train, test)``.

    Attributes:
        augmentation: the default training augmentation of the data set (random
            crop and horizontal flip, see :class:`Augmentation`). The sets it loads
            carry it, and the trainer applies it to every model trained on them
            (attacked, clean, and fine-tuned by a defense on the reserve); a
            recipe's ``crop_padding`` / ``hflip`` override it. A source whose
            config chooses the augmentation overrides :meth:`train_augmentation`.
            Changing it changes training: bump ``version``.
        classes: the number of classes, when the source knows it without loading
            anything (CIFAR-10: 10); ``None``: unknown until loaded. A source whose
            config decides overrides :meth:`num_classes`. Matrix validation checks
            attack targets against it.
    """

    kind: ClassVar[str] = "dataset"
    version: ClassVar[str] = "1"
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Config: ClassVar[type[SourceConfig]] = SourceConfig
    augmentation: ClassVar[Augmentation] = Augmentation()
    classes: ClassVar[int | None] = None

    def train_augmentation(self) -> Augmentation:
        """The augmentation of this source's images with its config (default: ``augmentation``)."""
        return self.augmentation

    def num_classes(self) -> int | None:
        """The class count, known without decoding anything: :attr:`classes`, else the count
        stored in this source's decode cache (when it was decoded before), else ``None``."""
        if self.classes is not None:
            return int(self.classes)
        return cached_num_classes(self)

    def check(self) -> None:
        """Cheap checks that the data can be found, run when a matrix is validated (never
        decode here). Raise :class:`HarnessError` saying what is missing and where it was
        looked for. The default: a ``root`` option, when the config has one and sets it,
        must exist; when it is unset (the data roots are searched), a ``$HARNESS_DATA``
        that is set must be a folder."""
        root = getattr(self.config, "root", None)
        if isinstance(root, str) and root:
            path = Path(root).expanduser()
            if not path.exists():
                raise HarnessError(f"options.root: {path} does not exist; set `root` to the folder (or archive) "
                                   f"holding the data set, or remove it to search the data roots")
        elif "root" in type(self.config).model_fields and os.environ.get("HARNESS_DATA"):
            env = Path(os.environ["HARNESS_DATA"]).expanduser()
            if not env.is_dir():
                raise HarnessError(f"HARNESS_DATA={env} is not a folder (the data root searched for {self.name!r} "
                                   f"when `root` is unset); point it at the folder holding the data sets, or unset "
                                   f"it to search {', '.join(str(p) for p in _default_roots())}")

    def load(self) -> tuple[ImageSet, ImageSet]:
        raise NotImplementedError


class DataSpec(NamedEntry):
    """One data set of a matrix.

    Attributes:
        name: a registered data-set source (``harness list datasets``).
        options: the source's own config (e.g. ``root`` and ``size`` for ``imagefolder``).
        train_per_class: keep only this many training images per class (seeded, fixed).
        test_per_class: the same for the test set.
        reserve_ratio: the defender's clean reserve as a fraction of the training set.
        reserve_per_class: or as a number of samples per class (overrides the
            ratio): paper 003's samples-per-class (SPC) protocol, e.g. 2, 10, 100.
        label: names this entry in results (default: ``name``), so one data set
            can appear with several reserves; not part of any job key.

    The attacked and clean models train on the whole training set whatever
    the reserve: entries that differ only in their reserve (or label) share
    those training jobs.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    train_per_class: int | None = Field(default=None, gt=0)
    test_per_class: int | None = Field(default=None, gt=0)
    reserve_ratio: float = Field(default=0.05, gt=0, lt=1)
    reserve_per_class: int | None = Field(default=None, gt=0)
    label: str | None = None

    def payloads(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(what the training data depends on, what the reserve depends on), JSON-able."""
        data = self.model_dump(mode="json", exclude={"label", "reserve_ratio", "reserve_per_class"})
        return data, self.model_dump(mode="json", include={"reserve_ratio", "reserve_per_class"})


def per_class_subset(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of ``n`` random samples of every class (all of a class if it has fewer)."""
    chosen = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=generator)[:n]])
    return torch.cat(chosen).sort().values


def reserve_indices(labels: torch.Tensor, spec: DataSpec, seed: int) -> torch.Tensor:
    """The defender's clean reserve: a uniform random ``reserve_ratio`` share of the
    training set (as BackdoorBench), or ``reserve_per_class`` samples of each class."""
    g = torch.Generator().manual_seed(10_007 + seed)
    if spec.reserve_per_class is not None:
        return per_class_subset(labels, spec.reserve_per_class, g)
    n = max(1, round(spec.reserve_ratio * len(labels)))
    return torch.randperm(len(labels), generator=g)[:n].sort().values


def validation_split(labels: torch.Tensor, fraction: float, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class (train, validation) indices, paper 003's protocol.

    Every class with at least two samples gives ``max(1, round(fraction * n))``
    of them to validation (10% by default; with 2 samples per class, one each);
    a class with a single sample keeps it for training.
    """
    train, val = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        k = max(1, round(fraction * len(idx))) if len(idx) >= 2 else 0
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


#: config fields that choose a source's augmentation, not its pixels: not part of the decode cache key
AUGMENTATION_FIELDS = frozenset(Augmentation.model_fields)


def _cache_key(source: DatasetSource) -> str:
    config = source.config.model_dump(mode="json", exclude=set(AUGMENTATION_FIELDS))
    blob = json.dumps([source.name, source.version, config], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_path(source: DatasetSource, create: bool = True) -> Path:
    base = cache_dir() if create else Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "backdoor-harness"))
    return base / "datasets" / f"{source.name}-{_cache_key(source)}.safetensors"


def cached_num_classes(source: DatasetSource) -> int | None:
    """The class count stored in ``source``'s decode cache (reads only its class list), or
    None when it was never decoded here (or the cache is unreadable)."""
    from safetensors import safe_open

    path = _cache_path(source, create=False)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return len(json.loads(f.get_tensor("classes_json").numpy().tobytes().decode()))
    except Exception:  # a truncated cache says nothing (it is recomputed when loaded)
        return None


def load_source(source: DatasetSource) -> tuple[ImageSet, ImageSet]:
    """Decode a source once; later calls read the cached uint8 tensors. Both sets carry
    the source's augmentation (:meth:`DatasetSource.train_augmentation`)."""
    train, test = _load_source(source)
    train.augmentation = test.augmentation = source.train_augmentation()
    return train, test


def _load_source(source: DatasetSource) -> tuple[ImageSet, ImageSet]:
    from safetensors.torch import load_file, save_file

    path = _cache_path(source)
    if path.exists():
        try:
            t = load_file(str(path))
            classes = json.loads(t.pop("classes_json").numpy().tobytes().decode())
            return (ImageSet(t["train_images"], t["train_labels"], classes),
                    ImageSet(t["test_images"], t["test_labels"], classes))
        except Exception:  # a truncated cache is recomputed, never used
            path.unlink(missing_ok=True)
    train, test = source.load()
    path.parent.mkdir(parents=True, exist_ok=True)
    classes = torch.frombuffer(bytearray(json.dumps(train.classes).encode()), dtype=torch.uint8)
    with atomic_file(path) as tmp:
        save_file({"train_images": train.images, "train_labels": train.labels, "test_images": test.images,
                   "test_labels": test.labels, "classes_json": classes}, str(tmp))
    return train, test


def load_dataset(spec: DataSpec) -> tuple[ImageSet, ImageSet]:
    """The train and test sets of a matrix data-set entry (subsets applied); its source is the one
    instance of this process for its name and options (:func:`~backdoor_harness.registry.instance`)."""
    from .registry import instance

    train, test = load_source(instance("dataset", spec.name, spec.options))
    g = torch.Generator().manual_seed(0)  # subsets are part of the data set, not of a seed
    if spec.train_per_class is not None:
        train = train.subset(per_class_subset(train.labels, spec.train_per_class, g))
    if spec.test_per_class is not None:
        test = test.subset(per_class_subset(test.labels, spec.test_per_class, g))
    return train, test
