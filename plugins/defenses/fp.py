"""FP (Fine-Pruning): prune the last feature map's dormant channels, then fine-tune.

Paper: Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks", RAID 2018 (§3-4); as ported to
BackdoorBench (``defense/fp.py``, ``config/defense/fp/cifar10.yaml``), whose
defaults paper 003 uses for its FP baseline.

The pruned units are the channels of the LAST feature map, f = phi(x) (timm's
``forward_features``, ``layers.features``), the layer the paper prunes ("the
later convolutional layers"). A channel is pruned in the weights of the
head's input layer g: the first Linear or Conv2d that ``forward_head`` runs on
f (a pooled ``fc`` for ResNet, MobileNetV2/EfficientNet and the tiny CNN,
``linear`` for PreAct-ResNet, ``classifier`` for DenseNet; ``conv_head`` for
MobileNetV3; the 7x7 ``pre_logits.fc1`` for
timm's VGG). Zeroing g's input weights of channel k (``weight[:, k]``) removes
channel k from everything the network computes after phi, exactly as if f_k
were 0, provided the head only applies per-channel operations (pooling,
flatten, elementwise activations) before g. That is checked once per model
with a forward pass (:func:`head_input_layer`): perturbing the channels whose
weights are zeroed must leave the logits unchanged.

Algorithm:
1. copy the attacked model f = g(phi(x)); split the reserve into a training
   and a validation part (``ctx.split(val_ratio)``, paper 003's rule; with
   ``val_ratio`` 0 the whole reserve is both, the paper's single clean set);
2. with f in eval mode, record each channel's mean activation
   a_k = mean over the training images and spatial positions of phi(x)_k;
3. order the channels by increasing a_k (stable sort: ties in index order);
4. A0 = validation accuracy of f; for n = s, 2s, 3s, ... (s = ceil(C *
   ``prune_step_ratio``), capped at floor(C * ``max_prune_ratio``), the cap
   itself being the last step): prune the first n channels of the order and
   measure the validation accuracy A_n; stop at the first n with
   A0 - A_n >= ``acc_ratio`` * A0 (a relative drop of ``acc_ratio`` or
   more); the pruned model is the last n that passed (n = 0 if none did);
5. fine-tune every parameter on the training part (SGD, cosine, random crop
   + flip) with cross-entropy; after every optimizer step the pruned
   channels' weights of g are set back to zero, so they stay pruned;
6. return the model (eval mode).

Defaults (BackdoorBench's ``config/defense/fp/cifar10.yaml`` unless noted):
``acc_ratio`` 0.1, ``prune_step_ratio`` 0.01 (``once_prune_ratio``);
fine-tuning 100 epochs, SGD lr 0.01, momentum 0.9, weight decay 5e-4,
cosine schedule, augmentation. ``val_ratio`` 0.1 is paper 003's protocol for
FP ("we use 10% of the data for validation"); ``max_prune_ratio`` 1.0 (no cap)
is ours, BackdoorBench has none; batch 128 instead of BackdoorBench's 256, as
the harness's ``ft``, so that FP and FT differ only by the pruning.

Departures:
- Stopping data: BackdoorBench measures the accuracy drop on the clean TEST
  set, which a defender does not have; here it is measured on the held-out
  validation part of the reserve (paper 003's protocol).
- Kept model: BackdoorBench prunes in place, so the model it fine-tunes is the
  first one that broke the accuracy rule; here it is the last one that kept
  it (the paper's rule). BackdoorBench also prunes n - 1 channels at step n
  and counts an accuracy increase of ``acc_ratio`` as a drop (it takes the
  absolute difference); here n channels are pruned and only drops count.
- Where the pruning is expressed: in the weights of the head's input layer g
  (BackdoorBench: a ``torch.nn.utils.prune`` mask on the first Linear of the
  model's last child, the same place for its CIFAR models). Zeroing the
  conv/BN that produces phi's channel k would not be generic: in ResNet,
  phi's channels are residual sums (conv + shortcut), so zeroing the last
  conv's filter leaves the channel alive.
- Activations are measured in eval mode without augmentation, in fp32
  (BackdoorBench forwards its augmented training loader).
- Fine-tuning runs through the harness's ``fit`` (on CUDA: bf16 autocast,
  channels_last); BackdoorBench uses AMP too.
- Families: the convolutional families whose head pools phi before a linear
  or convolutional layer: ResNet, PreAct-ResNet, VGG-BN, EfficientNet,
  MobileNetV3, DenseNet (its last feature map is the final norm's BN-ReLU
  output over the concatenated channels, pooled into ``classifier``; the
  concatenation happens before phi, so each of phi's channels is still one
  weight column of the head) and the tiny CNN. Version 2 declares DenseNet
  (version 1 skipped it; the bump makes its skipped cells run).
  Vision transformers are not declared: their last
  features are LayerNorm outputs of either sign, so "low mean activation"
  does not mean "dormant", the premise of the defense (and timm's ViT with
  average pooling applies a LayerNorm before its head, which mixes channels).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from pydantic import Field

from backdoor_harness.toolkit import (CONV_FAMILIES, Defense, HarnessError, PluginConfig, Purified, Recipe, capture,
                                      eval_mode, features, head, hookimpl, to_float, unwrap)

__all__ = ["ChannelPrune", "FinePruning", "FinePruningConfig", "PruneSearch", "channel_activations",
           "head_input_layer", "prune_counts", "search_prune_count"]


class FinePruningConfig(PluginConfig):
    """Attributes:
        val_ratio: share of each class's reserve images held out to measure the
            accuracy drop (0: measure on the whole reserve, which is then also
            the activation and fine-tuning set).
        acc_ratio: largest RELATIVE drop of validation accuracy kept while
            pruning (0.1: pruning stops once accuracy falls below 90% of the
            unpruned model's).
        prune_step_ratio: share of the channels pruned between two accuracy
            checks (at least one channel).
        max_prune_ratio: cap on the share of channels pruned (1: no cap).
        epochs: fine-tuning passes over the training part (0: prune only).
        lr: initial fine-tuning learning rate (cosine-annealed).
        batch_size: images per step (also the chunk size of the
            activation and accuracy passes).
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        augment: random crop (4-pixel padding) + horizontal flip while fine-tuning.
    """

    val_ratio: float = Field(default=0.1, ge=0, lt=1)
    acc_ratio: float = Field(default=0.1, gt=0, le=1)
    prune_step_ratio: float = Field(default=0.01, gt=0, le=1)
    max_prune_ratio: float = Field(default=1.0, ge=0, le=1)
    epochs: int = Field(default=100, ge=0)
    lr: float = Field(default=0.01, gt=0)
    batch_size: int = Field(default=128, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    augment: bool = True

    def recipe(self) -> Recipe:
        return Recipe.tuning(self, schedule="cosine")


# --------------------------------------------------------------------------
# The head's input layer and the pruning mask
# --------------------------------------------------------------------------


def _zero_inputs(layer: nn.Module, channels: torch.Tensor | list[int]) -> None:
    """Zero ``layer``'s weights that read the given input channels (no_grad by caller)."""
    if len(channels):
        idx = torch.as_tensor(channels, dtype=torch.long, device=layer.weight.device)
        layer.weight.index_fill_(1, idx, 0)


def head_input_layer(model: nn.Module, feats: torch.Tensor) -> str:
    """The module name (in ``layers.unwrap(model)``) of the first Linear or
    Conv2d that ``forward_head`` runs on ``feats`` (a ``[B, C, H, W]`` feature
    map of ``model``), checked to be a layer whose input weights ``weight[:, k]``
    carry exactly channel k: perturbing half of the channels after zeroing
    their weights must leave the head's output unchanged (eval mode, fp32).

    Raises HarnessError when there is none, or when the head mixes channels
    before it (a LayerNorm, a flatten without pooling, a grouped conv).
    """
    if feats.ndim != 4:
        raise HarnessError(f"fp needs a convolutional feature map [B, C, H, W]; forward_features gives "
                           f"{tuple(feats.shape)} ({type(unwrap(model)).__name__})")
    net, c = unwrap(model), feats.shape[1]
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with capture(model, layers) as cap, torch.no_grad():
        head(model, feats)
    called = cap.names()
    if not called:
        raise HarnessError(f"fp: the head of {type(net).__name__} runs no Linear or Conv2d layer")
    name = called[0]
    layer = dict(net.named_modules())[name]
    width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if width != c or (isinstance(layer, nn.Conv2d) and layer.groups != 1):
        raise HarnessError(f"fp: the head's first layer {name!r} ({type(layer).__name__}) does not take the "
                           f"{c} channels of the last feature map one weight column each")
    # the structural check: with the weights of the even channels zeroed, those
    # channels must no longer reach the output (zeroed in place, then restored)
    even = torch.arange(0, c, 2)
    saved = layer.weight.detach().clone()
    try:
        with eval_mode(model), torch.no_grad():
            _zero_inputs(layer, even)
            f = feats.detach().float()
            moved = f.clone()
            moved[:, even.to(f.device)] = moved[:, even.to(f.device)] * 3 + 1
            same = torch.allclose(head(model, f), head(model, moved), rtol=1e-4, atol=1e-5)
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)
    if not same:
        raise HarnessError(f"fp: the head of {type(net).__name__} mixes the feature channels before {name!r} "
                           "(e.g. a LayerNorm); a channel cannot be pruned through that layer's weights")
    return name


