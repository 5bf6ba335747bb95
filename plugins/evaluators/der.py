"""DER (defense effectiveness rate) of the purification.

Paper: Zhu et al., "Enhancing Fine-Tuning Based Backdoor Defense with
Sharpness-Aware Minimization", ICCV 2023; used by BackdoorBench and by D3
(paper 002). Definition: :func:`backdoor_harness.metrics.defense_effectiveness_rate`,
DER = (max(0, ASR_bd - ASR_def) - max(0, ACC_bd - ACC_def) + 1) / 2, from the
backdoored and purified models' ASR and clean accuracy on the same test sets.
"""

from backdoor_harness.toolkit import (Evaluator, Metric, accuracy, attack_success_rate, defense_effectiveness_rate,
                                     hookimpl)


class DefenseEffectivenessRate(Evaluator):
    name = "der"
    version = "1"
    summary = "DER: ASR reduction traded against clean-accuracy loss, in [0, 1]"
    paper = "Zhu et al., FT-SAM, ICCV 2023; BackdoorBench"
    metrics = {"der": Metric(higher_is_better=True, doc="(max(0,dASR) - max(0,dACC) + 1) / 2", title="DER", board=40,
                             range=(0.0, 1.0))}

    def evaluate(self, ctx):
        y, target = ctx.clean_test.labels, ctx.poisoned_test.labels
        return {"der": defense_effectiveness_rate(
            asr_before=attack_success_rate(ctx.predict("backdoored", "poisoned"), target),
            asr_after=attack_success_rate(ctx.predict("purified", "poisoned"), target),
            acc_before=accuracy(ctx.predict("backdoored", "clean"), y),
            acc_after=accuracy(ctx.predict("purified", "clean"), y))}


@hookimpl
def harness_evaluators():
    return [DefenseEffectivenessRate]
