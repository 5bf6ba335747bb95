"""NAD's mechanism, tested directly on the tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from backdoor_harness.models import create_model
from backdoor_harness.plugins.defenses.nad import (FEATURES, NAD, AttentionDistillationLoss, StageTaps,
                                                     attention_loss, attention_map, resolution_stages,
                                                     stage_modules)
from backdoor_harness.train import Recipe, fit

from helpers import CPU, check_contract, context, noise_set, tiny

QUICK = dict(teacher_epochs=1, epochs=1, batch_size=32)


class FitRecorder:
    """The harness's trainer, recording each call's model, recipe and loss."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, data, recipe, **kw):
        self.calls.append((model, recipe, kw.get("loss_fn"), {k: v.clone() for k, v in model.state_dict().items()}))
        return fit(model, data, recipe, **{"progress": False, **kw})


def test_attention_map_by_hand():
    # one image, two channels, a 1x2 map: |F|^2 = [[1, 4], [9, 0]], channel mean [5, 2], L2 norm sqrt(29)
    fm = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])
    assert torch.allclose(attention_map(fm), torch.tensor([[5.0, 2.0]]) / math.sqrt(29), atol=1e-6)
    # p = 1: channel mean of |F| = [2, 1]
    assert torch.allclose(attention_map(fm, p=1.0), torch.tensor([[2.0, 1.0]]) / math.sqrt(5), atol=1e-6)
    # the channel sum of the authors' code gives the same normalised map
    assert torch.allclose(attention_map(fm), attention_map(torch.cat([fm, fm, fm], 1)), atol=1e-6)


def test_attention_loss_is_zero_for_equal_maps_and_positive_otherwise():
    fs = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])  # map [5, 2] / sqrt(29)
    ft = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # map [1, 0]
    d = [5 / math.sqrt(29) - 1, 2 / math.sqrt(29)]
    assert math.isclose(attention_loss(fs, ft).item(), (d[0] ** 2 + d[1] ** 2) / 2, rel_tol=1e-5)  # the code's MSE
    assert math.isclose(attention_loss(fs, ft, distance="l2").item(), math.hypot(*d), rel_tol=1e-5)  # the paper's
    x = torch.randn(3, 4, 5, 5)
    assert attention_loss(x, x.clone()) == 0 and attention_loss(x, x.clone(), distance="l2") == 0
    assert attention_loss(x, 3 * x) < 1e-12  # a rescaled map is the same attention
    assert attention_loss(x, torch.randn(3, 4, 5, 5)) > 0
    # a gradient reaches the student's features
    s = x.clone().requires_grad_()
    attention_loss(s, torch.randn(3, 4, 5, 5)).backward()
    assert s.grad.abs().sum() > 0


def test_stages_of_the_tiny_model():
    model = tiny()
    assert stage_modules(model, torch.rand(2, 3, 32, 32)) == [
        ("features.2", (32, 32)), ("features.5", (16, 16)), ("features.8", (8, 8)), (FEATURES, (4, 4))]


def test_the_resolution_rule_picks_the_tensors_timm_lists():
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 32).eval()
    x = torch.rand(2, 3, 32, 32)
    listed = [n for n, _ in stage_modules(model, x)][-3:]  # from timm's feature_info
    rule = [n for n, _ in resolution_stages(model, x)][-3:]
    assert listed != rule  # different names (e.g. layer2 vs layer2.1)...
    with torch.no_grad(), StageTaps(model, listed) as a, StageTaps(model, rule) as b:
        _, out_a = a.run(x)
        _, out_b = b.run(x)
    assert all(torch.equal(u, v) for u, v in zip(out_a, out_b))  # ...the same feature maps


def test_1x1_maps_are_skipped():
    # at 8 px the tiny model's last map is 1x1 (as VGG's last pool at 32 px): no spatial attention to distil
    assert stage_modules(tiny(), torch.rand(2, 3, 8, 8)) == [
        ("features.2", (8, 8)), ("features.5", (4, 4)), ("features.8", (2, 2))]