@dataclass
class ChannelPrune:
    """Pruned channels of the last feature map, expressed in the head's input layer.

    Attributes:
        layer: module name of the head's input layer (in ``layers.unwrap(model)``).
        channels: the pruned channels, in pruning order.
    """

    layer: str
    channels: list[int] = field(default_factory=list)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the layer's weights ``weight[:, k]`` of every pruned channel k."""
        _zero_inputs(dict(unwrap(model).named_modules())[self.layer], self.channels)


# --------------------------------------------------------------------------
# Activations and the pruning search
# --------------------------------------------------------------------------


@torch.no_grad()
def _feature_maps(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device
                  ) -> torch.Tensor:
    """phi(x) of uint8 ``images`` in eval mode, fp32, on ``device``."""
    model.eval()
    out = [features(model, to_float(images[i:i + batch_size].to(device), False)).float()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def channel_activations(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device
                        ) -> torch.Tensor:
    """a_k: mean of the last feature map's channel k over ``images`` (uint8) and
    spatial positions, the model in eval mode, fp32; on the CPU."""
    if len(images) == 0:
        raise HarnessError("fp: no images to record activations on")
    model.eval()
    total = None
    for i in range(0, len(images), batch_size):
        f = features(model, to_float(images[i:i + batch_size].to(device), False)).float()
        if f.ndim != 4:
            raise HarnessError(f"fp needs a convolutional feature map [B, C, H, W], got {tuple(f.shape)}")
        s = f.sum(dim=(0, 2, 3)) / (f.shape[2] * f.shape[3])
        total = s if total is None else total + s
    return (total / len(images)).cpu()


def prune_counts(channels: int, step_ratio: float, max_ratio: float) -> list[int]:
    """Channel counts to check: s, 2s, ... (s = ceil(C * step_ratio)), capped at
    floor(C * max_ratio), the cap itself last."""
    step = max(1, math.ceil(channels * step_ratio))
    cap = min(channels, math.floor(channels * max_ratio + 1e-9))
    counts = list(range(step, cap + 1, step))
    if cap > 0 and (not counts or counts[-1] != cap):
        counts.append(cap)
    return counts


@dataclass
class PruneSearch:
    """What the pruning search did.

    Attributes:
        count: channels pruned in the kept model.
        history: (channels pruned, validation accuracy), from 0 on.
        stop: ``accuracy`` (the rule broke), ``max`` (the cap was reached)
            or ``none`` (nothing to prune).
    """

    count: int
    history: list[tuple[int, float]]
    stop: str


def search_prune_count(accuracy: Callable[[int], float], counts: list[int], acc_ratio: float) -> PruneSearch:
    """Step 4's control: ``accuracy(n)`` is the validation accuracy with the
    first n channels pruned (called with n = 0 first, then growing n, so an
    implementation may prune incrementally). Goes through ``counts`` while
    A0 - A_n < acc_ratio * A0 and keeps the last n that passed."""
    acc0 = accuracy(0)
    history, kept = [(0, acc0)], 0
    for n in counts:
        acc = accuracy(n)
        history.append((n, acc))
        if not acc0 - acc < acc_ratio * acc0:
            return PruneSearch(kept, history, "accuracy")
        kept = n
    return PruneSearch(kept, history, "max" if counts else "none")


# --------------------------------------------------------------------------
# The defense
# --------------------------------------------------------------------------


class FinePruning(Defense):
    """Fine-Pruning. ``purify``'s report says what it did:
    {"layer": the head's input layer, "channels": C, "pruned": [channel, ...]
    in pruning order, "activations": [a_k, ...], "history": [(n, val acc), ...],
    "stop": why pruning stopped}."""

    name = "fp"
    version = "2"
    summary = "Fine-Pruning: prune the last feature map's least active channels, then fine-tune (kept pruned)"
    paper = ("Liu, Dolan-Gavitt, Garg, Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural "
             "Networks, RAID 2018; BackdoorBench defense/fp.py")
    Config = FinePruningConfig
    families = CONV_FAMILIES

    def purify(self, model, ctx):
        cfg, dev = self.config, ctx.device
        model = copy.deepcopy(model).to(dev).eval()
        if cfg.val_ratio > 0:
            train, val = ctx.split(cfg.val_ratio)
        else:
            train = val = ctx.reserve
        if len(train) == 0 or len(val) == 0:
            raise HarnessError(f"fp: the reserve gave {len(train)} training and {len(val)} validation images; "
                               "it needs at least 2 images per class (or val_ratio 0)")

        # steps 2-3: activations and their order
        acts = channel_activations(model, train.images, cfg.batch_size, dev)
        order = torch.argsort(acts, stable=True).tolist()

        # step 4: the pruning search, on validation feature maps computed once
        # (pruning changes only the head)
        val_feats = _feature_maps(model, val.images, cfg.batch_size, dev)
        val_labels = val.labels.to(dev)
        layer_name = head_input_layer(model, val_feats[:2])
        layer = dict(unwrap(model).named_modules())[layer_name]
        original = layer.weight.detach().clone()

        @torch.no_grad()
        def accuracy(n: int) -> float:  # called with growing n: the zeroed prefix only grows
            ChannelPrune(layer_name, order[:n]).apply(model)
            correct = 0
            for i in range(0, len(val_labels), cfg.batch_size):
                logits = head(model, val_feats[i:i + cfg.batch_size])
                correct += int((logits.argmax(1) == val_labels[i:i + cfg.batch_size]).sum())
            return correct / len(val_labels)

        counts = prune_counts(len(order), cfg.prune_step_ratio, cfg.max_prune_ratio)
        search = search_prune_count(accuracy, counts, cfg.acc_ratio)
        mask = ChannelPrune(layer_name, order[:search.count])
        with torch.no_grad():
            layer.weight.copy_(original)
        mask.apply(model)

        # step 5: fine-tune with the pruned channels kept at zero
        if cfg.epochs > 0:
            ctx.fit(model, train, cfg.recipe(), device=dev, generator=ctx.generator, after_step=mask.apply,
                    desc="fp fine-tune")
        report = {"layer": layer_name, "channels": len(order), "pruned": list(mask.channels),
                  "activations": acts.tolist(), "history": search.history, "stop": search.stop}
        return Purified(model.eval(), report)


@hookimpl
def harness_defenses():
    return [FinePruning]
