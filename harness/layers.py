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

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import HarnessError
from .models import classifier

__all__ = ["BATCHNORM_FAMILIES", "CONV_FAMILIES", "SPATIAL_FAMILIES", "Call", "Capture", "ConvNormLink", "capture",
           "classifier", "conv_norm_links", "conv_norm_pairs", "eval_mode", "features", "head", "norm_layers",
           "unwrap"]

NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)

# Model families (``models.model_family``), for a defense's ``families``.

#: Convolutional networks whose last feature map is ``[B, C, H, W]``, with a conv-BatchNorm
#: structure and a head that pools the map before its first Linear layer: the families the
#: filter- and channel-pruning defenses are written for.
CONV_FAMILIES: frozenset[str] = frozenset({"resnet", "preact_resnet", "vgg", "efficientnet", "mobilenetv3",
                                           "densenet", "tiny_cnn"})
#: :data:`CONV_FAMILIES` and RegNet: the BatchNorm CNNs (for defenses that work on BatchNorm layers).
BATCHNORM_FAMILIES: frozenset[str] = CONV_FAMILIES | {"regnet"}
#: :data:`BATCHNORM_FAMILIES` and ConvNeXt (LayerNorm): the CNNs with spatial feature maps in
#: ``forward_features`` (a vision transformer's tokens have none).
SPATIAL_FAMILIES: frozenset[str] = BATCHNORM_FAMILIES | {"convnext"}


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


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; on exit (an error too) every submodule is back in
    the mode it had."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@dataclass
class Call:
    """One finished forward call of a captured module: its name (the key it was captured under),
    the module, its positional inputs and its output, as the module saw them (not copies: an
    in-place operation after the call shows in them)."""

    name: str
    module: nn.Module
    args: tuple
    output: Any


@dataclass
class Capture:
    """What :func:`capture` recorded: ``calls`` in the order the modules FINISHED (a module
    that contains another finishes after it); every call, so a module run twice is there twice."""

    calls: list[Call] = field(default_factory=list)

    def first(self) -> dict[str, Call]:
        """Name -> the first call of each module that ran."""
        out: dict[str, Call] = {}
        for c in self.calls:
            out.setdefault(c.name, c)
        return out

    def last(self) -> dict[str, Call]:
        """Name -> the last call of each module that ran."""
        return {c.name: c for c in self.calls}

    def names(self) -> list[str]:
        """The names of the calls, in order (repeated when a module ran more than once)."""
        return [c.name for c in self.calls]

    def clear(self) -> None:
        self.calls.clear()


@contextlib.contextmanager
def capture(model: nn.Module, modules: Mapping[str, nn.Module] | Iterable[tuple[str, nn.Module]], *,
            evaluate: bool = True) -> Iterator[Capture]:
    """Record the forward calls of ``modules`` (name -> module, e.g. a filtered
    ``unwrap(model).named_modules()``) while the block runs, through forward hooks.

    With ``evaluate`` (default) ``model`` runs in eval mode inside the block (see
    :func:`eval_mode`); ``evaluate=False`` leaves the modes alone (hooks kept during
    training). On exit, an error too, the hooks are removed and (with ``evaluate``) every
    submodule's train/eval mode is restored. Gradients are the caller's business
    (``torch.no_grad()`` for a probe pass).

    Example: the output of every Conv2d in one pass::

        convs = [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, nn.Conv2d)]
        with capture(model, convs) as cap, torch.no_grad():
            features(model, x)
        outputs = {n: c.output for n, c in cap.first().items()}
    """
    record = Capture()
    handles = []
    modes = eval_mode(model) if evaluate else contextlib.nullcontext(model)
    try:
        for name, module in (modules.items() if isinstance(modules, Mapping) else modules):
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: record.calls.append(Call(name, m, args, out))))
        with modes:
            yield record
    finally:
        for h in handles:
            h.remove()


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


@dataclass(frozen=True)
class ConvNormLink:
    """A BatchNorm that normalizes a conv's output channels: output channel k of
    ``conv`` is channel ``offset + k`` of ``norm``'s input.

    ``offset`` is 0 when the BatchNorm takes the conv's output itself; in a
    DenseNet, a layer's new channels reach every later layer's norm as a slice
    of a concatenation (and a transition's through a 2x2 average pool).
    ``exact`` says whether the link was seen in the data flow (False: the
    module-order approximation of :func:`conv_norm_pairs`).
    """

    conv_name: str
    conv: nn.Conv2d
    norm_name: str
    norm: nn.modules.batchnorm._BatchNorm
    offset: int
    exact: bool


def _fingerprint(x: torch.Tensor) -> torch.Tensor:
    """One float64 number per channel of ``x`` ([B, C, H, W]): a fixed random
    projection of the channel's values, to find equal channels fast."""
    g = torch.Generator().manual_seed(0)
    r = torch.rand(x.shape[0], 1, *x.shape[2:], generator=g, dtype=torch.float64).to(x.device)
    return (x.double() * r).sum((0, 2, 3))


