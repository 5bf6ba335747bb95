"""i-BAU: adversarial unlearning of a universal perturbation, with the implicit hypergradient.

Paper: Zeng, Chen, Park, Mao, Jin & Jia, "Adversarial Unlearning of Backdoors
via Implicit Hypergradient", ICLR 2022. Authors' code ``YiZeng623/I-BAU``
(``clean_solution_batch_opt_hyperdimentional_cifar.ipynb``, ``defense.py``,
``hypergrad.py`` from Grazzi et al.'s ``hypertorch``), ported to BackdoorBench
as ``defense/i-bau.py`` with ``config/defense/i-bau/config.yaml``; paper 000
(B.2) runs BackdoorBench's port with K = 5 for 20 epochs.

The min-max problem: min_theta max_delta H(delta, theta), delta one universal
perturbation added to the images. The inner map (one gradient step on the
inner loss of the first reserve batch (x0, y0)) is
    Phi(delta, theta) = delta - beta * grad_delta L_in(delta, theta),
    L_in = -CE(f_theta(x0 + delta), y0) + lambda ||delta||^2,
and the outer loss of a batch (x, y) with a random fraction p of its images
perturbed is L_out(delta, theta) = CE(f_theta(x + m * delta), y).

Algorithm (the model stays in eval mode throughout, as in both codes):
1. copy the attacked model; Adam (amsgrad) on all its parameters; draw the
   reserve's batches once (shuffled, random crop + flip), as the code's
   ``images_list``;
2. for each of ``rounds`` rounds:
   a. inner maximization: delta <- 0 (shape [1, C, H, W], in the [0, 1]
      pixel units the model takes); one pass over the reserve in a fresh
      random order; per batch x: y' = f(x).argmax (the model's own labels),
      one SGD step (``inner_lr``, no momentum) on
      -CE(f(x + delta), y') + lambda ||delta||^2; after the pass project
      delta onto the L2 ball of radius ``norm_bound``;
   b. outer minimization, for each batch (x, y) of step 1: choose
      int(p * B) images to perturb; compute the hypergradient of L_out by
      ``fixed_point_iters`` = K fixed-point iterations (hypertorch's
      ``fixed_point``):
         g_d = dL_out/d delta, g_theta = dL_out/d theta (delta fixed);
         v <- 0; K times: v <- (dPhi/d delta)^T v + g_d;
         hypergradient = g_theta + (dPhi/d theta)^T v
      (v approximates (I - dPhi/d delta)^-T g_d by a truncated Neumann
      series, so the second term is the implicit-function-theorem term
      (d delta*/d theta)^T g_d); one Adam step with it.
3. return the model (eval mode).

Defaults (CIFAR-10): K = 5 (paper 000, BackdoorBench, authors); 20 rounds
(paper 000: "20 epochs"; BackdoorBench's yaml and the authors' script: 5);
Adam lr 1e-4, betas (0.9, 0.999), amsgrad, no weight decay, batch 256
(BackdoorBench's yaml and its ``argparser_opt_scheduler``; the authors use
Adam lr 1e-3, batch 100, without amsgrad); inner SGD lr 10, lambda 0.001,
fixed-point step beta 0.1, perturbed fraction p 0.01 (both codes); L2 bound
10 (the authors' notebook; their ``defense.py`` and BackdoorBench comment the
projection out: ``norm_bound: null`` gives that).

Departures:
- The hypergradient is hypertorch's fixed-point method, not simplified; two
  exact shortcuts: the first iteration (v = 0 -> g_d) is taken without a
  Hessian-vector product, and when no image of a batch is perturbed
  (int(p * B) = 0) g_d = 0, so v = 0 and the hypergradient is g_theta,
  computed without the inner graph. Iterations stop early when
  ||v_k - v_(k-1)|| < ``fixed_point_tol`` (hypertorch's tol).
- The perturbation lives in the [0, 1] pixel space the model takes (as in the
  authors' code, whose models have no normalisation layer); BackdoorBench
  adds it after normalisation, where bound 10 means about 2.5 in pixels.
  As in both codes, x + delta is not clipped to [0, 1].
- The ``lr_scheduler`` in BackdoorBench's yaml is created but never stepped:
  the learning rate is constant here too.
- Randomness (batch order, augmentation, which images are perturbed) comes
  from ``ctx.generator``; the codes use Python's and NumPy's global RNGs.
- The code's BN layers stay in eval mode (running statistics frozen); so do
  ours. Every pass runs in fp32 (also on CUDA; second-order gradients), and
  scaled-dot-product attention is pinned to its math kernel while the
  defense runs, the one kernel with second derivatives (ViT).
- Data: the harness's reserve (5% of the training set, as BackdoorBench's
  ``ratio``); the authors unlearn on 5,000 clean test images.
"""

