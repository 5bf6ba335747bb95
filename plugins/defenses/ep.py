"""EP (Exact Purification): fine-tune with the *real* trigger and the true labels.

Paper: Min, Qin et al., "Uncovering, Explaining, and Mitigating the Superficial
Safety of Backdoor Defense", NeurIPS 2024 (paper 000, §3.1 and Appendix B.2,
where it is also called EU). An oracle: it assumes the defender knows the
exact trigger, and serves as the reference for post-purification robustness.

Algorithm:
1. copy the attacked model;
2. pick a fixed ``poison_fraction`` (10%) of the clean reserve and stamp the
   attack's real (training-time) trigger on it, keeping the TRUE labels;
3. fine-tune all weights on that set for 20 epochs (SGD, momentum 0.9,
   lr 0.01, cosine), with standard augmentation.

Departures: the paper does not state EP's optimizer; we use the same SGD
setting as its other tuning defenses (lr 0.01). The trigger is stamped when
the attack stamps it (before or after augmentation, the attack's ``stamp``).
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field

from backdoor_harness.toolkit import Defense, Purified, hookimpl
from backdoor_harness.plugins.defenses.ft import FineTuneConfig


class ExactPurificationConfig(FineTuneConfig):
    """Attributes:
        poison_fraction: share of the reserve stamped with the real trigger.
        (and the fine-tuning settings of ``ft``; 20 epochs by default)
    """

    epochs: int = Field(default=20, gt=0)
    poison_fraction: float = Field(default=0.1, gt=0, le=1)


class ExactPurification(Defense):
    name = "ep"
    version = "1"
    summary = "oracle: fine-tune with the real trigger on 10% of the reserve, true labels kept"
    paper = "Min, Qin et al., Superficial Safety of Backdoor Defense, NeurIPS 2024"
    Config = ExactPurificationConfig
    needs = frozenset({"oracle_trigger"})

    def purify(self, model, ctx):
        model = copy.deepcopy(model)
        attack, reserve = ctx.attack, ctx.reserve
        n = len(reserve)
        idx = torch.randperm(n, generator=ctx.generator)[: max(1, round(self.config.poison_fraction * n))]
        tuning = attack.stamped(reserve.images, reserve.labels.clone(), idx)  # true labels kept
        ctx.fit(model, tuning, self.config.recipe(), device=ctx.device, generator=ctx.generator)
        return Purified(model)


@hookimpl
def harness_defenses():
    return [ExactPurification]
