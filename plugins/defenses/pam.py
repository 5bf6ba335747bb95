"""PAM (Path-Aware Minimization): tune with gradients taken on the path back to the backdoored model.

Paper: Min, Qin et al., "Uncovering, Explaining, and Mitigating the Superficial
Safety of Backdoor Defense", NeurIPS 2024 (paper 000, §4 and Algorithm 1);
authors' code ``fine_tune/BTIDBF/btidbfu.py --use_pam`` with ``sam.py``'s
class PAM, launched by ``defense.sh`` (facts in shared/reference/algorithms.md
§1c). PAM is BTI-DBF(U)'s unlearning loop with its optimizer replaced; the
inverted triggers come from :mod:`backdoor_harness.plugins.defenses.btidbf`.

Algorithm:
1. copy the attacked model; keep W0, its parameters, frozen; build BTI-DBF's
   trigger generator G and pre-train it towards the identity
   (``pretrain_epochs``, as BTI-DBF's step 1);
2. for each of ``rounds`` rounds:
   a. invert triggers with BTI-DBF on a copy of the current model (decouple
      benign features, train the generator G; from round 2 on G is also
      pushed towards the target); in round 1, detect the target class;
   b. for ``epochs`` epochs over the reserve (shuffled, random crop + flip),
      for each mini-batch (x, y):
      - replace int(``poison_fraction`` * B + 1) random images by G(x),
        keeping their true labels;
      - W_d = W0 - W over all parameters; e = rho * W_d / (||W_d||_2 + 1e-12),
        with ONE global L2 norm over all parameter tensors;
      - g = the gradient of CE(f(W + e; x_mixed), y), the model in train mode
        (BN uses batch statistics, and its running buffers are updated from
        the activations at W + e; buffers are never interpolated);
      - W <- SGD step on W with g (lr, momentum, no weight decay).
   On the very first step W = W0, so e = 0 and it is a plain SGD step.
3. return the model.

Defaults (CIFAR-10): rho 0.5 (``defense.sh``; the paper uses 0.5 for Blended
and SSBA and 0.9 for BadNets and LC, but a defense does not know the attack);
SGD lr 0.01, momentum 0.1, no weight decay, no schedule, batch 128; 3 rounds
of 30 epochs (``defense.sh``: ``nround`` 3, ``ul_round`` 30); 20% + 1
generated images per batch; CE only (BTI-DBF(U)'s feature-MSE term is
dropped by the code); inversion as BTI-DBF (the code's 4-level U-Net of
width 32, pre-trained 50 epochs; 20 decoupling epochs, 30 generator epochs;
soft bound, norm bound 0.3, feat bound 3). The generator options of
BTI-DBF's :class:`~backdoor_harness.plugins.defenses.btidbf.InversionConfig`
are inherited: ``generator: small``, ``bound: hard`` and ``pretrain_epochs``
select our cheaper form for CPU runs (``generator: small, bound: hard,
pretrain_epochs: 0`` is version 1 of this plugin).

Departures:
- The inversion carries BTI-DBF's departures (pre-training inside the defense,
  on the reserve; the model's own normalisation; uint8 outputs clamped): see
  the btidbf module.
- The perturbed pass uses ``torch.func.functional_call`` with W + e instead of
  writing W + e into the weights and restoring them: the same gradient, and
  BN's running buffers are updated at W + e, as in the code.
- The SGD momentum buffer restarts with each round (the code keeps one
  optimizer for all rounds); at momentum 0.1 this barely matters.
- The code's README suggests fewer epochs and rounds for Blended/SSBA; the
  defaults follow ``defense.sh``.
- The tuning runs through the harness's ``fit`` (on CUDA: bf16 autocast,
  channels_last); the code trains in fp32.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call

from backdoor_harness.plugins.defenses.btidbf import InversionConfig, TriggerInverter, mix_inverted
from backdoor_harness.toolkit import Defense, Purified, Recipe, StepInfo, hookimpl


class PAMConfig(InversionConfig):
    """Attributes:
        rho: the path-aware step size towards the backdoored model.
        rounds: inversion + tuning rounds (``nround``).
        epochs: PAM epochs per round (``ul_round``).
        lr: SGD learning rate (constant).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        poison_fraction: generated images per batch, int(fraction * B + 1).
        (and BTI-DBF's inversion settings, see ``btidbf``)
    """

    rho: float = Field(default=0.5, ge=0)
    rounds: int = Field(default=3, gt=0)
    epochs: int = Field(default=30, gt=0)
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    poison_fraction: float = Field(default=0.2, ge=0, le=1)


class PathAwareLoss:
    """``loss_fn`` for ``fit``: CE of the model at W + rho * (W0 - W) / ||W0 - W||.

    Its gradient with respect to W is the gradient at the interpolated point,
    so ``fit``'s optimizer step applies it to W (Algorithm 1, steps 4 to 7).

    Args:
        w0: name -> the backdoored model's parameter (``named_parameters`` names).
        rho: the path-aware step size.
        mix: optional ``mix(x, generator) -> x`` applied to each batch first
            (PAM mixes in generated images).
    """

    def __init__(self, w0: dict[str, torch.Tensor], rho: float,
                 mix: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None):
        self.w0, self.rho, self.mix = w0, rho, mix

    def shift(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """name -> e = rho * (W0 - W) / (||W0 - W||_2 + 1e-12), one global norm."""
        with torch.no_grad():
            diff = {n: self.w0[n].to(p.device) - p for n, p in model.named_parameters()}
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d.float()) for d in diff.values()]))
            scale = self.rho / (norm + 1e-12)
            return {n: d * scale.to(d.dtype) for n, d in diff.items()}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: StepInfo) -> torch.Tensor:
        if self.mix is not None:
            x = self.mix(x, step.generator)
        e = self.shift(model)
        shifted = {n: p + e[n] for n, p in model.named_parameters()}
        return F.cross_entropy(functional_call(model, shifted, (x,)), y)


class PAM(Defense):
    name = "pam"
    version = "2"  # 2: BTI-DBF's generator is the code's pre-trained U-Net with the soft bound by default
    summary = "Path-Aware Minimization: BTI-DBF data, gradients taken at W + rho (W0 - W)/||W0 - W||"
    paper = ("Min, Qin et al., Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor "
             "Defense, NeurIPS 2024 (Algorithm 1)")
    Config = PAMConfig
    needs = frozenset()
    families = frozenset({"*"})  # any model with timm's forward_features/forward_head, ViT included

    def purify(self, model, ctx):
        model = copy.deepcopy(model).to(ctx.device)
        cfg = self.config
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        inverter = TriggerInverter(model, ctx.reserve, cfg, ctx)
        recipe = Recipe.tuning(cfg, schedule="constant", augment=True)
        for r in range(cfg.rounds):
            generator = inverter.invert(model)
            if r == 0:
                inverter.detect_target(model)

            def mix(x, rng, generator=generator):
                return mix_inverted(generator, x, cfg.poison_fraction, rng)

            ctx.fit(model, ctx.reserve, recipe, device=ctx.device, generator=ctx.generator,
                    loss_fn=PathAwareLoss(w0, cfg.rho, mix))
        return Purified(model)


@hookimpl
def harness_defenses():
    return [PAM]
