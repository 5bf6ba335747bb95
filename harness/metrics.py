"""Metric definitions, once. Every evaluator computes its numbers through these.

All rates are fractions in [0, 1] (leaderboards print them as percentages).

- ``accuracy``: share of predictions equal to the labels (clean accuracy, C-Acc).
- ``attack_success_rate``: over triggered test images whose true class is not
  the target, the share predicted as the target (ASR).
- ``robust_accuracy``: over the same images, the share predicted as their true
  class (RA in BackdoorBench, D3 and Grad-Prune; not the Retuning Attack).
- ``defense_effectiveness_rate``: DER = (max(0, ASR_bd - ASR_def) -
  max(0, ACC_bd - ACC_def) + 1) / 2, in [0, 1]; 0.5 means "no change".
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def _rate(hits: torch.Tensor) -> float:
    if hits.numel() == 0:
        raise ValueError("a rate over zero samples is undefined")
    return float(hits.float().mean())


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``pred == labels``."""
    return _rate(pred == labels)


def attack_success_rate(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Share of triggered, non-target images predicted as their attack target.

    ``pred`` and ``target`` cover only images whose true class differs from
    their target (the attack's ``poison_test`` selects exactly those).
    """
    return _rate(pred == target)


def robust_accuracy(pred: torch.Tensor, true_labels: torch.Tensor) -> float:
    """Share of the same triggered images predicted as their true class."""
    return _rate(pred == true_labels)


def defense_effectiveness_rate(asr_before: float, asr_after: float, acc_before: float, acc_after: float) -> float:
    """DER (Zhu et al. / BackdoorBench): reward ASR reduction, penalise accuracy loss.

    Gains in accuracy and rises in ASR are clipped at 0, so DER is in [0, 1].
    """
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


class Scores(NamedTuple):
    """What :func:`score` measures of one model: clean accuracy, attack success rate and robust
    accuracy, each a fraction in [0, 1] as defined above."""

    clean_acc: float
    asr: float
    robust_acc: float


def score(model, clean_test, poisoned_test, device) -> Scores:
    """Clean accuracy, ASR and robust accuracy of any model on a cell's test sets
    (for evaluators that build models of their own: retuned, interpolated ...)."""
    from .train import predict

    pred_clean = predict(model, clean_test.images, device)
    pred_poison = predict(model, poisoned_test.images, device)
    return Scores(clean_acc=accuracy(pred_clean, clean_test.labels),
                  asr=attack_success_rate(pred_poison, poisoned_test.labels),
                  robust_acc=robust_accuracy(pred_poison, poisoned_test.meta["true_labels"]))
