"""Models: everything through ``timm.create_model``, adapted to small inputs.

The harness registers two models into timm's own registry (one namespace):
``preact_resnet18`` (the papers' CIFAR model, BackdoorBench's network
parameter for parameter) and ``tiny_cnn`` (fast CPU tests). A registered model
may declare an architecture version (:func:`model_version`), part of the keys
of the jobs that build it. Small inputs: CNN stems lose their ImageNet
downsampling (:func:`adapt_small_input`; timm's ``resnet18`` becomes the CIFAR
ResNet-18), vision transformers get ``img_size`` and a small patch
(:func:`vit_size_kwargs`).
Every model is wrapped by :class:`Normalized`, so models take float images in
``[0, 1]`` and normalization travels inside the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from timm.models import register_model

from .errors import HarnessError
from .plugin import NamedEntry
from .store import atomic_file

# --------------------------------------------------------------------------
# Models registered into timm
# --------------------------------------------------------------------------


class PreActBlock(nn.Module):
    """BackdoorBench's ``PreActBlock``: BN-ReLU-conv twice, a 1x1 conv shortcut
    (in an ``nn.Sequential``, as there) taken after the first BN-ReLU when the
    shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PooledLinearHead(nn.Module):
    """timm's classifier API (``forward_head``, ``get_classifier``,
    ``reset_classifier``) over global average pooling and a linear layer, the
    attribute named by ``head_name``."""

    head_name = "fc"

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.get_classifier()(x)

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.head_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        setattr(self, self.head_name, nn.Linear(self.num_features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class PreActResNet(PooledLinearHead):
    """BackdoorBench's PreAct-ResNet (``models/preact_resnet.py``; He et al.,
    ECCV 2016) for 32x32 inputs, layer for layer: a 3x3 stride-1 stem conv
    (no BN, no pool), four stages of pre-activation blocks (64-128-256-512,
    stride 1-2-2-2), global average pooling of the last block's output (a
    residual sum: no final BN or ReLU) and a linear classifier ``linear``.
    The state dict has BackdoorBench's key names (``conv1``, ``layer{i}.{j}.bn1``
    ... ``shortcut.0``, ``linear``). timm-style ``forward_features`` (the
    last block's output) / ``forward_head``.

    ``arch_version`` is part of the keys of the jobs that build it
    (:func:`model_version`): "2" is this network; "1" had an extra final
    BatchNorm + ReLU before the pooling.
    """

    family = "preact_resnet"
    arch_version = "2"
    head_name = "linear"

    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        stages, in_planes = [], 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = 512
        self.linear = nn.Linear(512, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TinyCNN(PooledLinearHead):
    """A small, fast VGG-style CNN for CPU tests and the quickstart (~0.3M params)."""

    family = "tiny_cnn"

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 32):
        super().__init__()
        w = width
        chans = [(in_chans, w, 1), (w, 2 * w, 2), (2 * w, 4 * w, 2), (4 * w, 8 * w, 2)]
        layers = []
        for cin, cout, stride in chans:
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.num_features = 8 * w
        self.fc = nn.Linear(8 * w, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)



def _strip_timm_kwargs(kwargs: dict) -> dict:
    """The keyword arguments of a harness model: what ``timm.create_model`` passes every entry
    point (its pretrained config) removed, so any other unknown argument is refused (a
    TypeError, reported by :func:`check_model_kwargs`), never silently ignored."""
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    return kwargs


#: The models the harness registers into timm, by name (see :func:`model_version`).
HARNESS_MODELS: dict[str, type[nn.Module]] = {"preact_resnet18": PreActResNet, "tiny_cnn": TinyCNN}


def model_version(name: str) -> str | None:
    """The architecture version a model registered by the harness declares
    (its class's ``arch_version``), or None (timm's own models, and harness
    models that declare none).

    A declared version is part of the keys of the jobs that build the model
    (train, and prepare jobs that train a clean model), so results of an
    earlier revision of the architecture are recomputed, never reused.
    """
    cls = HARNESS_MODELS.get(name)
    version = getattr(cls, "arch_version", None) if cls is not None else None
    return None if version is None else str(version)


@register_model
def preact_resnet18(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """PreAct-ResNet-18 for 32x32 inputs: BackdoorBench's default model, parameter for parameter."""
    if pretrained:
        raise HarnessError("preact_resnet18 has no pretrained weights; set pretrained: false")
    return PreActResNet((2, 2, 2, 2), **_strip_timm_kwargs(kwargs))


@register_model
def tiny_cnn(pretrained: bool = False, **kwargs: Any) -> TinyCNN:
    """A four-conv CNN for fast CPU runs."""
    if pretrained:
        raise HarnessError("tiny_cnn has no pretrained weights; set pretrained: false")
    return TinyCNN(**_strip_timm_kwargs(kwargs))


# --------------------------------------------------------------------------
# The wrapper and small-input adaptation
# --------------------------------------------------------------------------


class Normalized(nn.Module):
    """``net((x - mean) / std)``: normalization as the model's first layer.

    ``net`` is the timm model; defenses find its parts through timm's API
    (``forward_features``, ``get_classifier``) and module types, never by the
    attribute names of one architecture.
    """

    def __init__(self, net: nn.Module, mean, std, family: str):
        super().__init__()
        self.net = net
        self.family = family
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def num_classes(self) -> int | None:
        return getattr(self.net, "num_classes", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def _small_conv(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None)


def adapt_small_input(net: nn.Module, family: str) -> bool:
    """Remove the ImageNet stem's 4x downsampling so 32x32 inputs keep their resolution.

    Returns whether the family was recognised. ResNet-style (``conv1`` +
    ``maxpool``) and DenseNet stems get a 3x3 stride-1 conv and no pool, as the
    CIFAR variants of these networks do; EfficientNet/MobileNet stems get
    stride 1; VGG has no strided stem.
    """
    if family in ("resnet", "resnest", "regnet") and hasattr(net, "conv1") and hasattr(net, "maxpool"):
        if isinstance(net.conv1, nn.Conv2d):
            net.conv1 = _small_conv(net.conv1)
        else:  # deep stem: first conv loses its stride
            first = next(m for m in net.conv1.modules() if isinstance(m, nn.Conv2d))
            first.stride = (1, 1)
        net.maxpool = nn.Identity()
        return True
    if family == "densenet" and hasattr(net, "features") and hasattr(net.features, "conv0"):
        net.features.conv0 = _small_conv(net.features.conv0)
        if hasattr(net.features, "pool0"):
            net.features.pool0 = nn.Identity()
        return True
    if hasattr(net, "conv_stem") and isinstance(net.conv_stem, nn.Conv2d):  # efficientnet, mobilenet*
        net.conv_stem.stride = (1, 1)
        return True
    if family in ("vgg", "preact_resnet", "tiny_cnn"):
        return True
    return False


class ModelSpec(NamedEntry):
    """One model of a matrix.

    Attributes:
        name: any timm model name (``timm.list_models()``), including the
            harness's ``preact_resnet18`` and ``tiny_cnn``.
        pretrained: load timm's pretrained weights (downloaded when online).
        pretrained_file: or load them from this local file.
        kwargs: extra keyword arguments for ``timm.create_model``.
        adapt_stem: remove ImageNet stem downsampling for inputs below 100 px
            (see :func:`adapt_small_input`; for vision transformers, a smaller
            patch, see :func:`vit_size_kwargs`).
        label: names this entry in results (default: ``name``); not part of any job key.

    Vision transformers (timm's ``vision_transformer``, ``deit``, ``eva``,
    ``beit``, ``vision_transformer_relpos`` models) are built for the data
    set's image size: unless ``kwargs`` sets them, ``img_size`` is the image
    size and, below 100 px with ``adapt_stem``, ``patch_size`` is the largest
    divisor of the image size not above image size / 8, so the token grid is
    about 8x8 (32 px: patch 4, 8x8 tokens; 64 px: patch 8, 8x8 tokens); a
    ``kwargs`` that sets ``img_size``, ``patch_size`` or ``dynamic_img_size``
    turns the patch rule off (see :func:`vit_size_kwargs`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    pretrained: bool = False
    pretrained_file: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    adapt_stem: bool = True
    label: str | None = None

    @property
    def versions(self) -> dict[str, str]:
        """``{"model": version}`` when the model declares an architecture
        version (:func:`model_version`), else ``{}``: merged into the versions
        of the jobs that build it, so keys of undeclared models are unchanged."""
        version = model_version(self.name)
        return {} if version is None else {"model": version}


#: timm modules whose models take ``img_size`` and ``patch_size`` (the ViT family).
VIT_MODULES = frozenset({"vision_transformer", "deit", "eva", "beit", "vision_transformer_relpos"})


def is_vit(name: str) -> bool:
    """Whether timm's model ``name`` is a vision transformer built from ``img_size`` and ``patch_size``."""
    from timm.models import model_entrypoint

    return model_entrypoint(name).__module__.rsplit(".", 1)[-1] in VIT_MODULES


def vit_size_kwargs(name: str, image_size: int, kwargs: dict[str, Any], adapt: bool) -> dict[str, Any]:
    """The ``img_size`` / ``patch_size`` keyword arguments a vision transformer
    gets for ``image_size`` inputs besides the user's ``kwargs`` ({} for other models).

    The rule: ``img_size`` is ``image_size`` unless ``kwargs`` sets
    ``img_size`` or ``dynamic_img_size`` (timm's ViTs only accept the size they
    were built for). When ``kwargs`` sets none of ``img_size``, ``patch_size``,
    ``dynamic_img_size``, and with ``adapt`` and ``image_size`` below 100,
    ``patch_size`` is the largest divisor of ``image_size`` not above
    ``image_size // 8`` (at least 1): an 8x8 token grid at 32 px (patch 4) and
    64 px (patch 8) instead of the 2x2 / 4x4 a 16-pixel patch leaves. A user
    who sets any of them gets exactly what they set (so a spec that already
    ran keeps its network).
    """
    if not is_vit(name):
        return {}
    out: dict[str, Any] = {}
    if "img_size" not in kwargs and not kwargs.get("dynamic_img_size"):
        out["img_size"] = image_size
    if adapt and image_size < 100 and not {"img_size", "patch_size", "dynamic_img_size"} & set(kwargs):
        out["patch_size"] = max(p for p in range(1, max(1, image_size // 8) + 1) if image_size % p == 0)
    return out


def check_model_name(name: str) -> None:
    """Raise a did-you-mean HarnessError unless timm knows ``name``."""
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise HarnessError(f"unknown model {name!r}.{hint} Any name of timm.list_models() works.")


def check_model_kwargs(spec: ModelSpec) -> None:
    """Raise a HarnessError when the model's constructor does not take one of ``spec.kwargs``
    (a misspelt or unknown argument would otherwise be an error only at run time, or be
    silently ignored by a model that swallows extra arguments).

    Builds the model once on the ``meta`` device (no memory, no weights, nothing
    downloaded); only an argument error is reported here, anything else (a value the
    model cannot be built with for a data set) when the model is built for its data set.
    """
    if not spec.kwargs:
        return
    try:
        with torch.device("meta"):
            timm.create_model(spec.name, pretrained=False, num_classes=10, **spec.kwargs)
    except TypeError as exc:
        if "keyword argument" not in str(exc):
            return
        raise HarnessError(f"kwargs {sorted(spec.kwargs)}: model {spec.name!r} does not take them as given ({exc}); "
                           f"remove or rename the argument (num_classes comes from the data set)") from None
    except Exception:  # noqa: BLE001 - not an argument error: left to the build of the model for its data
        return


DEFAULT_MEAN, DEFAULT_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def create_model(spec: ModelSpec | str, num_classes: int, image_size: int,
                 mean=DEFAULT_MEAN, std=DEFAULT_STD) -> Normalized:
    """Build a (wrapped) model through ``timm.create_model``.

    ``mean``/``std`` are the normalization constants (the training set's
    statistics); pretrained models use their own (from timm's pretrained cfg).
    Below 100 px (with ``spec.adapt_stem``), CNN stems lose their ImageNet
    downsampling (:func:`adapt_small_input`). Vision transformers are built
    for ``image_size`` (``img_size``) and, below 100 px with ``adapt_stem``,
    with a patch of about image_size / 8 pixels (:func:`vit_size_kwargs`; 32 px:
    patch 4, an 8x8 token grid), unless ``spec.kwargs`` sets them.
    """
    spec = ModelSpec.model_validate(spec)
    check_model_name(spec.name)
    vit_kwargs = vit_size_kwargs(spec.name, image_size, spec.kwargs, spec.adapt_stem)
    kwargs = {**vit_kwargs, **spec.kwargs}
    pretrained = spec.pretrained or spec.pretrained_file is not None
    if spec.pretrained_file is not None:
        if not Path(spec.pretrained_file).exists():
            raise HarnessError(f"pretrained_file {spec.pretrained_file} of model {spec.name!r} does not exist")
        if not spec.pretrained_file.endswith(".safetensors"):
            # pickled weights can run code when loaded; only safetensors are read
            raise HarnessError(f"pretrained_file {spec.pretrained_file} must be a .safetensors file; convert it "
                               f"once where you trust it (safetensors.torch.save_file(torch.load(...), ...))")
        kwargs["pretrained_cfg_overlay"] = {"file": str(Path(spec.pretrained_file).resolve())}
    try:
        net = timm.create_model(spec.name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except HarnessError:
        raise
    except Exception as exc:
        if pretrained:
            raise HarnessError(
                f"could not load pretrained weights for {spec.name!r} ({type(exc).__name__}: {exc}). "
                f"Without network access, download them elsewhere and set pretrained_file: PATH "
                f"(timm's weights as a .safetensors file), or set pretrained: false.") from None
        raise HarnessError(f"timm could not create {spec.name!r} with {kwargs}: {exc}") from None
    family = getattr(net, "family", None) or type(net).__module__.rsplit(".", 1)[-1]
    if pretrained:
        cfg = getattr(net, "pretrained_cfg", {}) or {}
        mean, std = cfg.get("mean", mean), cfg.get("std", std)
    if spec.adapt_stem and image_size < 100 and not is_vit(spec.name) \
            and not adapt_small_input(net, family):
        import warnings

        warnings.warn(f"no small-input stem adaptation known for {spec.name!r} ({family}); using it as is")
    return Normalized(net, mean, std, family)


def classifier(model: nn.Module) -> nn.Linear:
    """The final linear layer of a model (through timm's ``get_classifier``).

    Works for a :class:`Normalized` wrapper or a bare timm model; when the
    classifier is a small module (timm's ``ClassifierHead``), its last
    ``nn.Linear``. Raises HarnessError when the model has none.
    """
    net = getattr(model, "net", model)
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if isinstance(head, nn.Module) else []
    if not linears:
        raise HarnessError(f"{type(net).__name__} has no linear classifier (get_classifier() gives "
                           f"{type(head).__name__}); this defense needs one")
    return linears[-1]


def model_family(model: nn.Module) -> str:
    return getattr(model, "family", None) or type(model).__module__.rsplit(".", 1)[-1]


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, on the [0, 1] scale."""
    x = images[: 10_000].float().div_(255)
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()


# --------------------------------------------------------------------------
# Checkpoints: safetensors only
# --------------------------------------------------------------------------


#: Key prefix of an attack's state (generated resources, a learned trigger
#: generator) stored in the same file as the model it trained.
ATTACK_PREFIX = "attack::"


def save_checkpoint(model: nn.Module | None, path: Path, attack_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model's state dict (and an attack's state under ``attack::``)
    atomically (:func:`~backdoor_harness.store.atomic_file`): never half-written, and no temporary
    file left behind by a full disk or an interrupt."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {} if model is None else dict(model.state_dict())
    state.update({ATTACK_PREFIX + k: v for k, v in (attack_state or {}).items()})
    with atomic_file(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, str(tmp))


def _read(path: Path, attack: bool) -> dict[str, torch.Tensor]:
    """The model's (``attack=False``) or the attack's tensors of a checkpoint (prefix stripped)."""
    from safetensors import safe_open

    n = len(ATTACK_PREFIX)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {(k[n:] if attack else k): f.get_tensor(k) for k in f.keys()
                    if k.startswith(ATTACK_PREFIX) == attack}
    except Exception as exc:
        raise HarnessError(f"checkpoint {path} is unreadable ({exc}); delete it and rerun to recompute") from None


def load_checkpoint(model: nn.Module, path: Path) -> nn.Module:
    """Load the model's weights from a checkpoint (an attack's state in it is left out)."""
    model.load_state_dict(_read(path, attack=False))
    return model


def load_attack_state(path: Path) -> dict[str, torch.Tensor]:
    """The attack's state stored in a checkpoint (empty when there is none)."""
    return _read(path, attack=True)
