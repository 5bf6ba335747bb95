"""Clean accuracy (C-Acc) of the purified model on the clean test set.

Definition: :func:`backdoor_harness.metrics.accuracy` (BackdoorBench's ``test_acc``).
"""

from backdoor_harness.toolkit import Evaluator, Metric, accuracy, hookimpl


class CleanAccuracy(Evaluator):
    name = "clean_acc"
    version = "1"
    summary = "C-Acc: accuracy on the clean test set"
    paper = "BackdoorBench (Wu et al., NeurIPS 2022 D&B), test_acc"
    metrics = {"clean_acc": Metric(higher_is_better=True, doc="accuracy on clean test images", title="C-Acc", board=10,
                                  one_sided=True, range=(0.0, 1.0))}

    def evaluate(self, ctx):
        return {"clean_acc": accuracy(ctx.predict("purified", "clean"), ctx.clean_test.labels)}


@hookimpl
def harness_evaluators():
    return [CleanAccuracy]
