"""BadNets: a small fixed patch stamped onto poisoned images.

Paper: Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the
Machine Learning Model Supply Chain", 2017 (IEEE Access 2019).

The patch is a ``patch_size`` x ``patch_size`` block in the bottom-right
corner (rows/cols 29-31 at 32x32), replacing the pixels under it in all three
channels. Two patterns (``pattern``):

- ``square`` (the default): every patch pixel is ``value`` (255), a white
  square. This is BackdoorBench's CIFAR-10 default
  (``config/attack/badnet/default.yaml`` -> ``resource/badnet/trigger_image.png``).
- ``checkerboard``: paper 000's trigger (Min, Qin et al., NeurIPS 2024,
  Appendix B, "a 3 x 3 checkerboard patch ... lower right corner"), as
  BackdoorBench's ``resource/badnet/trigger_image_grid.png`` (made by
  ``generate_grid.py``): patch pixel (i, j), counted from the patch's
  top-left corner, is ``value`` (255) when ``i + j`` is even and
  ``low_value`` (1) when it is odd. At 3x3 the four corners and the centre
  are white, the four edge middles are 1:

      row 29:  255   1  255
      row 30:    1 255    1
      row 31:  255   1  255

  BackdoorBench's "black" cells are 1, not 0, because its patch file marks
  the trigger's area by pixel values > 0; ``low_value: 0`` gives a true
  black-and-white board.

All-to-one (target 0) by default; ``mode: all2all`` maps class c to
(c + 1) mod C, as the paper's all-to-all attack. Poisoned indices are drawn
uniformly from the whole training set (target-class images included), as
BackdoorBench does.

Departure: BackdoorBench resizes its 32x32 patch file to other resolutions
(so at 64x64 its checkerboard cells are 2x2 pixels); here the patch is
``patch_size`` pixels at any resolution.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from backdoor_harness.toolkit import AllToAllConfig, Attack, HarnessError, hookimpl


class BadNetsConfig(AllToAllConfig):
    """Attributes:
        pattern: ``square`` (every patch pixel ``value``) or ``checkerboard``
            (``value`` where row + column within the patch is even, ``low_value`` where odd).
        patch_size: side of the square patch, in pixels.
        value: the patch's (white) pixel value (0-255).
        low_value: the checkerboard's other pixel value (0-255; BackdoorBench's 1).
        mode: ``all2one`` or ``all2all`` (see :class:`AllToAllConfig`).
    """

    pattern: Literal["square", "checkerboard"] = "square"
    patch_size: int = Field(default=3, gt=0)
    value: int = Field(default=255, ge=0, le=255)
    low_value: int = Field(default=1, ge=0, le=255)

    @model_validator(mode="after")
    def _low_value_only_for_checkerboard(self) -> "BadNetsConfig":
        if self.low_value != type(self).model_fields["low_value"].default and self.pattern != "checkerboard":
            raise ValueError("low_value is the checkerboard's second value; set pattern: checkerboard "
                             "or remove low_value")
        return self


class BadNets(Attack):
    name = "badnets"
    version = "1"
    summary = "3x3 white square (or pattern: checkerboard, paper 000's) in the bottom-right corner"
    paper = "Gu et al., BadNets, IEEE Access 2019"
    Config = BadNetsConfig

    def patch(self) -> torch.Tensor:
        """The patch's pixel values, uint8 ``[patch_size, patch_size]`` (the same in every channel)."""
        p, c = self.config.patch_size, self.config
        if c.pattern == "square":
            return torch.full((p, p), c.value, dtype=torch.uint8)
        i = torch.arange(p)
        even = (i[:, None] + i[None, :]) % 2 == 0
        return torch.where(even, torch.tensor(c.value, dtype=torch.uint8), torch.tensor(c.low_value, dtype=torch.uint8))

    def apply_trigger(self, images: torch.Tensor, *, train: bool = False) -> torch.Tensor:
        p = self.config.patch_size
        h, w = images.shape[-2:]
        if p > min(h, w):
            raise HarnessError(f"badnets: patch_size {p} is larger than the {h}x{w} images; "
                               f"set a patch_size of at most {min(h, w)}")
        out = images.clone()
        out[..., -p:, -p:] = self.patch().to(images.device)
        return out


@hookimpl
def harness_attacks():
    return [BadNets]
