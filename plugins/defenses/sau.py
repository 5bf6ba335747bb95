"""SAU (Shared Adversarial Unlearning): unlearn the adversarial examples the model shares with the backdoored one.

Paper: Wei, Zhang, Zha & Wu, "Shared Adversarial Unlearning: Backdoor
Mitigation by Unlearning Shared Adversarial Examples", NeurIPS 2023
(Algorithm 1, §5 experimental settings); the authors' code is BackdoorBench's
``defense/sau.py`` (class ``Shared_PGD`` and ``sau.mitigation``) with
``config/defense/sau/{config,cifar10}.yaml``.

Notation: f the model being purified (parameters theta), f0 the backdoored
model (a frozen copy of the input), x in [0, 1] images of the clean reserve
with labels y, B the batch size. A shared adversarial example (SAE) is an
x + delta that both models misclassify (each predicts something other than
its prediction on x) *with the same label*.

Algorithm:
1. copy the attacked model twice: f (trained) and f0 (frozen, eval mode);
   one Adam optimizer over f's parameters;
2. for each of ``epochs`` passes over the reserve (shuffled, no augmentation),
   for each mini-batch (x, y), both models in eval mode:
   a. shared PGD (the maximisation step): delta starts at ``pgd_init``
      (``max``: +eps everywhere), and for ``pgd_steps`` steps
      - yhat, yhat0 = f(x), f0(x) predictions; p, q = softmax f(x + delta),
        softmax f0(x + delta); "fooled" means the prediction on x + delta
        differs from that on x, "shared" means both fooled with equal labels;
      - L_adv = -[sum_{i: f not fooled} CE(f(x_i + delta_i), y_i)
                  + sum_{i: f0 not fooled} CE(f0(x_i + delta_i), y_i)] / (2B)
      - L_js = sum_{i not shared} JS(p_i, q_i) / B, with
        JS(p, q) = 1/2 sum_k [p_k log(p_k/m_k) + q_k log(q_k/m_k)],
        m = (p + q)/2, p and q clamped below at 1e-8;
      - delta <- delta - ``pgd_step_size`` * sign(grad_delta(beta_adv L_adv
        + beta_shared L_js)), projected onto ||delta||_inf <= ``eps`` (and
        x + delta onto [0, 1], see Departures);
      - stop early once every sample of the batch is a shared adversarial
        example;
   b. unlearning (the minimisation step), ``outer_steps`` Adam steps on
        lambda_clean CE(f(x), y) + lambda_at CE(f(x + delta), y)
        + lambda_shared L_sar,
      where, with ytil0 = argmax f0(x + delta) and
      P = {i : ytil0_i != y_i and ytil0_i != argmax f0(x_i)} (f0 is fooled
      away from both the label and its own clean prediction),
        L_sar = sum_{i in P} [ -log(1e-6 + min(1 - r_i, 0.999))
                               -log(1 + 1e-6 - max(r_i, 0.001)) ] / (2B),
      r_i = softmax(f(x_i + delta_i))[ytil0_i]: both terms are -log(1 - r_i)
      up to the guards, i.e. f is pushed off the label f0 gives the
      adversarial example (the SAE is "unlearned"); f sees x and x + delta
      in one concatenated forward pass;
3. return f in eval mode.

Defaults (CIFAR-10, with the source):
- eps 0.2 in [0, 1] pixel space, L_inf, 5 PGD steps (paper §5 and the
  configs' ``trigger_norm``, ``norm_type``, ``adv_steps``); step size 0.2
  (``adv_lr``); init ``max`` (``pgd_init``);
- beta_adv 0.01, beta_shared 1 (paper's lambda_3, lambda_4; code ``beta_1``,
  ``beta_2``); lambda_clean 1, lambda_shared 1 (paper's lambda_1, lambda_2;
  code ``lmd_1``, ``lmd_3``), lambda_at 0 (code ``lmd_2``: plain adversarial
  training off); one unlearning step per batch (``outer_steps``);
- 100 epochs (paper §5: "100 epochs in CIFAR-10"; code ``n_rounds``);
- Adam lr 1e-4, betas (0.9, 0.999), no weight decay, batch 256 (configs;
  BackdoorBench's convention for SAU and I-BAU); the lr is constant: the
  configs name a cosine scheduler, but SAU's loop never steps it;
- no augmentation (the code loads the reserve with the test transform);
  BatchNorm in eval mode during unlearning (code ``train_mode`` False);
- the harness's 5% reserve (paper: 5% clean data; code ``ratio`` 0.05).

Departures:
- x + delta is clipped to [0, 1] in every PGD step (``clip_images``; the code
  leaves the clip out: "not necessary for backdoor defense"), so the
  adversarial examples are valid images, which the harness's models expect.
- The early stop tests "all shared" *before* the step and keeps that delta;
  the code tests the masks of the step just taken after it has already
  moved delta once more.
- ``pgd_init="random"`` draws delta ~ U(-eps, eps) from ``ctx.generator``
  (on the CPU); the code's ``torch.rand_like`` draws U(0, 1) and clips it to
  eps (almost all +eps). The default ``max`` is deterministic anyway.
- Only the L_inf ball of the paper's experiments (the code also offers L1,
  L2 and an unconstrained "Reg" variant).
- The clean predictions yhat, yhat0 are computed once per batch (the code
  recomputes them in every PGD step; f does not change within the step, so
  they are the same in eval mode).
- The reserve is the harness's (default 5% of the training set, drawn per
  seed; BackdoorBench reads a fixed index file when given one).
- On CUDA every forward pass runs under bf16 autocast with channels_last
  (as the harness's ``fit``; the losses are computed in fp32); the code
  runs SAU in fp32 (its ``amp`` flag is not used by SAU).
- ``train_mode`` (off by default) enables dropout where a model has it,
  drawn from torch's global generator; the harness's models have none.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from backdoor_harness.toolkit import Defense, HarnessError, PluginConfig, Purified, augment_batch, hookimpl, to_float


class SAUConfig(PluginConfig):
    """Attributes:
        epochs: passes over the reserve (code ``n_rounds``).
        batch_size: images per step.
        lr: Adam learning rate (constant).
        adam_beta1: Adam's first-moment decay.
        adam_beta2: Adam's second-moment decay.
        weight_decay: Adam's (L2) weight decay.
        eps: L_inf radius of the perturbation, in [0, 1] pixel units (``trigger_norm``).
        pgd_step_size: PGD step size (``adv_lr``).
        pgd_steps: PGD steps per batch (``adv_steps``).
        pgd_init: the starting perturbation: ``max`` (+eps), ``min`` (-eps),
            ``zero`` or ``random`` (U(-eps, eps) from the cell's generator).
        beta_adv: weight of L_adv in the PGD objective (``beta_1``; paper lambda_3).
        beta_shared: weight of the JS agreement term in the PGD objective
            (``beta_2``; paper lambda_4).
        lambda_clean: weight of CE on clean images (``lmd_1``; paper lambda_1).
        lambda_at: weight of CE on the adversarial images (``lmd_2``; plain
            adversarial training, off by default).
        lambda_shared: weight of the shared-adversarial unlearning loss L_sar
            (``lmd_3``; paper lambda_2).
        outer_steps: unlearning steps per batch on the same perturbation.
        clip_images: keep x + delta in [0, 1] (a departure from the code, see the module docstring).
        augment: random crop + flip of each batch (the code: none).
        train_mode: BatchNorm in train mode for the unlearning pass (``train_mode``;
            the code's default keeps eval mode, "higher ACC but also higher ASR" otherwise).
    """

    epochs: int = Field(default=100, gt=0)
    batch_size: int = Field(default=256, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    eps: float = Field(default=0.2, gt=0, le=1)
    pgd_step_size: float = Field(default=0.2, gt=0)
    pgd_steps: int = Field(default=5, gt=0)
    pgd_init: Literal["max", "min", "zero", "random"] = "max"
    beta_adv: float = Field(default=0.01, ge=0)
    beta_shared: float = Field(default=1.0, ge=0)
    lambda_clean: float = Field(default=1.0, ge=0)
    lambda_at: float = Field(default=0.0, ge=0)
    lambda_shared: float = Field(default=1.0, ge=0)
    outer_steps: int = Field(default=1, gt=0)
    clip_images: bool = True
    augment: bool = False
    train_mode: bool = False


# --------------------------------------------------------------------------
# The two losses (pure functions of logits, so they can be checked by hand)
# --------------------------------------------------------------------------


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence of the two softmaxes (natural log), probabilities clamped at 1e-8."""
    p = F.softmax(logits_a.float(), dim=1).clamp(min=1e-8)
    q = F.softmax(logits_b.float(), dim=1).clamp(min=1e-8)
    m = 0.5 * (p + q)
    return 0.5 * (p * (p.log() - m.log()) + q * (q.log() - m.log())).sum(dim=1)


def shared_pgd_objective(logits: torch.Tensor, logits_ref: torch.Tensor, clean_pred: torch.Tensor,
                         clean_pred_ref: torch.Tensor, labels: torch.Tensor, beta_adv: float,
                         beta_shared: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The PGD objective (minimised over delta) and which samples are already shared adversarial examples.

    Args:
        logits, logits_ref: f(x + delta), f0(x + delta).
        clean_pred, clean_pred_ref: argmax f(x), argmax f0(x).
        labels: y.

    Returns:
        (beta_adv * L_adv + beta_shared * L_js, shared mask ``[B]``).
    """
    b = len(labels)
    logits, logits_ref = logits.float(), logits_ref.float()
    pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
    fooled, fooled_ref = pred != clean_pred, pred_ref != clean_pred_ref
    shared = fooled & fooled_ref & (pred == pred_ref)
    ce = F.cross_entropy(logits, labels, reduction="none")
    ce_ref = F.cross_entropy(logits_ref, labels, reduction="none")
    adv = -((ce * ~fooled).sum() + (ce_ref * ~fooled_ref).sum()) / (2 * b)
    js = (js_divergence(logits, logits_ref) * ~shared).sum() / b
    return beta_adv * adv + beta_shared * js, shared


def shared_unlearning_loss(adv_logits: torch.Tensor, adv_logits_ref: torch.Tensor, clean_logits_ref: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
    """L_sar: push f off the label f0 gives each adversarial example that fools f0.

    Args:
        adv_logits: f(x + delta) (with gradient).
        adv_logits_ref, clean_logits_ref: f0(x + delta), f0(x).
        labels: y.
    """
    b = len(labels)
    target = adv_logits_ref.argmax(1)
    poison = (target != labels) & (target != clean_logits_ref.argmax(1))
    if not bool(poison.any()):
        return adv_logits.sum() * 0.0
    prob = F.softmax(adv_logits.float(), dim=1)
    onehot = F.one_hot(target, prob.shape[1]).to(prob.dtype)
    pos = (prob * onehot).sum(1)[poison]
    neg = (prob * (1 - onehot)).sum(1)[poison]  # = 1 - pos, summed directly as the code does
    loss = -torch.log(1e-6 + neg.clamp(max=0.999)).sum() - torch.log(1 + 1e-6 - pos.clamp(min=0.001)).sum()
    return loss / 2 / b


# --------------------------------------------------------------------------
# Shared PGD (step 2a)
# --------------------------------------------------------------------------


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _project(delta: torch.Tensor, x: torch.Tensor, eps: float, clip_images: bool) -> torch.Tensor:
    delta = delta.clamp(-eps, eps)
    return (x + delta).clamp(0, 1) - x if clip_images else delta


def initial_perturbation(x: torch.Tensor, cfg: SAUConfig, generator: torch.Generator) -> torch.Tensor:
    """delta_0 for ``cfg.pgd_init``, projected; ``random`` is drawn on the CPU from ``generator``."""
    eps = cfg.eps
    if cfg.pgd_init == "random":
        delta = (torch.rand(x.shape, generator=generator) * 2 - 1).mul_(eps).to(x.device)
    else:
        fill = {"max": eps, "min": -eps, "zero": 0.0}[cfg.pgd_init]
        delta = torch.full(x.shape, fill, device=x.device)
    return _project(delta, x, eps, cfg.clip_images)


def shared_pgd(model: nn.Module, ref: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SAUConfig,
               generator: torch.Generator) -> torch.Tensor:
    """Shared adversarial perturbations of the batch ``x`` ([0, 1] floats) against ``model`` and ``ref``.

    Both models are used as they are (the caller puts them in eval mode);
    only delta gets gradients. Returns delta (detached), with
    ``|delta| <= eps`` and, with ``clip_images``, ``x + delta`` in [0, 1].
    """
    dev = x.device
    with torch.no_grad(), _autocast(dev):
        clean_pred, clean_pred_ref = model(x).argmax(1), ref(x).argmax(1)
    delta = initial_perturbation(x, cfg, generator)
    for _ in range(cfg.pgd_steps):
        delta.requires_grad_(True)
        xa = x + delta
        with _autocast(dev):
            logits, logits_ref = model(xa), ref(xa)
        loss, shared = shared_pgd_objective(logits, logits_ref, clean_pred, clean_pred_ref, y,
                                            cfg.beta_adv, cfg.beta_shared)
        if bool(shared.all()):
            break
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = _project(delta - cfg.pgd_step_size * grad.sign(), x, cfg.eps, cfg.clip_images)
    return delta.detach()


# --------------------------------------------------------------------------
# The defense
# --------------------------------------------------------------------------


def unlearning_loss(model: nn.Module, ref: nn.Module, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor,
                    cfg: SAUConfig) -> torch.Tensor:
    """Step 2b's loss: lambda_clean CE(f(x)) + lambda_at CE(f(x + delta)) + lambda_shared L_sar."""
    xa = x + delta
    dev = x.device
    if cfg.train_mode:
        model.train()
    with _autocast(dev):
        both = model(torch.cat([x, xa])).float()
    model.eval()
    logits, adv_logits = both[: len(y)], both[len(y):]
    with torch.no_grad(), _autocast(dev):
        clean_ref, adv_ref = ref(x).float(), ref(xa).float()
    loss = cfg.lambda_clean * F.cross_entropy(logits, y)
    if cfg.lambda_at:
        loss = loss + cfg.lambda_at * F.cross_entropy(adv_logits, y)
    return loss + cfg.lambda_shared * shared_unlearning_loss(adv_logits, adv_ref, clean_ref, y)


class SAU(Defense):
    name = "sau"
    version = "1"
    summary = "Shared Adversarial Unlearning: PGD for examples fooling both models alike, unlearn them (Adam)"
    paper = ("Wei, Zhang, Zha & Wu, Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared "
             "Adversarial Examples, NeurIPS 2023; BackdoorBench defense/sau.py")
    Config = SAUConfig
    needs = frozenset()
    #: input-space PGD and a loss on logits: any classifier (checked on the small ViT too)
    families = frozenset({"*"})

    def purify(self, model, ctx):
        cfg = self.config
        dev, cuda = ctx.device, ctx.device.type == "cuda"
        model = copy.deepcopy(model).to(dev)
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        if cuda:
            model.to(memory_format=torch.channels_last)
            ref.to(memory_format=torch.channels_last)
        model.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                               weight_decay=cfg.weight_decay)
        images, labels = ctx.reserve.images.to(dev), ctx.reserve.labels.to(dev)
        n, bs = len(labels), cfg.batch_size
        if n == 0:
            raise HarnessError("SAU: the reserve is empty")
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=ctx.generator).to(dev)
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                xb, y = images[idx], labels[idx]
                if cfg.augment:
                    xb = augment_batch(xb, ctx.generator, ctx.reserve.augmentation)
                x = to_float(xb, cuda)
                delta = shared_pgd(model, ref, x, y, cfg, ctx.generator)
                for _ in range(cfg.outer_steps):
                    loss = unlearning_loss(model, ref, x, delta, y, cfg)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            if not torch.isfinite(loss.detach()):
                raise HarnessError(f"SAU diverged (loss {float(loss)}); lower lr")
        return Purified(model.eval())


@hookimpl
def harness_defenses():
    return [SAU]
