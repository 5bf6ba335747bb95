"""Robust accuracy (RA in BackdoorBench, D3 and Grad-Prune) of the purified model.

Definition: :func:`backdoor_harness.metrics.robust_accuracy`: over the same
triggered non-target test images as ASR, the share classified as their TRUE
class (BackdoorBench's ``test_ra``). Not paper 000's "RA" (Retuning Attack).
"""

from backdoor_harness.toolkit import Evaluator, Metric, hookimpl, robust_accuracy


class RobustAccuracy(Evaluator):
    name = "robust_acc"
    version = "1"
    summary = "RA: triggered non-target test images classified as their true class"
    paper = "BackdoorBench (Wu et al., NeurIPS 2022 D&B), test_ra"
    metrics = {"robust_acc": Metric(higher_is_better=True, doc="share of triggered images -> true class", title="RA",
                                   board=30, range=(0.0, 1.0))}

    def evaluate(self, ctx):
        return {"robust_acc": robust_accuracy(ctx.predict("purified", "poisoned"),
                                              ctx.poisoned_test.meta["true_labels"])}


@hookimpl
def harness_evaluators():
    return [RobustAccuracy]
