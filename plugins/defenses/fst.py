"""FST (Feature Shift Tuning): fine-tune with a re-initialised head pushed away from the old one.

Paper: Min, Chen et al., "Towards Stable Backdoor Purification through Feature
Shift Tuning", NeurIPS 2023; authors' code ``fine_tune/ft.py --ft_mode fst``
(shared/reference/algorithms.md §2); the settings of paper 000 (Appendix B.2:
alpha 0.1, lr 0.01 on CIFAR-10).

Algorithm:
1. copy the attacked model; keep w_ori, the weight of its final linear layer
   (found with timm's ``get_classifier``), and its Frobenius norm C;
2. re-initialise that layer (weight and bias ~ U(-1/sqrt(fan_in), +1/sqrt(fan_in)));
3. train every parameter on the clean reserve with
   CE + alpha * <w, w_ori> (the sum of the element-wise product: a penalty on
   the new head's alignment with the old one; the bias does not enter);
4. after every optimizer step, rescale w back to norm C (projection onto the
   sphere ||w||_F = C).

Optimizer (code): SGD, momentum 0.9, no weight decay, cosine over 10 epochs,
batch 128.

Departures: the defender's data is the harness's reserve (5% of the training
set by default; the code draws 2%); alpha defaults to paper 000's 0.1 (the
code's argparse default is 0.2, its README example 0.1).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from pydantic import Field

from backdoor_harness.toolkit import Defense, Purified, classifier, hookimpl
from backdoor_harness.plugins.defenses.ft import FineTuneConfig


class FeatureShiftTuningConfig(FineTuneConfig):
    """Attributes:
        alpha: weight of the alignment penalty <w, w_ori>.
        (and the fine-tuning settings of ``ft``: 10 epochs, lr 0.01, no weight decay)
    """

    alpha: float = Field(default=0.1, ge=0)
    epochs: int = Field(default=10, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)


class FeatureShiftTuning(Defense):
    name = "fst"
    version = "1"
    summary = "re-initialise the head, fine-tune with a penalty on alignment with the old head, norm kept"
    paper = "Min, Chen et al., Towards Stable Backdoor Purification through Feature Shift Tuning, NeurIPS 2023"
    Config = FeatureShiftTuningConfig

    def purify(self, model, ctx):
        model = copy.deepcopy(model)
        head = classifier(model)
        w_ori = head.weight.detach().clone()
        norm = w_ori.norm()
        bound = 1 / math.sqrt(head.in_features)
        with torch.no_grad():  # drawn on the CPU (the cell's generator), wherever the model lives
            for p in (head.weight, head.bias):
                if p is not None:
                    p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=ctx.generator))
        alpha = self.config.alpha

        def loss(m, x, y, _step):
            w = classifier(m).weight
            return F.cross_entropy(m(x), y) + alpha * (w * w_ori.to(w.device)).sum()

        def project(m):
            w = classifier(m).weight
            w.mul_(norm.to(w.device) / w.norm())

        ctx.fit(model, ctx.reserve, self.config.recipe(), device=ctx.device, generator=ctx.generator,
                loss_fn=loss, after_step=project)
        return Purified(model)


@hookimpl
def harness_defenses():
    return [FeatureShiftTuning]
