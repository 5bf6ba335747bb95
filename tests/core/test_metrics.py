"""Metric formulas against hand-computed cases, and the evaluators that use them."""

from __future__ import annotations

import pytest
import torch

import backdoor_harness as bh
from backdoor_harness.contracts import EvalContext
from backdoor_harness.data import ImageSet
from backdoor_harness.metrics import (Scores, accuracy, attack_success_rate, defense_effectiveness_rate,
                                      robust_accuracy, score)

T = torch.tensor


def test_rates_by_hand():
    assert accuracy(T([1, 2, 3, 4]), T([1, 2, 0, 0])) == 0.5
    assert attack_success_rate(T([0, 0, 0, 5, 6]), T([0, 0, 0, 0, 0])) == pytest.approx(3 / 5)
    assert robust_accuracy(T([0, 7, 3, 5]), T([2, 7, 3, 1])) == 0.5
    with pytest.raises(ValueError):
        accuracy(T([], dtype=torch.int64), T([], dtype=torch.int64))


@pytest.mark.parametrize("asr_b, asr_a, acc_b, acc_a, expected", [
    (0.95, 0.05, 0.90, 0.88, (0.90 - 0.02 + 1) / 2),   # the usual case: 0.94
    (0.95, 0.95, 0.90, 0.90, 0.5),                     # nothing changed
    (1.00, 0.00, 0.90, 0.90, 1.0),                     # perfect defense
    (0.10, 0.40, 0.90, 0.80, (0 - 0.10 + 1) / 2),      # ASR rose: clipped at 0 -> 0.45
    (0.90, 0.20, 0.80, 0.85, (0.70 - 0 + 1) / 2),      # accuracy rose: clipped at 0 -> 0.85
    (0.00, 0.00, 1.00, 0.00, 0.0),                     # worst case
])
def test_der_by_hand(asr_b, asr_a, acc_b, acc_a, expected):
    assert defense_effectiveness_rate(asr_b, asr_a, acc_b, acc_a) == pytest.approx(expected)


def context(preds: dict) -> EvalContext:
    # 6 test images, classes 0..2; the target 0 has two images, which ASR/RA must ignore
    test = ImageSet(torch.zeros(6, 3, 8, 8, dtype=torch.uint8), T([0, 0, 1, 1, 2, 2]), ["a", "b", "c"])
    attack = bh.create_attack("badnets")
    poisoned = attack.poison_test(test)
    assert len(poisoned) == 4 and poisoned.meta["true_labels"].tolist() == [1, 1, 2, 2]
    return EvalContext(backdoored=None, purified=None, clean_test=test, poisoned_test=poisoned, attack=attack,
                       device=torch.device("cpu"), predict=lambda role, split: preds[(role, split)])


def test_evaluators_compute_the_pinned_formulas():
    ctx = context({("purified", "clean"): T([0, 0, 1, 2, 2, 2]),        # 5/6 correct
                   ("purified", "poisoned"): T([0, 1, 2, 0]),          # ASR 2/4, RA 2/4 ([1,1,2,2] vs [0,1,2,0])
                   ("backdoored", "clean"): T([0, 0, 1, 1, 2, 2]),     # 6/6
                   ("backdoored", "poisoned"): T([0, 0, 0, 0])})       # ASR 1
    got = {}
    for name in ("clean_acc", "asr", "robust_acc", "der"):
        got.update(bh.create_evaluator(name).evaluate(ctx))
    assert got["clean_acc"] == pytest.approx(5 / 6)
    assert got["asr"] == pytest.approx(0.5)
    assert got["robust_acc"] == pytest.approx(0.5)
    assert got["der"] == pytest.approx((0.5 - 1 / 6 + 1) / 2)


class PixelClass(torch.nn.Module):
    """Predicts, for each image, the class written in its top-left pixel (red channel)."""

    def forward(self, x):
        return torch.nn.functional.one_hot((x[:, 0, 0, 0] * 255).round().long(), 3).float()


def test_score_is_a_typed_triple_of_the_three_rates():
    test = ImageSet(torch.zeros(6, 3, 8, 8, dtype=torch.uint8), T([0, 0, 1, 1, 2, 2]), ["a", "b", "c"])
    test.images[:, 0, 0, 0] = T([0, 1, 1, 2, 2, 2], dtype=torch.uint8)  # clean: 4/6 right
    poisoned = ImageSet(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), T([0, 0, 0, 0]), ["a", "b", "c"],
                        meta={"true_labels": T([1, 1, 2, 2])})
    poisoned.images[:, 0, 0, 0] = T([0, 1, 0, 2], dtype=torch.uint8)  # to the target: 2/4; true class: 2/4
    got = score(PixelClass(), test, poisoned, torch.device("cpu"))
    assert isinstance(got, Scores) and got._fields == ("clean_acc", "asr", "robust_acc")
    assert got == Scores(clean_acc=pytest.approx(4 / 6), asr=0.5, robust_acc=0.5)
    assert (got.clean_acc, got.asr, got.robust_acc) == tuple(got)
