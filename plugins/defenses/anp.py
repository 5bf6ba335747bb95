"""ANP (Adversarial Neuron Pruning): prune the BatchNorm neurons that adversarial neuron perturbations expose.

Paper: Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models",
NeurIPS 2021 (§3, Algorithm 1); authors' code ``csdongxian/ANP_backdoor``
(``optimize_mask_cifar.py``, ``prune_neuron_cifar.py``,
``models/anp_batchnorm.py``), ported to BackdoorBench as ``defense/anp.py``
(``config/defense/anp/config.yaml``).

A neuron is one channel of a BatchNorm layer (every BN layer with an affine
weight, found by ``layers.norm_layers``), with scale w_k and shift b_k. ANP
gives it a mask m_k in [0, 1] and, while optimising, multiplicative
perturbations delta_k (of the scale) and xi_k (of the shift), both bounded by
eps: the neuron computes BN with scale (m_k + delta_k) * w_k and shift
(1 + xi_k) * b_k.

Algorithm:
1. copy the attacked model; m <- 1 for every neuron; the mask optimiser is SGD
   (``lr``, ``momentum``) on m alone (the weights stay frozen);
2. for each of ``iterations`` iterations:
   a. draw ``batch_size`` reserve images uniformly with replacement and
      augment them (random crop + flip); the model is in train mode (BN uses
      batch statistics);
   b. (if eps > 0) draw delta, xi ~ U(-eps, eps); then ``anp_steps`` times:
      delta <- clip_eps(delta + (eps / anp_steps) * sign(grad_delta L)) and
      the same for xi, L the cross-entropy of the model with scale
      (m + delta) * w and shift (1 + xi) * b: one signed ascent step of size
      eps by default, projected back onto [-eps, eps];
   c. L_nat = CE at scale m * w, shift b; L_rob = CE at scale (m + delta) * w,
      shift (1 + xi) * b (delta, xi fixed); one SGD step on m with
      alpha * L_nat + (1 - alpha) * L_rob (L_rob = 0 when eps = 0);
   d. clip m to [0, 1];
3. prune: every neuron with m_k < ``threshold`` gets its BN scale and shift
   set to zero (its channel outputs 0 before the activation); the other
   weights, and all BN running statistics, are the attacked model's.

Defaults (CIFAR-10; the paper's §4.1 and the authors' code, which
BackdoorBench's config keeps): eps 0.4, alpha 0.2, ``anp_steps`` 1, mask lr
0.2 with momentum 0.9, 2000 iterations of batch 128, and the fixed pruning
threshold 0.2 (the paper prunes by threshold 0.2 in its main experiments).
The data are the harness's reserve (5% of the training set, as BackdoorBench's
``ratio``; the paper optimises on 1%).

Departures:
- Projection: the code starts delta, xi in U(-eps, eps) and takes one signed
  step of eps without projecting, so |delta| can reach 2 eps; here every step
  is projected onto [-eps, eps], the budget the paper's formulation states.
- Pruned shift: the paper and both codes prune by zeroing the BN scale only
  (the mask multiplies the scale), leaving the channel at the constant
  relu(b_k). By default this zeroes scale AND shift (the harness's pruning
  convention: a pruned channel outputs nothing); ``prune_bias: false`` gives
  the code's rule.
- Threshold rule: strict ``m < threshold`` (the code prunes ``m <= threshold``),
  so threshold 0 prunes nothing. BackdoorBench sweeps thresholds up to 0.9 and
  keeps the model with the lowest *test* ASR whose test accuracy dropped by
  less than 10%; a defense here never sees test data, so the paper's fixed
  threshold is used.
- Masks and perturbations never become modules: each pass substitutes the BN
  scale and shift through ``torch.func.functional_call`` on a working copy
  (whose running statistics the train-mode passes update, as the code's do);
  the returned model is a fresh copy of the attacked one, pruned.
- Random draws (batches, augmentation, the perturbations' start) come from
  ``ctx.generator``; on CUDA every pass runs under bf16 autocast (as the
  harness's ``fit``). Train mode also enables dropout where a model has it,
  drawn from torch's global generator, as in ``fit``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call

from backdoor_harness import Defense, PluginConfig, hookimpl
from backdoor_harness.errors import HarnessError
from backdoor_harness.layers import norm_layers
from backdoor_harness.train import random_crop_flip, to_float


class ANPConfig(PluginConfig):
    """Attributes:
        iterations: mask-optimisation steps (mini-batches).
        batch_size: images per step, drawn uniformly with replacement.
        lr: SGD learning rate of the masks (constant).
        momentum: SGD momentum of the masks.
        eps: perturbation budget: |delta|, |xi| <= eps (0: no perturbation).
        anp_steps: signed ascent steps of size eps / anp_steps per batch.
        alpha: weight of the natural loss; 1 - alpha weighs the perturbed loss.
        threshold: neurons whose mask ends below it are pruned (0: none).
        prune_bias: zero the pruned neurons' BN shift as well as their scale
            (false: the scale only, as the authors' code).
        augment: random crop (4-pixel padding) + horizontal flip of each batch.
    """

    iterations: int = Field(default=2000, gt=0)
    batch_size: int = Field(default=128, gt=0)
    lr: float = Field(default=0.2, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    eps: float = Field(default=0.4, ge=0)
    anp_steps: int = Field(default=1, gt=0)
    alpha: float = Field(default=0.2, ge=0, le=1)
    threshold: float = Field(default=0.2, ge=0, le=1)
    prune_bias: bool = True
    augment: bool = True


@dataclass
class NeuronMasks:
    """What the mask optimisation ends with, per BN layer (``norm_layers`` names), on the CPU.

    Attributes:
        masks: m, in [0, 1].
        delta: the last batch's perturbation of the scale.
        xi: the last batch's perturbation of the shift.
    """

    masks: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    xi: dict[str, torch.Tensor]


class PerturbedBatchNorm:
    """Forward passes of a model with its BN scales and shifts substituted.

    Scale (m + delta) * w and shift (1 + xi) * b for every BN layer with an
    affine weight, through ``functional_call``: nothing is added to the model.

    Args:
        model: the model (any wrapper; BN layers are found with ``norm_layers``).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        found = norm_layers(model)
        if not found:
            raise HarnessError(f"ANP needs BatchNorm layers; {type(model).__name__} has none")
        full = {id(m): n for n, m in model.named_modules()}
        #: (norm_layers name, full name in ``model``, module)
        self.layers = [(name, full[id(m)], m) for name, m in found]

    def sizes(self) -> list[int]:
        return [m.num_features for _, _, m in self.layers]

    def __call__(self, x: torch.Tensor, masks: list[torch.Tensor], delta: list[torch.Tensor] | None = None,
                 xi: list[torch.Tensor] | None = None) -> torch.Tensor:
        params = {}
        for i, (_, full, bn) in enumerate(self.layers):
            scale = masks[i] if delta is None else masks[i] + delta[i]
            params[full + ".weight"] = bn.weight * scale
            if bn.bias is not None:
                params[full + ".bias"] = bn.bias if xi is None else bn.bias * (1 + xi[i])
        return functional_call(self.model, params, (x,))


def optimize_masks(model: nn.Module, reserve_images: torch.Tensor, reserve_labels: torch.Tensor,
                   cfg: ANPConfig, device: torch.device, generator: torch.Generator) -> NeuronMasks:
    """Steps 1-2: learn the neuron masks on a working copy of ``model`` (left untouched)."""
    work = copy.deepcopy(model).to(device)
    cuda = device.type == "cuda"
    if cuda:
        work.to(memory_format=torch.channels_last)
    work.train()
    for p in work.parameters():
        p.requires_grad_(False)
    net = PerturbedBatchNorm(work)
    sizes = net.sizes()
    masks = [torch.ones(s, device=device, requires_grad=True) for s in sizes]
    opt = torch.optim.SGD(masks, lr=cfg.lr, momentum=cfg.momentum)
    images, labels = reserve_images.to(device), reserve_labels.to(device)
    n, eps, step = len(labels), cfg.eps, cfg.eps / cfg.anp_steps
    if n == 0:
        raise HarnessError("ANP: the reserve is empty")
    delta = xi = [torch.zeros(s, device=device) for s in sizes]

    def ce(x, y, d=None, e=None):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            return F.cross_entropy(net(x, masks, d, e), y)

    for _ in range(cfg.iterations):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=generator).to(device)
        xb, y = images[idx], labels[idx]
        if cfg.augment:
            xb = random_crop_flip(xb, generator)
        x = to_float(xb, cuda)
        if eps > 0:
            start = (torch.rand(2 * sum(sizes), generator=generator) * 2 - 1).mul_(eps).to(device)
            delta = list(start[: sum(sizes)].split(sizes))
            xi = list(start[sum(sizes):].split(sizes))
            for _ in range(cfg.anp_steps):
                for t in delta + xi:
                    t.requires_grad_(True)
                grads = torch.autograd.grad(ce(x, y, delta, xi), delta + xi)
                with torch.no_grad():
                    moved = [(t + step * g.sign()).clamp_(-eps, eps) for t, g in zip(delta + xi, grads)]
                delta, xi = moved[: len(sizes)], moved[len(sizes):]
            loss = cfg.alpha * ce(x, y) + (1 - cfg.alpha) * ce(x, y, delta, xi)
        else:
            loss = ce(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for m in masks:
                m.clamp_(0, 1)
    names = [name for name, _, _ in net.layers]
    cpu = lambda ts: {k: t.detach().float().cpu() for k, t in zip(names, ts)}  # noqa: E731
    return NeuronMasks(cpu(masks), cpu(delta), cpu(xi))


@torch.no_grad()
def prune_neurons(model: nn.Module, masks: dict[str, torch.Tensor], threshold: float,
                  prune_bias: bool = True) -> int:
    """Step 3, in place: zero the BN scale (and shift) of every neuron with mask < threshold.

    Returns the number of pruned neurons.
    """
    count = 0
    for name, bn in norm_layers(model):
        cut = (masks[name] < threshold).to(bn.weight.device)
        bn.weight[cut] = 0
        if prune_bias and bn.bias is not None:
            bn.bias[cut] = 0
        count += int(cut.sum())
    return count


class ANP(Defense):
    name = "anp"
    version = "1"
    summary = "Adversarial Neuron Pruning: masks on BN neurons under adversarial neuron perturbation, prune m < 0.2"
    paper = "Wu & Wang, Adversarial Neuron Pruning Purifies Backdoored Deep Models, NeurIPS 2021"
    Config = ANPConfig
    needs = frozenset()
    #: BatchNorm networks (ViT and ConvNeXt use LayerNorm: not supported)
    families = frozenset({"resnet", "preact_resnet", "vgg", "efficientnet", "mobilenetv3", "densenet", "regnet",
                          "tiny_cnn"})

    def optimize_masks(self, model: nn.Module, ctx) -> NeuronMasks:
        """Steps 1-2 on the reserve, with ``ctx``'s device and generator."""
        return optimize_masks(model, ctx.reserve.images, ctx.reserve.labels, self.config, ctx.device, ctx.generator)

    def purify(self, model, ctx):
        model = copy.deepcopy(model)
        found = self.optimize_masks(model, ctx)
        prune_neurons(model, found.masks, self.config.threshold, self.config.prune_bias)
        return model.to(ctx.device).eval()


@hookimpl
def harness_defenses():
    return [ANP]
