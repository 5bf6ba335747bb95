"""QRA (Query-based Reactivation Attack): an input perturbation that revives the backdoor.

Paper: Min, Qin et al., "Uncovering, Explaining, and Mitigating the Superficial
Safety of Backdoor Defense", NeurIPS 2024 (paper 000, §3.3, Eq. (2), Appendix
B.2); authors' code ``fine_tune/qra.py`` (shared/reference/algorithms.md §1b).

Algorithm:
1. run the Retuning Attack (the ``retune`` evaluator, same settings) on the
   purified model: the teacher f_RA;
2. a generator phi: an MLP on the flattened image, 3HW -> 1024 -> 1024 -> 1024
   -> 3HW (ReLU, tanh output), delta = eps * phi(x), eps = 16/255, x' =
   clip(x + delta, 0, 1) in pixel space;
3. train phi (models frozen) on 500 clean + 500 poisoned images for 50
   epochs (SGD lr 0.1, momentum 0.9, batch 128) on
   KL(f_RA(x) || f_pur(x')) + alpha * CE(f_ref(x'), y_true): the purified model
   on x' imitates the retuned model on x, while the reference model (the clean
   reference model) keeps classifying x' correctly; alpha 0.2 (the authors'
   default; paper 000 uses 0.1 for LC, which a matrix sets with
   ``per_attack``: this module never names an attack);
4. report C-ASR (clean non-target test images + delta -> target) and P-ASR
   (poisoned test images + delta -> target), on the purified and the clean model.

The reference model: ``reference: clean`` (default) uses the clean reference
model of the cell; the paper (§3.3) uses the EP-purified model as a surrogate,
since an attacker rarely has a clean model: ``reference: ep`` (or any defense,
``{name, config}`` to pick its config) asks the scheduler for that defense's
purified model of the same attacked model, shared with the matrix's own row
when the configs agree.

The 500 poisoned images, as the authors' code takes them: for a dirty-label
attack (or a training-controlled one), the attack's own poisoned training
samples whose true class is not their target (``Attack.poisoned_samples``
with ``flipped_only``: the training trigger on non-target images); for a
clean-label attack (``Attack.clean_label``), whose poisoned training images
are all of the target class, images like those of the poisoned test set
(``Attack.poison_test``: non-target images with the test-time trigger). The
authors take the latter from the poisoned test set itself, on which P-ASR is
then measured; here they are made from non-target TRAINING images, so the
test images stay unseen. Each keeps its true label for the CE term. An
attack that poisoned fewer such images than ``n_poison`` gives fewer.

Where alpha goes: Eq. (2) of the paper weights the CE term (``alpha_on: ce``,
the default); the authors' code weights the KL term and leaves CE at 1
(``alpha_on: kl``). Measured (README, GPU table: CIFAR-10, PreAct-ResNet-18,
5% poisoning, H100, 2026-11-22): both forms give the same P-ASR on purified
models (within 1.2 points in all 8 cells). The code's form reproduces the
paper's Figure 2 pattern better, meaning high P-ASR on the purified model and
low C-ASR and low P-ASR on the clean model. In the one cell where the forms
differ (Blended, FST), the paper's form leaks to clean images (C-ASR 7.4%
against 1.5%) and to the clean model (P-ASR 5.7% against 1.3%). The CE term
on the reference model has weight 1 there, against alpha = 0.2 in Eq. (2).

Departures: the generator sees [0, 1] pixels, not normalised images (the
harness normalises inside the model); the reference model defaults to the
clean model (``reference: ep`` is the paper's surrogate); C-ASR excludes
target-class images (the code counts every test image and hard-codes class
0); a clean-label attack's poisoned images are made from training images, not
taken from the poisoned test set (see above).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator

from backdoor_harness.plugins.evaluators.retune import Retune, RetuneConfig
from backdoor_harness.toolkit import (Evaluator, HarnessError, Metric, PluginConfig, attack_success_rate, create_defense,
                                      hookimpl, predict, to_float)


class QRAConfig(PluginConfig):
    """Attributes:
        eps: L-inf budget of the perturbation, on the [0, 1] scale.
        alpha: weight of the balancing term (default 0.2, the authors' code default).
        alpha_on: ``ce`` (the paper's Eq. 2) or ``kl`` (the authors' code).
        n_clean, n_poison: training images of each kind.
        epochs, lr, momentum, batch_size: the generator's SGD.
        hidden: width of the MLP's three hidden layers.
        reference: the model kept correct on x + delta: ``clean`` or a
            defense (``ep``, or ``{name: ep, config: {...}}``).
        retune: settings of the Retuning Attack that makes the teacher.
    """

    eps: float = Field(default=16 / 255, gt=0, le=1)
    alpha: float = Field(default=0.2, ge=0)
    alpha_on: Literal["ce", "kl"] = "ce"
    n_clean: int = Field(default=500, ge=0)
    n_poison: int = Field(default=500, ge=0)
    epochs: int = Field(default=50, gt=0)
    lr: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    batch_size: int = Field(default=128, gt=0)
    hidden: int = Field(default=1024, gt=0)
    reference: str | dict[str, Any] = "clean"
    retune: RetuneConfig = Field(default_factory=lambda: RetuneConfig(control=False))


    @field_validator("reference")
    @classmethod
    def _reference(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        if value == "clean":
            return value
        ref = {"name": value, "config": {}} if isinstance(value, str) else value
        if set(ref) - {"name", "config"} or not isinstance(ref.get("name"), str):
            raise ValueError("reference is `clean`, a defense name, or {name: <defense>, config: {...}}")
        try:
            create_defense(ref["name"], **ref.get("config", {}))
        except HarnessError as err:
            raise ValueError(f"reference: {err}") from None
        return value

    def reference_defense(self) -> dict[str, Any] | None:
        """The reference as a ``{name, config}`` defense, or None for the clean model."""
        if self.reference == "clean":
            return None
        ref = self.reference
        return {"name": ref, "config": {}} if isinstance(ref, str) else {"config": {}, **ref}


class Perturbation(nn.Module):
    """delta = eps * tanh(MLP(flatten(x))), shaped like x."""

    def __init__(self, shape: tuple[int, int, int], hidden: int, eps: float, generator: torch.Generator):
        super().__init__()
        d = math.prod(shape)
        self.shape, self.eps = shape, eps
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):  # nn.Linear's own init, drawn from the cell's generator
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(layer.in_features)
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Perturbed images x' = clip(x + delta, 0, 1), x in [0, 1]."""
        delta = self.eps * torch.tanh(self.mlp(x.flatten(1))).view(-1, *self.shape)
        return (x + delta).clamp(0, 1)


def frozen(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class QueryReactivation(Evaluator):
    name = "qra"
    version = "2"
    summary = "Query-based Reactivation Attack: C-ASR / P-ASR of a learned 16/255 perturbation"
    paper = "Min, Qin et al., Superficial Safety of Backdoor Defense, NeurIPS 2024"
    Config = QRAConfig
    needs_clean_model = True
    metrics = {
        "qra_c_asr": Metric(higher_is_better=False, doc="purified model: clean non-target images + delta -> target",
                            range=(0.0, 1.0)),
        "qra_p_asr": Metric(higher_is_better=False, doc="purified model: poisoned images + delta -> target",
                            title="QRA P-ASR", board=70, range=(0.0, 1.0)),
        "qra_c_asr_clean_model": Metric(higher_is_better=False, doc="the same on the clean model", range=(0.0, 1.0)),
        "qra_p_asr_clean_model": Metric(higher_is_better=False, doc="the same on the clean model", range=(0.0, 1.0)),
    }

    @property
    def needs_defenses(self) -> tuple[dict, ...]:
        ref = self.config.reference_defense()
        return () if ref is None else (ref,)

    def poisoned_images(self, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_poison`` poisoned images (uint8, trigger in the pixels) and their TRUE labels
        (see the module docstring: the attack's own flipped poisoned samples, or for a
        clean-label attack non-target training images with the test-time trigger)."""
        train, attack, g, n = ctx.train, ctx.attack, ctx.generator, self.config.n_poison
        if not attack.clean_label:
            samples = attack.poisoned_samples(train, n, g, flipped_only=True)
            return samples.triggered_images(), train.labels[samples.source]
        pool = attack.test_mask(train.labels, train.num_classes).nonzero().flatten()
        pick = pool[torch.randperm(len(pool), generator=g)[:n]]
        poisoned = attack.poison_test(train.subset(pick))
        return poisoned.images, poisoned.meta["true_labels"]

    def training_set(self, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_clean`` clean training images + ``n_poison`` poisoned ones (uint8) and their true labels."""
        train, g = ctx.train, ctx.generator
        clean = torch.randperm(len(train), generator=g)[: self.config.n_clean]
        poison_x, poison_y = self.poisoned_images(ctx)
        return torch.cat([train.images[clean], poison_x]), torch.cat([train.labels[clean], poison_y])

    def train_generator(self, ctx, teacher: nn.Module) -> Perturbation:
        alpha = self.config.alpha
        images, labels = self.training_set(ctx)
        x_all, y_all = to_float(images.to(ctx.device), False), labels.to(ctx.device)
        ref = self.config.reference_defense()
        reference = ctx.clean_model if ref is None else ctx.defended[ref["name"]]
        purified, reference = frozen(ctx.purified).to(ctx.device), frozen(reference).to(ctx.device)
        with torch.no_grad():
            target = F.softmax(frozen(teacher).to(ctx.device)(x_all), dim=1)  # f_RA on the clean x
        gen = Perturbation(tuple(images.shape[1:]), self.config.hidden, self.config.eps, ctx.generator).to(ctx.device)
        opt = torch.optim.SGD(gen.parameters(), lr=self.config.lr, momentum=self.config.momentum)
        w_kl, w_ce = (1.0, alpha) if self.config.alpha_on == "ce" else (alpha, 1.0)
        n, bs = len(y_all), self.config.batch_size
        for _ in range(self.config.epochs):
            perm = torch.randperm(n, generator=ctx.generator).to(ctx.device)
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                xp = gen(x_all[idx])
                kl = F.kl_div(F.log_softmax(purified(xp), dim=1), target[idx], reduction="batchmean")
                ce = F.cross_entropy(reference(xp), y_all[idx])
                loss = w_kl * kl + w_ce * ce
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return gen.eval()

    @torch.no_grad()
    def perturb(self, gen: Perturbation, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """uint8 images + delta, back to uint8 (the perturbation rounds to whole pixel levels)."""
        out = [gen(to_float(images[i:i + 1024].to(device), False)).mul(255).round().to(torch.uint8).cpu()
               for i in range(0, len(images), 1024)]
        return torch.cat(out)

    def evaluate(self, ctx):
        retune = Retune(self.config.retune)
        tuning, _ = retune.retuning_set(ctx)
        gen = self.train_generator(ctx, retune.retuned(ctx.purified, tuning, ctx))
        attack, test = ctx.attack, ctx.clean_test
        keep = attack.test_mask(test.labels, test.num_classes)
        clean_x = self.perturb(gen, test.images[keep], ctx.device)
        clean_t = attack.target_labels(test.labels[keep], test.num_classes)
        poison_x = self.perturb(gen, ctx.poisoned_test.images, ctx.device)
        out = {}
        for suffix, model in (("", ctx.purified), ("_clean_model", ctx.clean_model)):
            out[f"qra_c_asr{suffix}"] = attack_success_rate(predict(model, clean_x, ctx.device), clean_t)
            out[f"qra_p_asr{suffix}"] = attack_success_rate(predict(model, poison_x, ctx.device),
                                                            ctx.poisoned_test.labels)
        return out


@hookimpl
def harness_evaluators():
    return [QueryReactivation]
