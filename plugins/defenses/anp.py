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
1. with more than one candidate threshold, split the reserve into a training
   and a validation part (``ctx.split(val_ratio)``, paper 003's per-class
   rule; with ``val_ratio`` 0 the whole reserve is both); with a single
   threshold there is nothing to choose and the masks use the whole reserve;
2. copy the attacked model; m <- 1 for every neuron; the mask optimiser is SGD
   (``lr``, ``momentum``) on m alone (the weights stay frozen);
3. for each of ``iterations`` iterations:
   a. draw ``batch_size`` training-part images uniformly with replacement and
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
4. pruning at threshold t: every neuron with m_k < t gets its BN scale and
   shift set to zero (its channel outputs 0 before the activation); the other
   weights, and all BN running statistics, are the attacked model's. A higher
   t prunes more (the pruned sets are nested);
5. selection (more than one threshold): A0 = validation accuracy of the
   attacked model (eval mode); for every t of ``thresholds``, A_t = validation
   accuracy of the model pruned at t. A candidate is admissible when
   A0 - A_t < ``acc_ratio`` * A0 (a relative drop below ``acc_ratio``) or
   A_t >= A0. The returned model is pruned at the LARGEST admissible t (the
   most pruning); if none is admissible, the attacked model is returned
   unpruned. A single threshold is used as it is (the fixed-threshold rule).