def test_teacher_is_fine_tuned_and_the_student_distils_from_it():
    model = tiny()
    given = {k: v.clone() for k, v in model.state_dict().items()}
    recorder = FitRecorder()
    defense = NAD(NAD.Config(**QUICK, teacher_lr=0.05, lr=0.02))
    out = defense.purify(model, context(model, n=64, fit_fn=recorder)).model
    assert len(recorder.calls) == 2
    teacher, t_recipe, t_loss, t_start = recorder.calls[0]
    student, s_recipe, s_loss, s_start = recorder.calls[1]
    # 1. the teacher: a copy of the input, fine-tuned with plain CE at the teacher's settings
    assert teacher is not model and t_loss is None and (t_recipe.epochs, t_recipe.lr) == (1, 0.05)
    assert all(torch.equal(given[k], v) for k, v in t_start.items())
    assert not all(torch.equal(given[k], v) for k, v in teacher.state_dict().items())  # it was trained
    # 2. the student: another copy of the input, distilled from that teacher
    assert student is out and student is not teacher and (s_recipe.epochs, s_recipe.lr) == (1, 0.02)
    assert all(torch.equal(given[k], v) for k, v in s_start.items())
    assert isinstance(s_loss, AttentionDistillationLoss) and s_loss.teacher is teacher
    assert s_loss.names == ["features.5", "features.8", FEATURES] and s_loss.betas == [500.0, 1000.0, 1000.0]
    # the input is untouched; no hooks are left on the student or the teacher
    assert all(torch.equal(given[k], v) for k, v in model.state_dict().items())
    for m in list(out.modules()) + list(teacher.modules()):
        assert not m._forward_hooks
    tiny(1).load_state_dict(out.state_dict())


#: three full-batch plain gradient steps: small enough steps that the attention term is a descent direction
STEPS = Recipe(epochs=3, batch_size=64, lr=0.01, momentum=0.0, weight_decay=0.0, schedule="constant", augment=False)


def distil(model, teacher, betas, data):
    """The student's training of ``purify`` (CE + betas * attention losses), from a fixed generator."""
    student = copy.deepcopy(model)
    names, _ = NAD(NAD.Config(betas=betas)).stages(student, context(model, data))
    loss = AttentionDistillationLoss(teacher, names, list(betas), 2.0, "mse")
    with loss.attached(student):
        fit(student, data, STEPS, device=CPU, generator=torch.Generator().manual_seed(5), loss_fn=loss, progress=False)
    return student, loss


def test_zero_betas_is_plain_fine_tuning_and_betas_pull_attention_to_the_teacher():
    model, data = tiny(), noise_set(64)
    teacher = tiny(7)  # any network with the same stages
    plain = copy.deepcopy(model)
    fit(plain, data, STEPS, device=CPU, generator=torch.Generator().manual_seed(5), progress=False)
    zero, loss = distil(model, teacher, (0.0, 0.0, 0.0), data)
    assert all(torch.equal(v, zero.state_dict()[k]) for k, v in plain.state_dict().items())
    pulled, _ = distil(model, teacher, (1000.0, 1000.0, 1000.0), data)

    def gap(student):
        """The summed attention losses on the data, the student in train mode as it was trained."""
        student = copy.deepcopy(student).train()
        with torch.no_grad(), loss.attached(student):
            return sum(loss.terms(data.images.float() / 255)[1])

    assert gap(pulled) < 0.5 * gap(zero)


def test_contract_on_the_tiny_model():
    model = tiny()
    defense = NAD(NAD.Config(**QUICK))
    check_contract(model, defense, lambda seed: defense.purify(model, context(model, n=64, seed=seed)).model)
    for bad in (dict(betas=()), dict(betas=(-1.0,)), dict(p=0), dict(distance="l1"), dict(teacher_epochs=0)):
        with pytest.raises(ValueError):
            NAD.Config(**bad)


def test_fewer_stages_than_betas_use_the_last_betas():
    model = tiny()
    names, betas = NAD(NAD.Config(betas=(1.0, 2.0, 3.0, 4.0, 5.0))).stages(model, context(model, n=64))
    assert names == ["features.2", "features.5", "features.8", FEATURES] and betas == [2.0, 3.0, 4.0, 5.0]


def test_defaults_follow_backdoorbench_and_the_paper():
    cfg = NAD.Config()
    assert (cfg.teacher_epochs, cfg.teacher_lr, cfg.epochs, cfg.lr) == (10, 0.01, 20, 0.01)
    assert (cfg.betas, cfg.p, cfg.distance, cfg.momentum, cfg.weight_decay) == ((500.0, 1000.0, 1000.0), 2.0, "mse",
                                                                              0.9, 1e-4)
