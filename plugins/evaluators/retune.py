"""Retuning Attack (RA): fine-tune the purified model on a few poisoned images.

Paper: Min, Qin et al., "Uncovering, Explaining, and Mitigating the Superficial
Safety of Backdoor Defense", NeurIPS 2024 (paper 000, §3 and Appendix B.2);
authors' code ``fine_tune/ft_poison.py`` (see shared/reference/algorithms.md §1a).
The leaderboard's P-ASR.

Algorithm:
1. draw a retuning set of ``n_images`` (1000 = 2% of CIFAR-10's training set;
   or ``ratio`` of the training set) clean training images;
2. replace ``k`` of them by poisoned images (trigger + target label); k
   defaults per attack as in the paper (BadNets 5, Blended 1, SSBA 10, LC 2;
   5 for any other attack), or ``poison_count``;
3. fine-tune ALL parameters of a copy of the purified model: SGD lr 0.01,
   momentum 0.9, no weight decay, no schedule, batch 128, 5 epochs;
4. report its ASR (``retune_asr`` = P-ASR) and clean accuracy; with
   ``control`` (default), run the same retuning from the clean reference model
   of the same data set/model/seed and report ``retune_asr_clean_model``:
   a clean model must stay low for a high P-ASR to mean anything.

Departures from the authors' code: the poisoned images are drawn from
training images whose true class is not the target (the code may draw
target-class images, which carry no signal); every image gets the standard
crop/flip augmentation each epoch (the code freezes one augmentation per clean
image and none for poisoned ones); the trigger is stamped when the attack
stamps it (its ``stamp`` setting).
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field

from backdoor_harness import Evaluator, Metric, PluginConfig, hookimpl
from backdoor_harness.metrics import score
from backdoor_harness.train import Recipe

#: k poisoned images per attack on CIFAR-10 (paper 000, Appendix B.2)
PAPER_POISON_COUNT = {"badnets": 5, "blended": 1, "ssba": 10, "lc": 2}
DEFAULT_POISON_COUNT = 5


class RetuneConfig(PluginConfig):
    """Attributes:
        n_images: size of the retuning set (clean + poisoned).
        ratio: or its size as a fraction of the training set (overrides n_images).
        poison_count: poisoned images in it (default: the paper's per-attack k).
        epochs, lr, momentum, weight_decay, batch_size: the fine-tuning.
        control: also retune the clean reference model.
    """

    n_images: int = Field(default=1000, gt=0)
    ratio: float | None = Field(default=None, gt=0, le=1)
    poison_count: int | None = Field(default=None, ge=0)
    epochs: int = Field(default=5, gt=0)
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=128, gt=0)
    control: bool = True


class Retune(Evaluator):
    name = "retune"
    version = "1"
    summary = "Retuning Attack: P-ASR after 5 epochs on 1000 images with k poisoned"
    paper = "Min, Qin et al., Superficial Safety of Backdoor Defense, NeurIPS 2024"
    Config = RetuneConfig
    metrics = {
        "retune_asr": Metric(higher_is_better=False, doc="ASR of the purified model after retuning (P-ASR)"),
        "retune_clean_acc": Metric(higher_is_better=True, doc="its clean accuracy"),
        "retune_asr_clean_model": Metric(higher_is_better=False, doc="ASR of the clean model after the same retuning"),
    }

    @property
    def needs_clean_model(self) -> bool:  # the scheduler reads it from the class
        return self.config.control

    def poison_count(self, attack_name: str) -> int:
        if self.config.poison_count is not None:
            return self.config.poison_count
        return PAPER_POISON_COUNT.get(attack_name, DEFAULT_POISON_COUNT)

    def retuning_set(self, ctx):
        """The retuning set: ``n`` clean training images, the first ``k`` replaced
        by poisoned ones. Returns (PoisonedSet, indices of the poisoned samples)."""
        train, attack, g = ctx.train, ctx.attack, ctx.generator
        n = round(self.config.ratio * len(train)) if self.config.ratio else self.config.n_images
        n = min(n, len(train))
        k = min(self.poison_count(attack.name), n)
        chosen = torch.randperm(len(train), generator=g)[:n]
        images, labels = train.images[chosen].clone(), train.labels[chosen].clone()
        eligible = attack.test_mask(train.labels, train.num_classes).nonzero().flatten()
        donors = eligible[torch.randperm(len(eligible), generator=g)[:k]]
        images[:k] = train.images[donors]
        labels[:k] = attack.target_labels(train.labels[donors], train.num_classes)
        idx = torch.arange(k)
        return attack.stamped(images, labels, idx), idx

    def retuned(self, model, tuning, ctx):
        """A retuned copy of ``model`` (the input is not modified)."""
        model = copy.deepcopy(model)
        recipe = Recipe(epochs=self.config.epochs, lr=self.config.lr, momentum=self.config.momentum,
                        weight_decay=self.config.weight_decay, batch_size=self.config.batch_size,
                        schedule="constant")
        ctx.fit(model, tuning, recipe, device=ctx.device, generator=ctx.generator)
        return model

    def evaluate(self, ctx):
        tuning, _ = self.retuning_set(ctx)
        after = score(self.retuned(ctx.purified, tuning, ctx), ctx.clean_test, ctx.poisoned_test, ctx.device)
        out = {"retune_asr": after["asr"], "retune_clean_acc": after["clean_acc"]}
        if self.config.control:
            control = self.retuned(ctx.clean_model, tuning, ctx)
            out["retune_asr_clean_model"] = score(control, ctx.clean_test, ctx.poisoned_test, ctx.device)["asr"]
        return out


@hookimpl
def harness_evaluators():
    return [Retune]
