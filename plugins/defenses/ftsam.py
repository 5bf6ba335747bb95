"""FT-SAM: fine-tune on the clean reserve with (adaptive) sharpness-aware minimization.

Paper: Zhu, Wei, Shen, Fan & Wu, "Enhancing Fine-Tuning Based Backdoor Defense
with Sharpness-Aware Minimization", ICCV 2023. Code: BackdoorBench
``defense/ft-sam.py`` with ``utils/defense_utils/sam/`` (class ``SAM``,
``smooth_crossentropy``) and ``config/defense/ft-sam/cifar10.yaml``; paper 000
(Appendix B.2) runs the copy of that script in the FST repository
(``AISafety-HKUST/stable_backdoor_purification``, ``defense/ft-sam.py``).

Algorithm:
1. copy the attacked model;
2. for each of ``epochs`` epochs over the reserve (shuffled, random crop +
   flip), model in train mode, for each mini-batch (x, y):
   a. g = grad_W L(W; x, y), L the label-smoothed cross-entropy (probability
      1 - s on the label, s / (K - 1) on each other class); this pass
      updates the BatchNorm running statistics;
   b. the ascent step, one global norm over all parameter tensors:
      adaptive: e = rho * T^2 g / ||T g||_2 with T = |W| + eta (element-wise);
      plain SAM: e = rho * g / ||g||_2;
   c. g' = grad L(W + e; x, y), BN on batch statistics (its running
      statistics are NOT updated by this pass);
   d. W <- SGD step on W with g' (momentum, weight decay on W); the learning
      rate follows a cosine over the epochs.
3. return the model.

With rho = 0, e = 0 and each step is a plain fine-tuning step.

Defaults (CIFAR-10):
- rho 1.0: paper 000, B.2 ("neighborhood size 1 for CIFAR-10");
  BackdoorBench's yaml has ``rho_max = rho_min = 2.0`` (its ``--rho`` flag is
  unused; the radius comes from ``ProportionScheduler``, constant when
  max = min).
- adaptive on, eta 0: the code's ``--adaptive`` is ``store_false`` (on unless
  passed), and its scale is T = |W| with no offset (Kwon et al.'s ASAM adds
  eta = 0.01, as the harness's ``Recipe.sam_adaptive`` does).
- label smoothing 0.1: the code's ``--label_smoothing`` default.
- lr 0.01 (paper 000 and BackdoorBench), 20 epochs (paper 000; BackdoorBench
  100), SGD momentum 0.9, weight decay 5e-4, batch 256 (BackdoorBench's yaml).

Departures:
- Learning-rate schedule: BackdoorBench steps ``CosineAnnealingLR(T_max=100)``
  after every *batch*, so with a 2,500-image reserve (10 batches an epoch) the
  rate falls to 0 after 10 epochs and climbs back to 0.01 by epoch 20. Here
  the cosine is annealed once over all epochs, stepped per epoch (the
  harness's ``fit``).
- The perturbed pass uses ``torch.func.functional_call`` with W + e (and
  copies of the BN buffers) instead of writing W + e into the weights and
  restoring them: the same gradient; the code keeps the running statistics
  of the second pass out by setting BN momentum to 0, here they go to the
  copies.
- The loss is the cross-entropy against the smoothed target; the code's
  ``smooth_crossentropy`` is the KL divergence to it, which differs by the
  target's entropy, a constant: the same gradients.
- GSAM's gradient decomposition (``--alpha``) is left out: the code's default
  0 makes it a no-op.
- Data: the harness's reserve (5% of the training set); the code draws 5%
  per class. On CUDA ``fit`` runs both passes under bf16 autocast; the code
  trains in fp32.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call

from backdoor_harness.toolkit import Defense, PluginConfig, Purified, Recipe, StepInfo, hookimpl


class FTSAMConfig(PluginConfig):
    """Attributes:
        rho: radius of the ascent step (SAM's neighbourhood size).
        adaptive: scale the ascent by T = |W| + eta (ASAM, the code's default);
            ``false`` is plain SAM.
        eta: the offset of the adaptive scale (the code: 0; ASAM: 0.01).
        label_smoothing: s of the smoothed target (1 - s on the label,
            s / (K - 1) elsewhere); 0 is plain cross-entropy.
        epochs: passes over the reserve.
        lr: initial SGD learning rate (cosine-annealed over the epochs).
        batch_size: images per step.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
    """

    rho: float = Field(default=1.0, ge=0)
    adaptive: bool = True
    eta: float = Field(default=0.0, ge=0)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    epochs: int = Field(default=20, gt=0)
    lr: float = Field(default=0.01, gt=0)
    batch_size: int = Field(default=256, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)

    def recipe(self) -> Recipe:
        # label_smoothing is the SAM loss's (the trainer's applies only without a loss_fn)
        return Recipe.tuning(self, schedule="cosine", augment=True, label_smoothing=0.0)


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean cross-entropy against the target 1 - s on the label and s / (K - 1) on every other class."""
    logp = F.log_softmax(logits.float(), dim=1)
    if not smoothing:
        return F.nll_loss(logp, labels)
    k = logits.shape[1]
    target = torch.full_like(logp, smoothing / (k - 1))
    target.scatter_(1, labels[:, None], 1.0 - smoothing)
    return -(target * logp).sum(1).mean()


class SharpnessAwareLoss:
    """``loss_fn`` for ``fit``: the loss at W + e, e SAM's (or ASAM's) ascent step.

    Calling it runs the pass at W (gradient g, BN running statistics
    updated), computes e, and returns the loss of the pass at W + e (running
    statistics left alone), whose gradient with respect to W is the
    gradient at W + e: ``fit``'s optimizer step then applies it to W.
    """

    def __init__(self, rho: float, adaptive: bool = True, eta: float = 0.0, label_smoothing: float = 0.0):
        self.rho, self.adaptive, self.eta, self.smoothing = rho, adaptive, eta, label_smoothing

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return smoothed_cross_entropy(logits, labels, self.smoothing)

    def ascent(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> e for every trainable parameter (the pass at W, in the model's current mode)."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        grads = torch.autograd.grad(self.loss(model(x), y), list(params.values()), allow_unused=True)
        with torch.no_grad():
            g = {n: (torch.zeros_like(p) if gr is None else gr.to(p.dtype))
                 for (n, p), gr in zip(params.items(), grads)}
            t = {n: p.abs() + self.eta for n, p in params.items()} if self.adaptive else None
            tg = [t[n] * g[n] for n in g] if t is not None else list(g.values())
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v.float()) for v in tg]))
            scale = self.rho / (norm + 1e-12)
            if t is None:
                return {n: v * scale.to(v.dtype) for n, v in g.items()}
            return {n: t[n] * t[n] * g[n] * scale.to(g[n].dtype) for n in g}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: StepInfo) -> torch.Tensor:
        e = self.ascent(model, x, y)
        shifted = {n: p + e[n] for n, p in model.named_parameters() if n in e}
        buffers = {n: b.clone() for n, b in model.named_buffers()}  # the perturbed pass's BN updates go here
        return self.loss(functional_call(model, {**shifted, **buffers}, (x,)), y)


class FTSAM(Defense):
    name = "ftsam"
    version = "1"
    summary = "fine-tune on the reserve with adaptive sharpness-aware minimization (gradient at W + e)"
    paper = ("Zhu, Wei, Shen, Fan & Wu, Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware "
             "Minimization, ICCV 2023 (code: BackdoorBench defense/ft-sam.py)")
    Config = FTSAMConfig
    needs = frozenset()
    families = frozenset({"*"})  # only parameters and a forward pass: CNNs and the small ViT alike

    def purify(self, model, ctx):
        model = copy.deepcopy(model)
        cfg = self.config
        loss = SharpnessAwareLoss(cfg.rho, cfg.adaptive, cfg.eta, cfg.label_smoothing)
        ctx.fit(model, ctx.reserve, cfg.recipe(), device=ctx.device, generator=ctx.generator, loss_fn=loss)
        return Purified(model)


@hookimpl
def harness_defenses():
    return [FTSAM]
