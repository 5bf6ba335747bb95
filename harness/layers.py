"""Finding a model's parts through its structure, for defenses.

Every helper here works on a :class:`~backdoor_harness.models.Normalized`
wrapper or a bare timm model, through timm's API (``forward_features``,
``forward_head``, ``get_classifier``) and module types, never through the
attribute names of one architecture.

Pruning convention: a pruned unit is expressed in the weights (zeroed), so
that the purified model survives a safetensors round trip into a fresh model
of the same architecture; a fine-tuning step that must not regrow it re-zeroes
it in ``fit(after_step=...)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import HarnessError
from .models import classifier

__all__ = ["classifier", "conv_norm_pairs", "features", "head", "norm_layers", "unwrap"]

NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def unwrap(model: nn.Module) -> nn.Module:
    """The timm network inside the normalization wrapper (or the model itself)."""
    return getattr(model, "net", model)


def _normalize(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "mean") and hasattr(model, "std") and hasattr(model, "net"):
        return (x - model.mean) / model.std
    return x


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last feature map (``[B, C, H, W]`` for CNNs, tokens for ViTs) of [0, 1] images."""
    net = unwrap(model)
    if not hasattr(net, "forward_features"):
        raise HarnessError(f"{type(net).__name__} has no forward_features(); this defense needs a timm model")
    return net.forward_features(_normalize(model, x))


def head(model: nn.Module, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """Logits (or the pooled features with ``pre_logits``) from :func:`features`' output."""
    return unwrap(model).forward_head(feats, pre_logits=pre_logits)


def norm_layers(model: nn.Module, kinds: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)
                ) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every normalization layer of the given kinds with an affine weight, in order."""
    return [(n, m) for n, m in unwrap(model).named_modules()
            if isinstance(m, kinds) and getattr(m, "weight", None) is not None]


def conv_norm_pairs(model: nn.Module) -> list[tuple[str, nn.Conv2d, nn.modules.batchnorm._BatchNorm]]:
    """Each Conv2d with the first BatchNorm that follows it in module order and normalizes its channels.

    This is the pairing BackdoorBench's CLP uses: exact for conv-BN-ReLU
    networks (ResNet, VGG-BN, MobileNet); in pre-activation blocks a conv's
    "following" norm is the next block's input norm, an approximation.
    """
    pairs, pending = [], None
    for name, m in unwrap(model).named_modules():
        if isinstance(m, nn.Conv2d):
            pending = (name, m)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and pending is not None:
            if pending[1].out_channels == m.num_features:
                pairs.append((pending[0], pending[1], m))
            pending = None
    return pairs
