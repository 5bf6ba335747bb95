"""BadNets: a small fixed patch stamped onto poisoned images.

Paper: Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the
Machine Learning Model Supply Chain", 2017 (IEEE Access 2019).

Trigger as BackdoorBench's CIFAR-10 default: a ``patch_size`` x ``patch_size``
square of value 255 in the bottom-right corner (rows/cols 29-31 at 32x32),
replacing the pixels under it in all three channels. All-to-one (target 0) by
default; ``mode: all2all`` maps class c to (c + 1) mod C, as the paper's
all-to-all attack. Poisoned indices are drawn uniformly from the whole
training set (target-class images included), as BackdoorBench does.
"""

from __future__ import annotations

import torch
from pydantic import Field

from backdoor_harness import AllToAllConfig, Attack, hookimpl


class BadNetsConfig(AllToAllConfig):
    """Attributes:
        patch_size: side of the square patch, in pixels.
        value: the patch's pixel value (0-255).
        mode: ``all2one`` or ``all2all`` (see :class:`AllToAllConfig`).
    """

    patch_size: int = Field(default=3, gt=0)
    value: int = Field(default=255, ge=0, le=255)


class BadNets(Attack):
    name = "badnets"
    version = "1"
    summary = "3x3 white square in the bottom-right corner (BackdoorBench default)"
    paper = "Gu et al., BadNets, IEEE Access 2019"
    Config = BadNetsConfig

    def apply_trigger(self, images: torch.Tensor, *, train: bool = False) -> torch.Tensor:
        p = self.config.patch_size
        out = images.clone()
        out[..., -p:, -p:] = self.config.value
        return out


@hookimpl
def harness_attacks():
    return [BadNets]
