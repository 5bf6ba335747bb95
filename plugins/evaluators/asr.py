"""Attack success rate (ASR, paper 000's O-ASR) of the purified model.

Definition: :func:`backdoor_harness.metrics.attack_success_rate`, over the
triggered test images whose true class is not the target (BackdoorBench's
``test_asr``; 9,000 images on CIFAR-10 all-to-one).
"""

from backdoor_harness.toolkit import Evaluator, Metric, attack_success_rate, hookimpl


class AttackSuccessRate(Evaluator):
    name = "asr"
    version = "1"
    summary = "ASR: triggered non-target test images classified as the target"
    paper = "BackdoorBench (Wu et al., NeurIPS 2022 D&B), test_asr"
    metrics = {"asr": Metric(higher_is_better=False, doc="share of triggered non-target images -> target",
                          title="ASR", board=20, one_sided=True, range=(0.0, 1.0))}

    def evaluate(self, ctx):
        return {"asr": attack_success_rate(ctx.predict("purified", "poisoned"), ctx.poisoned_test.labels)}


@hookimpl
def harness_evaluators():
    return [AttackSuccessRate]
