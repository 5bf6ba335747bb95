"""Retuning Attack (RA): fine-tune the purified model on a few poisoned images.

Paper: Min, Qin et al., "Uncovering, Explaining, and Mitigating the Superficial
Safety of Backdoor Defense", NeurIPS 2024 (paper 000, §3 and Appendix B.2);
authors' code ``fine_tune/ft_poison.py`` (see shared/reference/algorithms.md §1a).
The leaderboard's P-ASR.

Algorithm:
1. draw a retuning set of ``n_images`` (1000 = 2% of CIFAR-10's training set;
   or ``ratio`` of the training set) clean training images;
2. replace the first ``k = poison_count`` of them (default 5, the authors'
   ``poison_num`` default) by ``k`` of the attack's own poisoned training
   samples (``Attack.poisoned_samples``): drawn uniformly from the samples the
   attack's ``poison`` poisons, with their poisoned pixels and labels. So a
   dirty-label attack gives stamped images relabelled to the target (some may
   be target-class originals, as in the authors' code), and a clean-label
   attack gives its target-class images (LC: adversarially perturbed) with
   the trigger at the target label. A training-controlled attack, which has no
   poisoned training set, gives non-target training images with its trigger
   and the target label;
3. fine-tune ALL parameters of a copy of the purified model: SGD lr 0.01,
   momentum 0.9, no weight decay, no schedule, batch 128, 5 epochs;
4. report its ASR (``retune_asr`` = P-ASR) and clean accuracy; with
   ``control`` (default), run the same retuning from the clean reference model
   of the same data set/model/seed and report ``retune_asr_clean_model``:
   a clean model must stay low for a high P-ASR to mean anything.

Paper 000's per-attack counts (Appendix B.2: CIFAR-10 BadNet 5, Blended 1,
SSBA 10, LC 2; CIFAR-100 and Tiny-ImageNet BadNet 25, Blended 10, SSBA 35)
are set per attack in the matrix file (``per_attack: {<attack label>:
{poison_count: k}}``); this module never names an attack.

Departures from the authors' code: the poisoned samples are a fresh draw from
the attack's poisoning (same rule and generator family), not necessarily the
very images the model was trained on; every image gets the standard
crop/flip augmentation each epoch (the code freezes one augmentation per clean
image and none for poisoned ones); the trigger is stamped when the attack
stamps it (its ``stamp`` setting).
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field

from backdoor_harness.toolkit import Evaluator, Metric, PluginConfig, PoisonedSet, Recipe, hookimpl, score


class RetuneConfig(PluginConfig):
    """Attributes:
        n_images: size of the retuning set (clean + poisoned).
        ratio: or its size as a fraction of the training set (overrides n_images).
        poison_count: poisoned images in it (the authors' code default 5; paper 000's
            per-attack counts go in the matrix's ``per_attack``).
        epochs, lr, momentum, weight_decay, batch_size: the fine-tuning.
        control: also retune the clean reference model.
    """

    n_images: int = Field(default=1000, gt=0)
    ratio: float | None = Field(default=None, gt=0, le=1)
    poison_count: int = Field(default=5, ge=0)
    epochs: int = Field(default=5, gt=0)
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=128, gt=0)
    control: bool = True


class Retune(Evaluator):
    name = "retune"
    version = "2"
    summary = "Retuning Attack: P-ASR after 5 epochs on 1000 images with k poisoned"
    paper = "Min, Qin et al., Superficial Safety of Backdoor Defense, NeurIPS 2024"
    Config = RetuneConfig
    metrics = {
        "retune_asr": Metric(higher_is_better=False, doc="ASR of the purified model after retuning (P-ASR)",
                             title="P-ASR", board=50, range=(0.0, 1.0)),
        "retune_clean_acc": Metric(higher_is_better=True, doc="its clean accuracy", range=(0.0, 1.0)),
        "retune_asr_clean_model": Metric(higher_is_better=False, doc="ASR of the clean model after the same retuning",
                                         title="P-ASR(clean)", board=60, range=(0.0, 1.0)),
    }

    @property
    def needs_clean_model(self) -> bool:  # the scheduler reads it from the class
        return self.config.control

    def retuning_set(self, ctx):
        """The retuning set: ``n`` clean training images, the first ``k`` replaced by the
        attack's own poisoned samples (fewer when the attack poisons fewer). Returns
        (PoisonedSet with ``source``: each row's index in ``ctx.train``, indices of the
        poisoned rows)."""
        train, attack, g = ctx.train, ctx.attack, ctx.generator
        n = round(self.config.ratio * len(train)) if self.config.ratio else self.config.n_images
        n = min(n, len(train))
        chosen = torch.randperm(len(train), generator=g)[:n]
        poisoned = attack.poisoned_samples(train, min(self.config.poison_count, n), g)
        k = len(poisoned.labels)
        images, labels = train.images[chosen].clone(), train.labels[chosen].clone()
        images[:k], labels[:k] = poisoned.images, poisoned.labels
        source = chosen.clone()
        source[:k] = poisoned.source
        mask = torch.zeros(n, dtype=torch.bool)
        mask[:k] = True
        return PoisonedSet(images, labels, mask, poisoned.stamp, poisoned.stamp_fn, source), torch.arange(k)

    def retuned(self, model, tuning, ctx):
        """A retuned copy of ``model`` (the input is not modified)."""
        model = copy.deepcopy(model)
        recipe = Recipe.tuning(self.config, schedule="constant")
        ctx.fit(model, tuning, recipe, device=ctx.device, generator=ctx.generator)
        return model

    def evaluate(self, ctx):
        tuning, _ = self.retuning_set(ctx)
        after = score(self.retuned(ctx.purified, tuning, ctx), ctx.clean_test, ctx.poisoned_test, ctx.device)
        out = {"retune_asr": after.asr, "retune_clean_acc": after.clean_acc}
        if self.config.control:
            control = self.retuned(ctx.clean_model, tuning, ctx)
            out["retune_asr_clean_model"] = score(control, ctx.clean_test, ctx.poisoned_test, ctx.device).asr
        return out


@hookimpl
def harness_evaluators():
    return [Retune]
