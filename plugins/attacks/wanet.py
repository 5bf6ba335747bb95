"""WaNet: a small, smooth, fixed warping field as the trigger, with noise-warped cross samples.

Paper: Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack",
ICLR 2021.

Algorithm (training-controlled: the attacker runs the training loop):

1. Control grid: ``P`` uniform in ``[-1, 1]`` of shape ``[2, k, k]`` drawn
   from ``pattern_seed``, divided by its mean absolute value
   (``P / mean|P|``), so the mean displacement magnitude is fixed.
2. Field: ``P`` upsampled bicubically (``align_corners=True``) to ``H x W``,
   giving ``M`` ``[H, W, 2]`` (x then y displacement, grid_sample's order).
3. Warping grid: ``G = clamp((I + s * M / H) * grid_rescale, -1, 1)``, ``I``
   the identity sampling grid (``linspace(-1, 1)`` on both axes).
4. Trigger: ``x' = grid_sample(x, G, bilinear, align_corners=True)``;
   ``apply_trigger`` does that on the uint8 image and rounds back to uint8.
5. In each training batch of ``B`` images (already shuffled and augmented by
   the trainer): the first ``nb = round(poison_rate * B)`` are warped with
   ``G`` and relabelled to the target; the next ``nc = round(cross_ratio * nb)``
   are "noise" samples warped with ``clamp(G + U / H, -1, 1)``, ``U`` fresh
   uniform noise in ``[-1, 1]`` per image and pixel, kept at their TRUE
   labels (they stop the model from reacting to any warp); the rest are
   clean. ``poison_rate * B < 1``: one image with probability
   ``poison_rate * B``.

Defaults are BackdoorBench's CIFAR-10 ones (``config/attack/wanet/default.yaml``:
``k 4``, ``s 0.5``, ``grid_rescale 1``, ``cross_ratio 2``, ``pratio 0.1``,
target 0; conventions.md §2.8), which are also the paper's. ``mode: all2all``
(class c -> c + 1) is the paper's all-to-all attack.

How small the warp is: bicubic interpolation (PyTorch's ``a = -0.75``) at
fraction ``t`` weights the four control points with absolute sum
``1 + 2 * 0.75 * t * (1 - t) <= 1.375``, per axis, so
``|M| <= 1.375**2 * max|P|``; and ``max|P| <= 2 k**2`` (a mean of ``2 k**2``
absolute values is at least the largest over ``2 k**2``). Hence
``|G - I| <= s / H * 1.375**2 * max|P|`` (normalized units; one unit is
``(H - 1) / 2`` pixels), before the clamp, which only moves points inwards.
For the defaults and seed 0 that is under a pixel.

Departures:
    - Counts are ``round(rate * B)`` and ``round(cross_ratio * nb)``
      (the harness's convention); BackdoorBench truncates with ``int``.
    - BackdoorBench warps first and then augments (random crop padding 5 with
      p 0.8, random rotation 10 degrees with p 0.5, flip); here the trainer's
      augmentation (crop padding 4, flip) comes first and the warp after it,
      and the extra rotation/crop are skipped. The warp is then exactly the
      test-time warp on every poisoned sample.
    - The warping field comes from ``pattern_seed`` (BackdoorBench draws it
      from the global RNG at the start of training), so it is a fixed part of
      the attack's config, the same for every cell, and no state is saved.
    - The field is scaled by ``s / H`` on both axes (BackdoorBench's square-
      image formula; identical for square images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from backdoor_harness.toolkit import AllToAllConfig, Attack, hookimpl

#: Bound on the absolute weight sum of PyTorch's bicubic kernel (a = -0.75), per axis.
BICUBIC_GAIN = 1.375


def batch_count(rate: float, batch: int, generator: torch.Generator) -> int:
    """Images to poison in a batch: ``round(rate * B)``; below one, one with probability ``rate * B``
    (shared by the attacks that poison their training batches: WaNet, BppAttack, Input-Aware)."""
    expected = rate * batch
    if expected >= 1:
        return min(round(expected), batch)
    return int(bool(torch.rand((), generator=generator) < expected))


class BatchPoisoning(Attack):
    """A training-controlled attack whose training step is WaNet's scheme: rewrite the (shuffled,
    augmented) batch with :meth:`poison_batch`, then plain cross-entropy over it. BppAttack, whose
    authors' code is built on WaNet's, trains the same way with its own batch.
    """

    training_controlled = True

    def poison_batch(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                     num_classes: int) -> tuple:
        """``(images, labels, ...)``: the batch the model trains on (float images in [0, 1], any
        device; randomness from ``generator``, CPU), then whatever counts the attack reports."""
        raise NotImplementedError

    def training_loss(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, step
                      ) -> torch.Tensor:
        x, y, *_ = self.poison_batch(images, labels, step.generator, step.num_classes)
        return F.cross_entropy(model(x), y)


class WaNetConfig(AllToAllConfig):
    """Attributes:
        k: side of the control grid.
        s: strength of the warp.
        grid_rescale: scale of the whole sampling grid (1: none).
        cross_ratio: noise (cross) samples per backdoor sample in a batch.
        pattern_seed: seed of the control grid.
    """

    k: int = Field(default=4, ge=1)
    s: float = Field(default=0.5, gt=0)
    grid_rescale: float = Field(default=1.0, gt=0)
    cross_ratio: float = Field(default=2.0, ge=0)
    pattern_seed: int = 0


class WaNet(BatchPoisoning):
    name = "wanet"
    version = "1"
    summary = "training-controlled: fixed smooth warp (k 4, s 0.5) + noise-warped cross samples (BackdoorBench)"
    paper = "Nguyen & Tran, WaNet - Imperceptible Warping-based Backdoor Attack, ICLR 2021"
    Config = WaNetConfig

    def control_grid(self) -> torch.Tensor:
        """``P / mean|P|``, ``P`` uniform in [-1, 1], float32 ``[1, 2, k, k]``: the same for a seed."""
        k = self.config.k
        p = torch.rand(1, 2, k, k, generator=torch.Generator().manual_seed(self.config.pattern_seed)) * 2 - 1
        return p / p.abs().mean()

    def identity_grid(self, h: int, w: int) -> torch.Tensor:
        """The sampling grid that leaves an image unchanged, ``[1, H, W, 2]`` (x, y)."""
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        return torch.stack((xs, ys), dim=-1)[None]

    def grid(self, h: int, w: int) -> torch.Tensor:
        """The trigger's sampling grid ``G``, float32 ``[1, H, W, 2]`` on the CPU."""
        field = F.interpolate(self.control_grid(), size=(h, w), mode="bicubic", align_corners=True)
        field = field.permute(0, 2, 3, 1)
        g = (self.identity_grid(h, w) + self.config.s * field / h) * self.config.grid_rescale
        return g.clamp(-1, 1)

    def warp(self, images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Bilinear resampling of float images with ``grid`` ([1 or N, H, W, 2])."""
        grid = grid.to(images.device, images.dtype).expand(len(images), -1, -1, -1)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def apply_trigger(self, images: torch.Tensor, *, train: bool = False) -> torch.Tensor:
        h, w = images.shape[-2:]
        out = self.warp(images.float(), self.grid(h, w))
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def poison_batch(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The batch the model trains on: (images, labels, nb, nc).

        Rows ``[0, nb)`` are warped with ``G`` and labelled with the target,
        rows ``[nb, nb + nc)`` are warped with ``G`` plus noise at their true
        labels, the rest as given. ``images`` are float in [0, 1] on any
        device; randomness from ``generator`` (CPU).
        """
        b, _, h, w = images.shape
        nb = batch_count(self.config.poison_rate, b, generator)
        if nb == 0:
            return images, labels, 0, 0
        nc = min(round(self.config.cross_ratio * nb), b - nb)
        g = self.grid(h, w)
        x, y = images.clone(), labels.clone()
        x[:nb] = self.warp(images[:nb], g)
        y[:nb] = self.target_labels(labels[:nb], num_classes)
        if nc > 0:
            noise = torch.rand(nc, h, w, 2, generator=generator) * 2 - 1
            x[nb:nb + nc] = self.warp(images[nb:nb + nc], (g + noise / h).clamp(-1, 1))
        return x, y, nb, nc


@hookimpl
def harness_attacks():
    return [WaNet]