def _offsets(norm_in: torch.Tensor, fp_in: torch.Tensor, conv_out: torch.Tensor, fp_out: torch.Tensor
             ) -> list[int]:
    """Offsets o with ``norm_in[:, o:o+K]`` equal to ``conv_out`` (K channels, the
    same spatial size; ``fp_*`` their fingerprints)."""
    c, k = norm_in.shape[1], conv_out.shape[1]
    if k > c:
        return []
    tol = 1e-6 * (fp_out.abs().max() + fp_in.abs().max() + 1e-12)
    hits = torch.nonzero((fp_in[: c - k + 1] - fp_out[0]).abs() <= tol).flatten().tolist()
    return [o for o in hits
            if ((fp_in[o:o + k] - fp_out).abs() <= tol).all()
            and torch.allclose(norm_in[:, o:o + k], conv_out, rtol=1e-5, atol=1e-6)]


def conv_norm_links(model: nn.Module, sample: torch.Tensor) -> list[ConvNormLink]:
    """Every (conv, BatchNorm) link of the data flow of ``features`` on ``sample``
    (float [0, 1] images; one eval-mode pass), then :func:`conv_norm_pairs`'
    module-order pair of each BatchNorm the data flow links to no conv.

    A BatchNorm is linked to a conv when a block of its input's channels equals
    the conv's output (or its average pool, when the spatial sizes differ by an
    integer factor): the conv-BN pairs of conv-BN-ReLU networks, and in a
    DenseNet each conv with every later norm that reads its channels out of a
    concatenation. On ResNet, VGG-BN, EfficientNet, MobileNet, the tiny CNN and
    the PreAct-ResNet this gives exactly :func:`conv_norm_pairs` (the
    pre-activation blocks' ``bn1``, which normalize conv + shortcut, keep its
    approximate module-order pair, ``exact=False``). Links come in module
    order of the BatchNorms, then of the convs.
    """
    net = unwrap(model)
    # the probe runs on a copy whose BatchNorms have random statistics and affine
    # parameters (a freshly initialised BN is nearly the identity, which would link
    # a conv to a BN two layers down); hooks clone, so in-place ops change nothing
    probe = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in unwrap(probe).modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t, lo in ((m.running_mean, -1.0), (m.running_var, 0.5), (m.weight, 0.5), (m.bias, -1.0)):
                    if t is not None:
                        t.copy_(torch.rand(t.shape, generator=g) * 1.5 + lo)
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    same: set[tuple[str, str]] = set()
    ids: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # the conv outputs themselves, so that their ids stay theirs

    def conv_hook(_m, _a, out, n):
        if n not in outputs:
            outputs[n], ids[id(out)] = out.detach().clone(), n
            alive.append(out)

    def norm_hook(_m, a, _o, n):
        if n not in inputs:
            inputs[n] = a[0].detach().clone()
            if id(a[0]) in ids:
                same.add((ids[id(a[0])], n))

    handles = []
    for name, m in unwrap(probe).named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(lambda _m, _a, out, n=name: conv_hook(_m, _a, out, n)))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_hook(lambda _m, a, _o, n=name: norm_hook(_m, a, _o, n)))
    try:
        with torch.no_grad():
            features(probe, sample.to(next(probe.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    modules = dict(net.named_modules())
    fallback = {id(bn): (name, conv) for name, conv, bn in conv_norm_pairs(model)}
    fp_out = {n: _fingerprint(o) for n, o in outputs.items() if o.ndim == 4}
    pooled: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    links = []
    for norm_name, norm in modules.items():
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            continue
        norm_in, found = inputs.get(norm_name), []
        if norm_in is not None and norm_in.ndim == 4:
            fp_in, (h, w) = _fingerprint(norm_in), norm_in.shape[2:]
            for conv_name, conv_out in outputs.items():
                if (conv_name, norm_name) in same:
                    offsets = [0]
                elif conv_name not in fp_out:
                    continue
                elif conv_out.shape[2:] == (h, w):
                    offsets = _offsets(norm_in, fp_in, conv_out, fp_out[conv_name])
                else:
                    ch, cw = conv_out.shape[2:]
                    if ch % h or cw % w or ch // h != cw // w:
                        continue
                    key = (conv_name, ch // h)
                    if key not in pooled:
                        out = F.avg_pool2d(conv_out, ch // h)
                        pooled[key] = (out, _fingerprint(out))
                    offsets = _offsets(norm_in, fp_in, *pooled[key])
                found += [ConvNormLink(conv_name, modules[conv_name], norm_name, norm, o, True) for o in offsets]
        if not found and id(norm) in fallback:
            conv_name, conv = fallback[id(norm)]
            found.append(ConvNormLink(conv_name, conv, norm_name, norm, 0, False))
        links += found
    order = {n: i for i, (n, _) in enumerate(net.named_modules())}
    return sorted(links, key=lambda link: (order[link.norm_name], order[link.conv_name], link.offset))
