"""head_reinit: re-initialise the classifier head, then fine-tune on the clean reserve.

An example of a defense published as its own pip package (see ``pyproject.toml``:
one entry point in the ``backdoor_harness`` group is all the harness needs).

Paper: Min, Qin, Shen and Cheng, "Towards Stable Backdoor Purification through
Feature Shift Tuning", NeurIPS 2023 (code: github.com/AISafety-HKUST/
stable_backdoor_purification, ``fine_tune/ft.py --ft_mode ft-init``) — the
``FT-init`` baseline that the paper compares its FST method against.

Algorithm:

1. copy the attacked model (the input is never modified);
2. find the classifier head through timm's API (``model.net.get_classifier()``)
   and re-initialise it with each layer's own ``reset_parameters()`` (for a
   linear head: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, the
   same distribution as the reference code), under a seed drawn from
   ``ctx.generator``, so a cell's seed fixes the result;
3. fine-tune with the harness's trainer (SGD, momentum 0.9, cosine schedule,
   random crop + flip) and cross-entropy on the defender's clean reserve,
   every parameter (``FT-init``).

Departures from the paper: this is its FT-init baseline, not FST itself —
there is no feature-shift penalty (FST's inner-product term between the new
and the original head) and no projection of the head's weight norm back to
its original value after each step (which the reference code applies in all
modes). The harness's trainer also uses weight decay 5e-4 (the reference code
uses none). Defaults (10 epochs, lr 0.01, batch 128) are those of the
reference code's example command for CIFAR-10.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from pydantic import Field

from backdoor_harness.toolkit import Defense, HarnessError, PluginConfig, Purified, Recipe, hookimpl

__version__ = "0.1.0"


class HeadReinitConfig(PluginConfig):
    """Attributes:
        epochs: passes over the reserve.
        lr: initial learning rate (cosine-annealed).
        batch_size: images per step.
    """

    epochs: int = Field(default=10, gt=0)
    lr: float = Field(default=0.01, gt=0)
    batch_size: int = Field(default=128, gt=0)

    def recipe(self) -> Recipe:
        return Recipe.tuning(self)  # its epochs, lr and batch_size; the rest the trainer's defaults


def classifier_of(model: nn.Module) -> nn.Module:
    """The classifier head of a (wrapped) timm model, through ``get_classifier()``."""
    net = getattr(model, "net", model)
    if not callable(getattr(net, "get_classifier", None)):
        raise HarnessError(f"head_reinit: {type(net).__name__} has no get_classifier() (not a timm model?)")
    head = net.get_classifier()
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        raise HarnessError(f"head_reinit: the classifier of {type(net).__name__} has no parameters "
                           f"(got {type(head).__name__}); nothing to re-initialise")
    return head


def reinit_(head: nn.Module, generator: torch.Generator) -> int:
    """Re-initialise every layer of ``head`` with its own ``reset_parameters()``,
    seeded from ``generator`` (CPU and the head's CUDA device). Returns the count."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    cuda = sorted({p.device.index or 0 for p in head.parameters() if p.is_cuda})
    count = 0
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for layer in head.modules():
            if callable(getattr(layer, "reset_parameters", None)):
                layer.reset_parameters()
                count += 1
    if count == 0:
        raise HarnessError(f"head_reinit: no layer of the classifier {type(head).__name__} has reset_parameters()")
    return count


class HeadReinit(Defense):
    name = "head_reinit"
    version = "0.1.0"
    summary = "re-initialise the classifier head, then fine-tune on the clean reserve (FT-init)"
    paper = ("Min, Qin et al., Towards Stable Backdoor Purification through Feature Shift Tuning, "
             "NeurIPS 2023 (ft-init baseline)")
    Config = HeadReinitConfig

    def purify(self, model, ctx):
        model = copy.deepcopy(model)
        head = classifier_of(model)
        reinit_(head, ctx.generator)
        ctx.fit(model, ctx.reserve, self.config.recipe(), device=ctx.device, generator=ctx.generator)
        return Purified(model)


@hookimpl
def harness_defenses():
    return [HeadReinit]
