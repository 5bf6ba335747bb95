"""Blended: a fixed pattern blended into the whole image.

Paper: Chen, Liu, Li, Lu, Song, "Targeted Backdoor Attacks on Deep Learning
Systems Using Data Poisoning", 2017.

x' = (1 - alpha) * x + alpha * t, rounded to uint8. The pattern ``t`` is a
fixed uniform-noise image drawn from ``pattern_seed`` (paper 000 uses Gaussian
noise; BackdoorBench uses a Hello-Kitty image, which the harness cannot ship,
so any pattern is generated here, never downloaded). ``alpha`` is used for
training and ``test_alpha`` (default: the same) for the test-time trigger, so
paper 000's 0.1 / 0.2 setting is ``{alpha: 0.1, test_alpha: 0.2}``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from backdoor_harness import Attack, AttackConfig, hookimpl


class BlendedConfig(AttackConfig):
    """Attributes:
        alpha: blend ratio of the training trigger.
        test_alpha: blend ratio at test time (default: ``alpha``).
        pattern_seed: seed of the noise pattern.
    """

    alpha: float = Field(default=0.2, gt=0, le=1)
    test_alpha: float | None = Field(default=None, gt=0, le=1)
    pattern_seed: int = 0


class Blended(Attack):
    name = "blended"
    version = "1"
    summary = "seeded uniform-noise pattern blended at alpha 0.2"
    paper = "Chen et al., Targeted Backdoor Attacks ... Using Data Poisoning, 2017"
    Config = BlendedConfig

    def pattern(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The trigger image, uint8 ``[C, H, W]``: the same for a seed and shape."""
        g = torch.Generator().manual_seed(self.config.pattern_seed)
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)

    def apply_trigger(self, images: torch.Tensor, *, train: bool = False) -> torch.Tensor:
        alpha = self.config.alpha if train or self.config.test_alpha is None else self.config.test_alpha
        t = self.pattern(tuple(images.shape[-3:])).to(images.device, torch.float32)
        out = (1 - alpha) * images.float() + alpha * t
        return out.round_().clamp_(0, 255).to(torch.uint8)


@hookimpl
def harness_attacks():
    return [Blended]
