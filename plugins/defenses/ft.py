"""FT: plain fine-tuning of the whole model on the defender's clean reserve.

The classic baseline (e.g. Liu et al., "Fine-Pruning", RAID 2018, without the
pruning; BackdoorBench's ``ft``). Algorithm:

1. copy the attacked model;
2. train every parameter with SGD (momentum 0.9, weight decay 5e-4, cosine
   schedule) and cross-entropy on the clean reserve (5% of the training set
   by default), with the standard random-crop + flip augmentation.

Defaults follow BackdoorBench's CIFAR-10 FT config (lr 0.01, 100 epochs) except
the batch size (128, as the harness's trainer default, instead of 256).
"""

from __future__ import annotations

import copy

from pydantic import Field

from backdoor_harness.toolkit import Defense, PluginConfig, Purified, Recipe, hookimpl


class FineTuneConfig(PluginConfig):
    """Attributes:
        epochs: passes over the reserve.
        lr: initial learning rate (cosine-annealed).
        batch_size: images per step.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
    """

    epochs: int = Field(default=100, gt=0)
    lr: float = Field(default=0.01, gt=0)
    batch_size: int = Field(default=128, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)

    def recipe(self) -> Recipe:
        return Recipe.tuning(self)


class FineTune(Defense):
    name = "ft"
    version = "1"
    summary = "fine-tune all weights on the clean reserve (SGD + cosine)"
    paper = "Liu et al., Fine-Pruning, RAID 2018 (fine-tuning baseline); BackdoorBench"
    Config = FineTuneConfig

    def purify(self, model, ctx):
        model = copy.deepcopy(model)
        ctx.fit(model, ctx.reserve, self.config.recipe(), device=ctx.device, generator=ctx.generator)
        return Purified(model)


@hookimpl
def harness_defenses():
    return [FineTune]
