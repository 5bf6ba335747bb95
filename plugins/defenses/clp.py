"""CLP (Channel Lipschitzness-based Pruning): data-free pruning of channels with an outlying Lipschitz bound.

Paper: Zheng, Tang, Li and Liu, "Data-Free Backdoor Removal Based on Channel
Lipschitzness", ECCV 2022 (§3.3-3.4); authors' code
``rkteddy/channel-Lipschitzness-based-pruning`` (``defense.py``, function
``CLP``; ``test.py``), ported to BackdoorBench as ``defense/clp.py``
(``config/defense/clp/config.yaml``).

A channel k of a convolution followed by a BatchNorm computes, up to the BN
shift, (gamma_k / sigma_k) * (W_k * x), W_k its filter (in_channels/groups x
kh x kw) and sigma_k = sqrt(running_var_k + eps). Its upper bound of the
channel Lipschitz constant (UCLC) is the spectral norm of that filter,
reshaped to an (in_channels/groups) x (kh * kw) matrix, times |gamma_k| / sigma_k.
Backdoor channels, which must respond strongly to a small trigger, have
outlying UCLCs within their layer.

Algorithm (no data, no training):
1. copy the attacked model;
2. for each convolution and each BatchNorm that normalizes its output
   channels (``layers.conv_norm_links``): compute UCLC_k for every channel k
   of the conv, with that BatchNorm's gamma and sigma of the channel it
   reads conv channel k into;
3. in that layer, prune every channel with UCLC_k > mean + u * std (the mean
   and the unbiased standard deviation of the layer's UCLCs): set the BN's
   weight gamma and bias beta of that channel to 0 (the channel then outputs
   0 before the activation);
4. return the model (eval mode).

Defaults: u = 3, the authors' ``test.py`` default and BackdoorBench's ``u: 3``
(the paper's CIFAR-10 setting). Nothing else is tunable in the method.

Notes:
- A layer of n channels can only have a channel beyond mean + u * std when
  (n - 1) / sqrt(n) > u (the largest z-score one value can reach with the
  unbiased std): with u = 3, layers of 10 channels or fewer are never pruned.
- A layer with one channel has no std (NaN) and is never pruned.

Departures:
- sigma_k = sqrt(running_var_k + eps), the BatchNorm's actual scale; the
  code divides by sqrt(running_var_k) without eps. ``bn_eps: false`` gives
  the code's rule (the two differ only for channels with running variance
  near eps, e.g. dead channels).
- Pairing: ``layers.conv_norm_links`` follows the data flow of one forward
  pass on random inputs of the reserve's image shape (no data is read; only
  the shape): a BatchNorm is linked to every conv whose output channels it
  normalizes, directly or as a slice of a concatenation (through an average
  pool when the sizes differ); a BatchNorm linked to no conv keeps the
  module-order pair of ``layers.conv_norm_pairs`` (the LAST conv before it,
  when nothing else intervenes and the channel counts match). The code pairs
  every BatchNorm2d with the last Conv2d seen, even across other BatchNorms.
  All three are the same for conv-BN-activation networks (ResNet, VGG-BN,
  EfficientNet, MobileNet, the tiny CNN); in pre-activation blocks the BN
  after a conv in module order is the next block's input norm, which
  normalises conv + shortcut: an approximation in all.
- DenseNet (BN-ReLU-conv layers whose outputs are concatenated): a layer's
  new channels are normalized by every later layer's ``norm1`` of its block
  and by the transition (or final) norm, each with its own gamma and sigma.
  Each (conv, BatchNorm) link is a CLP layer of its own: UCLC_k with that
  BN's scale of conv channel k, the outlier rule among the conv's channels,
  and pruning zeroes that BN's channel (so a channel can be pruned for one
  reader and kept for another). The code cannot run on a DenseNet (its
  pairing indexes a BN of the concatenated width with a conv of the growth
  width).
- Version 2 declares DenseNet and pairs through the data flow (version 1
  skipped DenseNet; on the families it declared, both versions prune the same
  channels: the bump makes DenseNet's skipped cells run).
- Families: vision transformers are not declared: they have no BatchNorm
  (their one conv, the patch embedding, has none after it), so there is no
  channel Lipschitz bound to compute.
- UCLCs are computed on the CPU in float64 (the code: float32 ``torch.svd``
  on the CPU).
- BackdoorBench also sweeps u over 0..10 against the TEST set for its plots;
  that needs test data and is not part of the defense.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from pydantic import Field

from backdoor_harness.toolkit import (CONV_FAMILIES, ConvNormLink, Defense, HarnessError, PluginConfig, Purified,
                                      conv_norm_links, hookimpl, unwrap)

__all__ = ["CLP", "CLPConfig", "channel_lipschitz", "clp_links", "clp_prune", "outlying_channels", "probe_input"]


class CLPConfig(PluginConfig):
    """Attributes:
        u: threshold: a channel is pruned when its UCLC exceeds the layer's
            mean + u * std.
        bn_eps: include the BatchNorm's eps in sigma = sqrt(running_var + eps)
            (false: sqrt(running_var), as the authors' code).
    """

    u: float = Field(default=3.0, ge=0)
    bn_eps: bool = True


def channel_lipschitz(conv: nn.Conv2d, norm: nn.modules.batchnorm._BatchNorm, bn_eps: bool = True,
                      offset: int = 0) -> torch.Tensor:
    """UCLC_k of every output channel k of ``conv`` read by ``norm`` as its
    channel ``offset + k``: ||W_k||_2 * |gamma_j| / sqrt(running_var_j (+ eps)),
    j = offset + k, W_k = conv.weight[k] reshaped to (in_channels/groups, kh * kw);
    float64, on the CPU."""
    if norm.running_var is None:
        raise HarnessError("CLP needs BatchNorm running statistics (track_running_stats)")
    w = conv.weight.detach().to("cpu", torch.float64)
    spectral = torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)
    j = slice(offset, offset + w.shape[0])
    var = norm.running_var.detach().to("cpu", torch.float64)[j]
    sigma = torch.sqrt(var + norm.eps) if bn_eps else torch.sqrt(var)
    gamma = (norm.weight.detach().to("cpu", torch.float64)[j] if norm.weight is not None
             else torch.ones_like(var))
    return spectral * gamma.abs() / sigma


def outlying_channels(uclc: torch.Tensor, u: float) -> torch.Tensor:
    """Indices k with UCLC_k > mean + u * std (unbiased std; none for one channel)."""
    if uclc.numel() < 2:
        return torch.zeros(0, dtype=torch.long)
    return torch.nonzero(uclc > uclc.mean() + u * uclc.std()).flatten()


def probe_input(shape: tuple[int, ...] = (3, 32, 32)) -> torch.Tensor:
    """The fixed random images (2 of ``shape``, [0, 1]) on which the conv-BN links
    are traced: no data, and no draw from any generator the caller holds."""
    return torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))


def clp_links(model: nn.Module, shape: tuple[int, ...] = (3, 32, 32)) -> list[ConvNormLink]:
    """The (conv, BatchNorm) links CLP prunes through, for inputs of ``shape``."""
    return conv_norm_links(model, probe_input(shape))


@torch.no_grad()
def clp_prune(model: nn.Module, u: float, bn_eps: bool = True, shape: tuple[int, ...] = (3, 32, 32)
              ) -> dict[str, list[int]]:
    """Steps 2-3 on ``model`` in place (inputs of ``shape``): BN module name (in
    ``layers.unwrap(model)``) -> the BN channels whose weight and bias were
    zeroed, in increasing order (every linked BN listed)."""
    pruned: dict[str, set[int]] = {}
    for link in clp_links(model, shape):
        norm = link.norm
        index = outlying_channels(channel_lipschitz(link.conv, norm, bn_eps, link.offset), u) + link.offset
        if len(index):
            if norm.weight is None:
                raise HarnessError(f"CLP: BatchNorm {link.norm_name!r} has no affine weight to prune")
            idx = index.to(norm.weight.device)
            norm.weight.index_fill_(0, idx, 0)
            if norm.bias is not None:
                norm.bias.index_fill_(0, idx, 0)
        pruned.setdefault(link.norm_name, set()).update(index.tolist())
    return {name: sorted(channels) for name, channels in pruned.items()}


class CLP(Defense):
    """CLP. ``purify``'s report says what it did:
    {"pruned": {BN name: [channel, ...]} for every linked BN, "count": channels pruned in all}."""

    name = "clp"
    version = "2"
    summary = "CLP: data-free; zero the BN channels whose Lipschitz upper bound is a within-layer outlier"
    paper = ("Zheng, Tang, Li, Liu, Data-Free Backdoor Removal Based on Channel Lipschitzness, ECCV 2022 "
             "(github.com/rkteddy/channel-Lipschitzness-based-pruning)")
    Config = CLPConfig
    families = CONV_FAMILIES

    def purify(self, model, ctx):
        model = copy.deepcopy(model).to(ctx.device).eval()
        shape = tuple(ctx.reserve.images.shape[1:])  # the image shape only: CLP reads no data
        pruned = clp_prune(model, self.config.u, self.config.bn_eps, shape)
        if not pruned:  # every linked BN is listed, pruned or not
            raise HarnessError(f"clp: {type(unwrap(model)).__name__} has no convolution followed by a BatchNorm")
        return Purified(model, {"pruned": pruned, "count": sum(len(v) for v in pruned.values())})


@hookimpl
def harness_defenses():
    return [CLP]
