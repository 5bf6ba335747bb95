"""LF: a universal low-frequency additive trigger optimized against a clean model.

Paper: Zeng, Park, Mao, Jia, "Rethinking the Backdoor Attacks' Triggers: A
Frequency Perspective", ICCV 2021 (code: YiZeng623/frequency-backdoor;
BackdoorBench ``attack/lf.py`` and ``resource/lowFrequency/generate_pattern.py``,
``universal_pert.py``, ``gauss_smooth.py``).

Algorithm:

1. ``prepare``: draw ``num_images`` training images of the non-target classes
   (uniformly, from the generator) and start from the pattern ``p = 0``
   (float ``[3, H, W]``, grey levels on the 0-255 scale).
2. Repeat ``iterations`` times, cycling over batches of ``batch_size`` of those
   images: take the gradient ``g`` of ``CE(f(clip(x + p / 255, 0, 1)), target)``
   with respect to ``p`` (the clean model ``f`` is the surrogate; the loss is
   minimised, i.e. the pattern pushes images to the target class), project it
   on the low-frequency subspace, and step ``p <- p - step_size * g / max|g|``.
3. After each step project ``p`` on the low-frequency subspace: zero every
   2-D DFT coefficient (per channel) whose signed frequency index is outside
   ``|k_h| <= freq_window`` and ``|k_w| <= freq_window``; then scale ``p`` down
   to the budget ``max|p| <= eps`` (a scaling keeps the spectrum in the window,
   a clip would not).
4. The trigger is additive: ``x' = clip(round(x + p), 0, 255)``; all-to-one data
   poisoning: ``round(poison_rate * N)`` images drawn from the whole set get
   it and the target label.

What is the paper's and what is substituted: the additive, universal,
low-frequency, target-directed pattern and the poisoning are the paper's and
BackdoorBench's. The pattern itself is NOT: BackdoorBench ships pattern files
(``resource/lowFrequency/{dataset}_{model}_0_255.npy``) made with DeepFool and
a Gaussian low-pass; here ``prepare`` generates its own with the procedure
above against the cell's clean reference model (``substitute``).

Defaults (BackdoorBench CIFAR-10, conventions.md §2.8: pratio 0.1, target 0):
    - ``eps = 25.5`` grey levels: BackdoorBench's ``normalization`` rescales the
      pattern to a range of 0.2 (= 51 grey levels peak to peak) after every
      update; a symmetric budget of +-0.1 * 255 has the same range.
    - ``freq_window = 3``: BackdoorBench's low-pass is a separable Gaussian of
      sigma 6 px (``gauss_smooth``, sig=6); its gain at DFT index k on 32 px is
      ``exp(-2 pi^2 36 k^2 / 1024)``: 0.50 (k=1), 0.06 (k=2), 0.002 (k=3), so a
      window of radius 3 keeps everything it passes.
    - ``num_images = 1000``, ``iterations = 200``, ``step_size = 2`` grey levels,
      ``batch_size = 250``: chosen for a few seconds on a GPU (see Departures).

Departures:
    - BackdoorBench builds the pattern with a universal-perturbation loop over
      targeted DeepFool steps (overshoot 0.02, up to 200 DeepFool iterations,
      up to 50 passes over 100 random training images, stopping at 80 % fooling
      rate on the test set or when the fooling rate stalls), smoothing with the
      Gaussian and min-max normalizing to [0, 0.2] after each image. Here:
      batched gradient descent on the targeted cross-entropy, an exact
      projection on a square DFT window instead of the Gaussian, a symmetric
      L_inf budget (scaling) instead of min-max normalization to [0, 0.2], a
      fixed number of iterations, and images of the non-target classes only.
    - BackdoorBench stores the pattern as uint8 and adds it with truncation
      (``astype(uint8)``); here the float pattern is kept and the sum rounded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from backdoor_harness.toolkit import Attack, AttackConfig, HarnessError, hookimpl


def lowpass_mask(height: int, width: int, radius: int) -> torch.Tensor:
    """bool ``[H, W]`` over the (unshifted) 2-D DFT: signed frequency indices within ``radius`` in both axes."""
    kh = torch.fft.fftfreq(height, d=1.0 / height).abs()
    kw = torch.fft.fftfreq(width, d=1.0 / width).abs()
    return (kh[:, None] <= radius) & (kw[None, :] <= radius)


def lowpass(x: torch.Tensor, radius: int) -> torch.Tensor:
    """``x`` (real, ``[..., H, W]``) with every DFT coefficient outside the window set to zero."""
    mask = lowpass_mask(*x.shape[-2:], radius).to(x.device)
    return torch.fft.ifft2(torch.fft.fft2(x) * mask).real.to(x.dtype)


class LFConfig(AttackConfig):
    """Attributes:
        eps: L_inf budget of the pattern in grey levels (0-255 scale).
        freq_window: radius of the kept square DFT window (signed frequency index, per axis).
        num_images: clean non-target-class training images the pattern is optimized on.
        iterations: optimization steps.
        step_size: L_inf size of one step in grey levels.
        batch_size: images per step.
    """

    eps: float = Field(default=25.5, gt=0, le=255)
    freq_window: int = Field(default=3, ge=0)
    num_images: int = Field(default=1000, gt=0)
    iterations: int = Field(default=200, ge=0)
    step_size: float = Field(default=2.0, gt=0)
    batch_size: int = Field(default=250, gt=0)


class LF(Attack):
    name = "lf"
    version = "1"
    summary = "universal low-frequency additive pattern (DFT window 3, L_inf 25.5) optimized against the clean model"
    paper = "Zeng, Park, Mao, Jia, Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective, ICCV 2021"
    Config = LFConfig
    prepare_needs_clean_model = True
    substitute = ("own universal low-frequency pattern (gradient steps in a DFT window of radius 3) against the "
                  "cell's clean model, not BackdoorBench's DeepFool-made pattern files")

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.pattern: torch.Tensor | None = None

    def project(self, p: torch.Tensor) -> torch.Tensor:
        """Low-pass, then scaled into the L_inf budget."""
        p = lowpass(p, self.config.freq_window)
        peak = float(p.abs().max())
        return p * (self.config.eps / peak) if peak > self.config.eps else p

    def prepare(self, ctx) -> None:
        model = ctx.clean_model
        if model is None:
            raise HarnessError("lf: prepare needs the clean reference model (ctx.clean_model is None)")
        model.eval()
        images = ctx.train.images
        h, w = images.shape[-2:]
        if 2 * self.config.freq_window >= min(h, w):
            raise HarnessError(f"lf: freq_window {self.config.freq_window} is not a low-pass window for "
                               f"{h}x{w} images (it must be below {min(h, w) // 2})")
        pool = (ctx.train.labels != self.config.target).nonzero().flatten()
        pick = pool[torch.randperm(len(pool), generator=ctx.generator)[:self.config.num_images]]
        x_all = images[pick].to(ctx.device)
        target = torch.full((self.config.batch_size,), self.config.target, dtype=torch.int64, device=ctx.device)
        p = torch.zeros(images.shape[1:], dtype=torch.float32, device=ctx.device)
        n, b = len(pick), self.config.batch_size
        for it in range(self.config.iterations):
            start = (it * b) % max(n, 1)
            xb = x_all[start:start + b].float() / 255
            p.requires_grad_(True)
            out = model((xb + p / 255).clamp(0, 1))
            loss = F.cross_entropy(out, target[:len(xb)])
            (g,) = torch.autograd.grad(loss, p)
            g = lowpass(g, self.config.freq_window)
            peak = g.abs().max()
            p = p.detach()
            if peak > 0:
                p = p - self.config.step_size * g / peak
            p = self.project(p)
        self.pattern = p.detach().cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.pattern is None else {"pattern": self.pattern}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.pattern = state["pattern"].float()

    def apply_trigger(self, images: torch.Tensor, *, train: bool = False) -> torch.Tensor:
        if self.pattern is None:
            raise HarnessError("lf: the pattern is missing; run prepare() or load_state_dict() first")
        p = self.pattern.to(images.device)
        return (images.float() + p).round_().clamp_(0, 255).to(torch.uint8)


@hookimpl
def harness_attacks():
    return [LF]
