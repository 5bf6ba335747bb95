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
2. for each convolution and the BatchNorm that follows it
   (``layers.conv_norm_pairs``): compute UCLC_k for every channel k;
3. in that layer, prune every channel with UCLC_k > mean + u * std (the mean
   and the unbiased standard deviation of the layer's UCLCs): set its BN
   weight gamma_k and bias beta_k to 0 (the channel then outputs 0 before the
   activation);
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
- Pairing: ``layers.conv_norm_pairs`` pairs a BatchNorm with the LAST conv
  before it in module order only when nothing else intervenes and the channel
  counts match; the code pairs every BatchNorm2d with the last Conv2d seen,
  even across other BatchNorms. Both are exact for conv-BN-activation
  networks (ResNet, VGG-BN, MobileNet, the tiny CNN); in pre-activation
  blocks the BN after a conv in module order is the next block's input norm,
  which normalises conv + shortcut: an approximation in both.
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

from backdoor_harness import Defense, PluginConfig, hookimpl
from backdoor_harness.errors import HarnessError
from backdoor_harness.layers import conv_norm_pairs, unwrap

__all__ = ["CLP", "CLPConfig", "channel_lipschitz", "clp_prune", "outlying_channels"]


class CLPConfig(PluginConfig):
    """Attributes:
        u: threshold: a channel is pruned when its UCLC exceeds the layer's
            mean + u * std.
        bn_eps: include the BatchNorm's eps in sigma = sqrt(running_var + eps)
            (false: sqrt(running_var), as the authors' code).
    """

    u: float = Field(default=3.0, ge=0)
    bn_eps: bool = True


def channel_lipschitz(conv: nn.Conv2d, norm: nn.modules.batchnorm._BatchNorm, bn_eps: bool = True
                      ) -> torch.Tensor:
    """UCLC_k of every output channel k of ``conv`` followed by ``norm``:
    ||W_k||_2 * |gamma_k| / sqrt(running_var_k (+ eps)), W_k = conv.weight[k]
    reshaped to (in_channels/groups, kh * kw); float64, on the CPU."""
    if norm.running_var is None:
        raise HarnessError("CLP needs BatchNorm running statistics (track_running_stats)")
    w = conv.weight.detach().to("cpu", torch.float64)
    spectral = torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)
    var = norm.running_var.detach().to("cpu", torch.float64)
    sigma = torch.sqrt(var + norm.eps) if bn_eps else torch.sqrt(var)
    gamma = (norm.weight.detach().to("cpu", torch.float64) if norm.weight is not None
             else torch.ones_like(var))
    return spectral * gamma.abs() / sigma


def outlying_channels(uclc: torch.Tensor, u: float) -> torch.Tensor:
    """Indices k with UCLC_k > mean + u * std (unbiased std; none for one channel)."""
    if uclc.numel() < 2:
        return torch.zeros(0, dtype=torch.long)
    return torch.nonzero(uclc > uclc.mean() + u * uclc.std()).flatten()


@torch.no_grad()
def clp_prune(model: nn.Module, u: float, bn_eps: bool = True) -> dict[str, list[int]]:
    """Steps 2-3 on ``model`` in place: BN module name (in ``layers.unwrap(model)``)
    -> the channels whose BN weight and bias were zeroed (every pair listed)."""
    names = {id(m): n for n, m in unwrap(model).named_modules()}
    pruned: dict[str, list[int]] = {}
    for _conv_name, conv, norm in conv_norm_pairs(model):
        index = outlying_channels(channel_lipschitz(conv, norm, bn_eps), u)
        if len(index):
            if norm.weight is None:
                raise HarnessError(f"CLP: BatchNorm {names[id(norm)]!r} has no affine weight to prune")
            idx = index.to(norm.weight.device)
            norm.weight.index_fill_(0, idx, 0)
            if norm.bias is not None:
                norm.bias.index_fill_(0, idx, 0)
        pruned[names[id(norm)]] = index.tolist()
    return pruned


class CLP(Defense):
    """CLP. After ``purify``, ``last_report`` holds what it did:
    {"pruned": {BN name: [channel, ...]} for every conv-BN pair, "count": channels pruned in all}."""

    name = "clp"
    version = "1"
    summary = "CLP: data-free; zero the BN channels whose Lipschitz upper bound is a within-layer outlier"
    paper = ("Zheng, Tang, Li, Liu, Data-Free Backdoor Removal Based on Channel Lipschitzness, ECCV 2022 "
             "(github.com/rkteddy/channel-Lipschitzness-based-pruning)")
    Config = CLPConfig
    families = frozenset({"resnet", "preact_resnet", "vgg", "efficientnet", "mobilenetv3", "tiny_cnn"})

    last_report: dict | None = None

    def purify(self, model, ctx):
        model = copy.deepcopy(model).to(ctx.device).eval()
        if not conv_norm_pairs(model):
            raise HarnessError(f"clp: {type(unwrap(model)).__name__} has no convolution followed by a BatchNorm")
        pruned = clp_prune(model, self.config.u, self.config.bn_eps)
        self.last_report = {"pruned": pruned, "count": sum(len(v) for v in pruned.values())}
        return model


@hookimpl
def harness_defenses():
    return [CLP]
