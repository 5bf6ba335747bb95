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

from typing import Literal

import torch
from pydantic import Field

from backdoor_harness import Attack, AttackConfig, hookimpl


class BadNetsConfig(AttackConfig):
    """Attributes:
        patch_size: side of the square patch, in pixels.
        value: the patch's pixel value (0-255).
        mode: ``all2one`` (every triggered image -> ``target``) or ``all2all`` (c -> c+1 mod C).
    """

    patch_size: int = Field(default=3, gt=0)
    value: int = Field(default=255, ge=0, le=255)
    mode: Literal["all2one", "all2all"] = "all2one"


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

    def target_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        if self.config.mode == "all2all":
            return (labels + 1) % num_classes
        return super().target_labels(labels, num_classes)


@hookimpl
def harness_attacks():
    return [BadNets]