from __future__ import annotations

import copy
from typing import Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from torch.nn.attention import SDPBackend, sdpa_kernel

from backdoor_harness.toolkit import Defense, HarnessError, PluginConfig, Purified, hookimpl, shuffled_batches, to_float


class IBAUConfig(PluginConfig):
    """Attributes:
        rounds: rounds of (inner maximization, one outer pass over the reserve).
        fixed_point_iters: K, fixed-point iterations of the hypergradient.
        fixed_point_tol: stop the iterations early when ||v_k - v_(k-1)|| is below it.
        fixed_point_step: beta, the step of the inner map Phi (gradient descent on L_in).
        lr: Adam learning rate of the outer (model) updates (constant).
        adam_beta1: Adam's first-moment decay.
        adam_beta2: Adam's second-moment decay.
        amsgrad: Adam's AMSGrad variant (BackdoorBench: on).
        weight_decay: Adam's weight decay.
        batch_size: images per batch (inner and outer).
        inner_lr: SGD learning rate of the perturbation's maximization.
        inner_reg: lambda, weight of ||delta||^2 in the inner losses.
        norm_bound: L2 radius delta is projected onto after its maximization
            (``null``: no projection, as BackdoorBench).
        patch_fraction: p, fraction of each outer batch that gets delta (int(p * B) images).
        inner_batch: which batch defines Phi: the ``first`` of the reserve's
            batches (the code) or the ``current`` outer batch.
        augment: random crop + flip of the reserve's batches (BackdoorBench's
            train transform).
    """

    rounds: int = Field(default=20, gt=0)
    fixed_point_iters: int = Field(default=5, gt=0)
    fixed_point_tol: float = Field(default=1e-10, ge=0)
    fixed_point_step: float = Field(default=0.1, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    amsgrad: bool = True
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=256, gt=0)
    inner_lr: float = Field(default=10.0, gt=0)
    inner_reg: float = Field(default=1e-3, ge=0)
    norm_bound: float | None = Field(default=10.0, gt=0)
    patch_fraction: float = Field(default=0.01, ge=0, le=1)
    inner_batch: Literal["first", "current"] = "first"
    augment: bool = True


# -- the two losses ----------------------------------------------------------------


def inner_loss(model: nn.Module, delta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, reg: float) -> torch.Tensor:
    """L_in = -CE(f(x + delta), y) + reg * ||delta||^2 (delta broadcast over the batch)."""
    return -F.cross_entropy(model(x + delta), y) + reg * delta.pow(2).sum()


def outer_loss(model: nn.Module, delta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               patched: torch.Tensor) -> torch.Tensor:
    """L_out = CE(f(x + m * delta), y), m = 1 on the ``patched`` images, 0 elsewhere."""
    m = patched.to(x.dtype)[:, None, None, None]
    return F.cross_entropy(model(x + m * delta), y)


# -- the inner maximization ----------------------------------------------------------


def project_l2(delta: torch.Tensor, bound: float | None) -> torch.Tensor:
    """delta * min(1, bound / ||delta||_2) (the whole tensor; ``None``: unchanged)."""
    if bound is None:
        return delta
    norm = torch.linalg.vector_norm(delta)
    return delta * torch.clamp(bound / (norm + 1e-12), max=1.0)