Defaults (CIFAR-10; the paper's §4.1 and the authors' code): eps 0.4,
alpha 0.2, ``anp_steps`` 1, mask lr 0.2 with momentum 0.9, 2000 iterations of
batch 128 (BackdoorBench's current ``config/defense/anp/config.yaml`` keeps
eps, alpha, steps and iterations but its ``lr`` 0.01 and ``batch_size`` 256,
which its ANP uses for the masks, are its generic defense settings; older
versions of that file had lr 0.2). The data are the harness's reserve (5% of
the training set, as BackdoorBench's ``ratio``; the paper optimises on 1%),
of which the masks see the training part when thresholds are selected.
Threshold grid 0.4, 0.45, ..., 0.9: paper 000's range (its Appendix B:
ANP's threshold ranges from 0.4 to 0.9 and the best result is reported) at
BackdoorBench's step (``pruning_by: threshold``, ``pruning_max: 0.9``,
``pruning_step: 0.05``); ``acc_ratio`` 0.1 is BackdoorBench's tolerance;
``val_ratio`` 0.1 is paper 003's validation share (as the harness's ``fp``).
``thresholds: [0.2]`` gives the ANP paper's fixed threshold of its main
experiments (this plugin's version 1, exactly).

Departures:
- Selection data and rule: BackdoorBench prunes at every threshold of
  0, 0.05, ..., 0.9 and keeps the model with the lowest ASR among those whose
  clean accuracy moved by less than ``acc_ratio`` (relative), both measured on
  the TEST sets (the unpruned model when none qualifies); paper 000 also picks
  from test results. A defender has neither test data nor poisoned data, so
  here the accuracy is measured on the held-out validation part of the reserve
  and, ASR being unknown, the most pruning stands in for the lowest ASR: the
  largest admissible threshold wins. BackdoorBench counts a relative
  accuracy INCREASE of ``acc_ratio`` as a failure too (it takes the absolute
  difference); here an increase never disqualifies. As in
  BackdoorBench, every threshold is tried (no stop at the first failure) and
  the fallback is the unpruned model. The grid starts at paper 000's 0.4,
  not BackdoorBench's 0.
- Masks on the training part: BackdoorBench optimises the masks on the whole
  reserve (it selects on test data); here the validation part is held out of
  the mask optimisation, so the selection scores models on images the masks
  never saw.
- Projection: the code starts delta, xi in U(-eps, eps) and takes one signed
  step of eps without projecting, so |delta| can reach 2 eps; here every step
  is projected onto [-eps, eps], the budget the paper's formulation states.
- Pruned shift: the paper and both codes prune by zeroing the BN scale only
  (the mask multiplies the scale), leaving the channel at the constant
  relu(b_k). By default this zeroes scale AND shift (the harness's pruning
  convention: a pruned channel outputs nothing); ``prune_bias: false`` gives
  the code's rule.
- Threshold rule: strict ``m < threshold`` (the code prunes ``m <= threshold``),
  so threshold 0 prunes nothing.
- Masks and perturbations never become modules: each pass substitutes the BN
  scale and shift through ``torch.func.functional_call`` on a working copy
  (whose running statistics the train-mode passes update, as the code's do);
  the returned model is a fresh copy of the attacked one, pruned.
- Random draws (the split, batches, augmentation, the perturbations' start)
  come from ``ctx.generator``; on CUDA every pass runs under bf16 autocast (as
  the harness's ``fit`` and ``predict``). Train mode also enables dropout
  where a model has it, drawn from torch's global generator, as in ``fit``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch.func import functional_call

from backdoor_harness.toolkit import (BATCHNORM_FAMILIES, Augmentation, Defense, HarnessError, ImageSet, PluginConfig,
                                      Purified, accuracy, augment_batch, hookimpl, norm_layers, predict, to_float)


#: the default grid: paper 000's range 0.4-0.9 at BackdoorBench's step 0.05
DEFAULT_THRESHOLDS = tuple(round(0.4 + 0.05 * i, 2) for i in range(11))


class ANPConfig(PluginConfig):
    """Attributes:
        iterations: mask-optimisation steps (mini-batches).
        batch_size: images per step, drawn uniformly with replacement.
        lr: SGD learning rate of the masks (constant).
        momentum: SGD momentum of the masks.
        eps: perturbation budget: |delta|, |xi| <= eps (0: no perturbation).
        anp_steps: signed ascent steps of size eps / anp_steps per batch.
        alpha: weight of the natural loss; 1 - alpha weighs the perturbed loss.
        thresholds: candidate pruning thresholds in [0, 1] (neurons whose mask
            ends below the chosen one are pruned; 0 prunes none); kept sorted
            and without repeats. One value: prune at it (no selection, no
            validation split); several: the largest whose validation accuracy
            keeps the ``acc_ratio`` rule.
        acc_ratio: largest RELATIVE drop of validation accuracy (against the
            unpruned model's) that a candidate threshold may cause.
        val_ratio: share of each class's reserve images held out for the
            selection (0: the whole reserve both learns the masks and selects).
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
    thresholds: tuple[Annotated[float, Field(ge=0, le=1)], ...] = Field(default=DEFAULT_THRESHOLDS, min_length=1)
    acc_ratio: float = Field(default=0.1, gt=0, le=1)
    val_ratio: float = Field(default=0.1, ge=0, lt=1)
    prune_bias: bool = True
    augment: bool = True

    @model_validator(mode="before")
    @classmethod
    def _renamed_threshold(cls, data):
        if isinstance(data, dict) and "threshold" in data:
            raise ValueError("ANP's `threshold` is now `thresholds`, a list of candidates; write "
                             f"`thresholds: [{data['threshold']}]` for the old fixed threshold")
        return data

    @field_validator("thresholds")
    @classmethod
    def _sorted(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(sorted(set(value)))


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
                   cfg: ANPConfig, device: torch.device, generator: torch.Generator,
                   augmentation: Augmentation | None = None) -> NeuronMasks:
    """Steps 2-3: learn the neuron masks on a working copy of ``model`` (left untouched);
    ``augmentation``: the data set's (None: crop + flip)."""
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
            xb = augment_batch(xb, generator, augmentation)
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
    """Step 4, in place: zero the BN scale (and shift) of every neuron with mask < threshold.

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


def admissible(acc0: float, acc: float, acc_ratio: float) -> bool:
    """Step 5's accuracy rule: a relative drop below ``acc_ratio``, or no drop."""
    return acc >= acc0 or acc0 - acc < acc_ratio * acc0


def choose_threshold(acc0: float, candidates: list[tuple[float, float]], acc_ratio: float) -> float | None:
    """Step 5's choice among ``(threshold, validation accuracy)`` pairs: the
    largest admissible threshold, or None (prune nothing) when none is."""
    ok = [t for t, acc in candidates if admissible(acc0, acc, acc_ratio)]
    return max(ok) if ok else None


def validation_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    """Clean accuracy of ``model`` (eval mode) on the validation images."""
    return accuracy(predict(model, images, device), labels)


class ANP(Defense):
    """ANP. ``purify``'s report says what it did: {"thresholds":
    the candidates, "selected": the threshold pruned at (None: nothing pruned),
    "pruned": neurons pruned, "neurons": all BN neurons, "acc_ratio",
    "val_acc_unpruned": A0, "candidates": [{"threshold", "pruned", "val_acc",
    "admissible"}, ...], "train_size"/"val_size": the images that learned the
    masks / scored the candidates} (with one threshold: no validation, so
    "val_acc_unpruned" is None and the candidate has no accuracy)."""

    name = "anp"
    version = "2"
    summary = ("Adversarial Neuron Pruning: masks on BN neurons under adversarial neuron perturbation; prune at "
               "the largest threshold in 0.4-0.9 keeping validation accuracy within 10%")
    paper = "Wu & Wang, Adversarial Neuron Pruning Purifies Backdoored Deep Models, NeurIPS 2021"
    Config = ANPConfig
    needs = frozenset()
    #: BatchNorm networks (ViT and ConvNeXt use LayerNorm: not supported)
    families = BATCHNORM_FAMILIES

    def data(self, ctx) -> tuple[ImageSet, ImageSet | None]:
        """Step 1: (the images that learn the masks, the validation images or None)."""
        cfg = self.config
        if len(cfg.thresholds) == 1:
            return ctx.reserve, None
        if cfg.val_ratio == 0:
            return ctx.reserve, ctx.reserve
        train, val = ctx.split(cfg.val_ratio)
        if len(train) == 0 or len(val) == 0:
            raise HarnessError(f"anp: the reserve gave {len(train)} training and {len(val)} validation images; "
                               "the threshold selection needs at least 2 images per class (or val_ratio 0, or "
                               "a single threshold)")
        return train, val

    def optimize_masks(self, model: nn.Module, ctx, data: ImageSet | None = None) -> NeuronMasks:
        """Steps 2-3 on ``data`` (default: the whole reserve), with ``ctx``'s device and generator."""
        data = ctx.reserve if data is None else data
        return optimize_masks(model, data.images, data.labels, self.config, ctx.device, ctx.generator,
                              data.augmentation)

    def purify(self, model, ctx):
        cfg = self.config
        train, val = self.data(ctx)
        found = self.optimize_masks(model, ctx, train)
        neurons = sum(int(m.numel()) for m in found.masks.values())
        candidates, acc0 = [], None
        if val is None:
            selected = cfg.thresholds[0]
        else:
            work = copy.deepcopy(model).to(ctx.device)
            acc0 = validation_accuracy(work, val.images, val.labels, ctx.device)
            for t in cfg.thresholds:  # ascending: the pruned sets only grow, so pruning in place is exact
                count = prune_neurons(work, found.masks, t, cfg.prune_bias)
                acc = validation_accuracy(work, val.images, val.labels, ctx.device)
                candidates.append({"threshold": t, "pruned": count, "val_acc": acc,
                                   "admissible": admissible(acc0, acc, cfg.acc_ratio)})
            del work
            selected = choose_threshold(acc0, [(c["threshold"], c["val_acc"]) for c in candidates], cfg.acc_ratio)
        model = copy.deepcopy(model)
        pruned = 0 if selected is None else prune_neurons(model, found.masks, selected, cfg.prune_bias)
        if val is None:
            candidates = [{"threshold": selected, "pruned": pruned, "val_acc": None, "admissible": None}]
        report = {"thresholds": list(cfg.thresholds), "selected": selected, "pruned": pruned,
                  "neurons": neurons, "acc_ratio": cfg.acc_ratio, "val_acc_unpruned": acc0,
                  "candidates": candidates, "train_size": len(train), "val_size": 0 if val is None else len(val)}
        return Purified(model.to(ctx.device).eval(), report)


@hookimpl
def harness_defenses():
    return [ANP]
