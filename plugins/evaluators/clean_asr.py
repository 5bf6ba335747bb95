"""The clean reference model's ASR: the floor an attack's ASR is read against.

A model that never saw a poisoned image still sends some triggered images to
the target class: a trigger that damages an image (a bright patch, a strong
blend, a warp) pushes it toward whatever class the model confuses it with.
``clean_asr`` is :func:`backdoor_harness.metrics.attack_success_rate` of the
clean reference model (same data set, model, seed and recipe, trained without
the attack) on the same triggered test images as ``asr``. An attack has been
learned only when its ASR is well above this rate.

The number depends on the purified model not at all: it is the same in every
row of an attacked model, and it is computed once per matrix cell because the
prediction is shared across jobs.
"""

from backdoor_harness.toolkit import Evaluator, Metric, attack_success_rate, hookimpl


class CleanModelASR(Evaluator):
    name = "clean_asr"
    version = "1"
    summary = "ASR of the clean reference model (what the trigger alone does, with no backdoor)"
    paper = "none: a baseline (the rate a model with no backdoor predicts the target on triggered images)"
    metrics = {"clean_asr": Metric(higher_is_better=False,
                                   doc="share of triggered non-target images the clean model sends to the target",
                                   title="ASR(clean model)", board=90, range=(0.0, 1.0))}
    needs_clean_model = True

    def evaluate(self, ctx):
        return {"clean_asr": attack_success_rate(ctx.predict("clean", "poisoned"), ctx.poisoned_test.labels)}


@hookimpl
def harness_evaluators():
    return [CleanModelASR]