def maximize_perturbation(model: nn.Module, batches: Iterator[torch.Tensor], config: IBAUConfig,
                          shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One pass of SGD ascent on a universal perturbation, then the L2 projection.

    Each batch is labelled by the model's own predictions on it; the step
    descends -CE(f(x + delta), y') + lambda ||delta||^2. Returns delta
    ``[1, *shape]``, detached. ``model`` gets no gradients.
    """
    delta = torch.zeros((1, *shape), device=device, requires_grad=True)
    for x in batches:
        with torch.no_grad():
            y_own = model(x).argmax(1)
        loss = inner_loss(model, delta, x, y_own, config.inner_reg)
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta -= config.inner_lr * g
    return project_l2(delta.detach(), config.norm_bound)


# -- the implicit hypergradient --------------------------------------------------------


def hypergradient(model: nn.Module, params: list[torch.Tensor], delta: torch.Tensor,
                  outer: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                  inner: tuple[torch.Tensor, torch.Tensor], config: IBAUConfig) -> tuple[list[torch.Tensor], float]:
    """d L_out / d theta through the fixed point delta = Phi(delta, theta), by K fixed-point iterations.

    Args:
        params: the model's parameters theta (the outer variables).
        delta: the inner solution, ``[1, C, H, W]``.
        outer: (x, y, patched) of the outer loss.
        inner: (x0, y0), the batch that defines Phi.

    Returns:
        (one gradient per parameter, zeros where a parameter is unused;
        the outer loss at (delta, theta)).
    """
    x, y, patched = outer
    delta = delta.detach().requires_grad_(True)
    o_loss = outer_loss(model, delta, x, y, patched)
    g_delta, *g_theta = torch.autograd.grad(o_loss, [delta, *params], allow_unused=True)
    g_theta = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_theta)]
    if g_delta is None or not g_delta.any():
        return g_theta, float(o_loss.detach())  # v = 0: the implicit term vanishes
    x0, y0 = inner
    (grad_in,) = torch.autograd.grad(inner_loss(model, delta, x0, y0, config.inner_reg), delta, create_graph=True)
    mapped = delta - config.fixed_point_step * grad_in  # Phi(delta, theta), differentiable in both
    v = g_delta  # the first iteration, from v = 0
    done = float(torch.linalg.vector_norm(v)) < config.fixed_point_tol
    for _ in range(config.fixed_point_iters - 1):
        if done:
            break
        (jv,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
        v_new = jv + g_delta
        done = float(torch.linalg.vector_norm(v_new - v)) < config.fixed_point_tol
        v = v_new
    implicit = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    grads = [g if i is None else g + i for g, i in zip(g_theta, implicit)]
    return grads, float(o_loss.detach())


# -- the defense -----------------------------------------------------------------------


class IBAU(Defense):
    name = "ibau"
    version = "1"
    summary = "min-max unlearning of a universal L2 perturbation with the implicit (fixed-point) hypergradient"
    paper = ("Zeng, Chen, Park, Mao, Jin & Jia, Adversarial Unlearning of Backdoors via Implicit Hypergradient, "
             "ICLR 2022 (code: YiZeng623/I-BAU; BackdoorBench defense/i-bau.py)")
    Config = IBAUConfig
    needs = frozenset()
    families = frozenset({"*"})  # second derivatives through the forward pass only; the small ViT included

    def purify(self, model, ctx):
        cfg = self.config
        dev, rng = ctx.device, ctx.generator
        if len(ctx.reserve.labels) == 0:
            raise HarnessError("ibau: the reserve is empty")
        model = copy.deepcopy(model).to(dev).eval()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                               weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)
        images, labels = ctx.reserve.images.to(dev), ctx.reserve.labels.to(dev)
        aug = ctx.reserve.augmentation
        outer_batches = list(shuffled_batches(images, labels, cfg.batch_size, rng, augment=cfg.augment,
                                              floats=False, augmentation=aug))  # uint8, drawn once
        shape = tuple(images.shape[1:])
        with sdpa_kernel(SDPBackend.MATH):
            for _ in range(cfg.rounds):
                batches = (x for x, _ in shuffled_batches(images, labels, cfg.batch_size, rng, augment=cfg.augment,
                                                          augmentation=aug))
                delta = maximize_perturbation(model, batches, cfg, shape, dev)
                first = outer_batches[0]
                for xb, yb in outer_batches:
                    n = len(yb)
                    patched = torch.zeros(n, dtype=torch.bool)
                    patched[torch.randperm(n, generator=rng)[:int(n * cfg.patch_fraction)]] = True
                    x0, y0 = first if cfg.inner_batch == "first" else (xb, yb)
                    grads, _ = hypergradient(model, params, delta, (to_float(xb, False), yb, patched.to(dev)),
                                             (to_float(x0, False), y0), cfg)
                    for p, g in zip(params, grads):
                        p.grad = g
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        return Purified(model.eval())


@hookimpl
def harness_defenses():
    return [IBAU]
