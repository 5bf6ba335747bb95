"""Grad-Prune's mechanism, tested directly (hand-built models and the tiny CNN)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import backdoor_harness as bh
from backdoor_harness.data import ImageSet
from backdoor_harness.models import create_model
from backdoor_harness.plugins.defenses.gradprune import (FilterMask, GradPrune, feature_convs, filter_scores,
                                                         prune_loop, select_filter)

from helpers import CLASSES, CPU, context, tiny


def colour_set(n=40, seed=0, size=8):
    """A learnable set: class c is a flat colour (25 c grey levels) plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    base = (labels * 25).view(-1, 1, 1, 1).float()
    noise = torch.randint(-20, 21, (n, 3, size, size), generator=g).float()
    return ImageSet((base + noise).clamp(0, 255).to(torch.uint8), labels, CLASSES)


# --------------------------------------------------------------------------
# needs: oracle vs inverted
# --------------------------------------------------------------------------


def test_needs_follow_the_trigger_source():
    assert GradPrune.Config().trigger == "oracle"
    assert GradPrune().needs == frozenset({"oracle_trigger"})
    assert GradPrune(trigger="inverted").needs == frozenset()
    assert isinstance(GradPrune.needs, property)  # decided per instance, by its config
    with pytest.raises(ValueError):
        GradPrune.Config(trigger="guess")
    model = tiny()
    with pytest.raises(bh.HarnessError, match="oracle"):  # oracle without the attack: a clear error
        GradPrune(max_prune_steps=1, tune_epochs=1).purify(model, context(model, colour_set()))


def test_inverted_trigger_runs_without_the_attack():
    model = tiny()
    given = {k: v.clone() for k, v in model.state_dict().items()}
    # colour_set's images are 8x8: the small generator (the U-Net needs sides that are multiples of 16)
    defense = GradPrune(trigger="inverted", max_prune_steps=2, tune_epochs=1, mask_epochs=1, generator_epochs=1,
                        generator="small", generator_width=4, batch_size=64)
    out, report = defense.purify(model, context(model, colour_set(20)))  # ctx.attack is None
    assert out(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert all(torch.equal(given[k], v) for k, v in model.state_dict().items())
    assert report["tried"] == 2
    tiny(1).load_state_dict(out.state_dict())


# --------------------------------------------------------------------------
# selection: the global arg-max of mean |grad|
# --------------------------------------------------------------------------


class TwoConv(nn.Module):
    """x -> A (1x1 conv, 3->2) -> B (1x1 conv, 2->3) -> spatial mean -> H (linear 3->2), all linear, no bias."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1, bias=False)
        self.b = nn.Conv2d(2, 3, 1, bias=False)
        self.fc = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[2.0, -4.0, 1.0], [0.6, 0.4, -0.2]]).view(2, 3, 1, 1))
            self.b.weight.copy_(torch.tensor([[1.0, 0.0], [0.5, -1.0], [-2.0, 3.0]]).view(3, 2, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0, -1.0], [-1.0, 0.5, 1.5]]))

    def forward_features(self, x):
        return self.b(self.a(x))

    def forward_head(self, f, pre_logits=False):
        p = f.mean((2, 3))
        return p if pre_logits else self.fc(p)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def hand_scores(model, images, labels):
    """Mean |dL/dW| per output filter of A and B, L = mean CE, by the chain rule on flat images:
    u = A x, v = B u, z = H v; d = softmax(z) - e_y; dB = mean H^T d u^T; dA = mean B^T H^T d x^T."""
    a = model.a.weight.detach().view(2, 3)
    b = model.b.weight.detach().view(3, 2)
    h = model.fc.weight.detach()
    x = images.float().div(255).mean((2, 3))  # flat images: every pixel of a channel equal
    u, v = x @ a.T, x @ a.T @ b.T
    d = torch.softmax(v @ h.T, 1) - torch.eye(2)[labels]
    back = d @ h  # H^T d, per sample [N, 3]
    grad_b = torch.einsum("ni,nj->ij", back, u) / len(labels)
    grad_a = torch.einsum("ni,nj->ij", back @ b, x) / len(labels)
    return [grad_a.abs().mean(1), grad_b.abs().mean(1)]


def flat_images():
    colours = torch.tensor([[200, 10, 90], [30, 220, 60], [120, 120, 250], [5, 80, 160]], dtype=torch.uint8)
    return colours.view(4, 3, 1, 1).expand(4, 3, 4, 4).contiguous(), torch.tensor([1, 0, 1, 0])


def test_selected_filter_is_the_global_argmax_of_mean_abs_grad():
    model = TwoConv().eval()
    images, labels = flat_images()
    layers = feature_convs(model, images[:2].float() / 255)
    assert [(l.conv, l.norm, l.filters) for l in layers] == [("a", None, 2), ("b", None, 3)]

    scores = filter_scores(model, layers, images, labels, batch_size=3, device=CPU)  # two batches: summed
    expected = hand_scores(model, images, labels)
    for s, e in zip(scores, expected):
        assert torch.allclose(s, e, rtol=1e-5, atol=1e-7)
    flat = torch.cat(expected)
    j = int(flat.argmax())
    chosen = select_filter(scores, [])
    assert chosen == ((0, j) if j < 2 else (1, j - 2))
    assert chosen == (1, 2)  # B's third filter; A holds the second-largest score
    assert expected[1][2] > expected[0].max() > expected[1][:2].max()

    # prune it: its gradient stays non-zero (no BatchNorm after B), yet it is never selected again
    FilterMask(layers, [chosen]).apply(model)
    assert not model.b.weight[2].any()
    again = filter_scores(model, layers, images, labels, batch_size=4, device=CPU)
    assert again[1][2] > 0 and select_filter(again, []) == chosen  # the code's loop would re-select it
    rest = torch.cat(again)
    rest[2 + 2] = -1
    j = int(rest.argmax())
    assert select_filter(again, [chosen]) == ((0, j) if j < 2 else (1, j - 2))
    assert select_filter(again, [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]) is None


def test_pruning_zeroes_the_exact_batchnorm_only():
    """tiny_cnn: every conv feeds its BatchNorm directly; PreAct's conv2 feeds conv2 + shortcut (not paired)."""
    layers = feature_convs(tiny(), torch.rand(2, 3, 8, 8))
    assert [l.norm for l in layers] == ["features.1", "features.4", "features.7", "features.10"]

    from backdoor_harness.models import PreActBlock

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.block = PreActBlock(4, 4)
            self.norm = nn.BatchNorm2d(4)

        def forward_features(self, x):
            return self.norm(self.block(self.stem(x)))

    pairs = {l.conv: l.norm for l in feature_convs(Net().eval(), torch.rand(2, 3, 8, 8))}
    assert pairs == {"stem": "block.bn1", "block.conv1": "block.bn2", "block.conv2": None}


# --------------------------------------------------------------------------
# the stopping rule
# --------------------------------------------------------------------------


def scripted(values):
    """evaluate() returning the given (acc, loss) pairs in turn, and a counting prune_next()."""
    it = iter(values)
    calls = []
    return (lambda: next(it)), (lambda: calls.append(1) or True), calls


def test_pruning_stops_at_the_accuracy_threshold():
    # loss keeps falling, but step 3 costs 15 points (> 10): not the best, and the last step
    evaluate, prune_next, calls = scripted([(0.90, 2.0), (0.88, 1.5), (0.85, 1.2), (0.75, 0.5), (0.74, 0.1)])
    r = prune_loop(evaluate, prune_next, threshold=0.1, patience=10, max_steps=100)
    assert (r.steps, r.best, r.stop, len(calls)) == (3, 2, "accuracy", 3)
    # a looser threshold lets that step through and it becomes the best
    evaluate, prune_next, calls = scripted([(0.90, 2.0), (0.88, 1.5), (0.85, 1.2), (0.75, 0.5), (0.50, 0.1)])
    r = prune_loop(evaluate, prune_next, threshold=0.2, patience=10, max_steps=100)
    assert (r.steps, r.best, r.stop) == (4, 3, "accuracy")


def test_pruning_stops_after_patience_rounds_without_improvement():
    losses = [2.0, 1.5, 1.6, 1.4, 1.45, 1.5, 1.41, 0.1]  # improves at steps 1 and 3, then three misses
    evaluate, prune_next, calls = scripted([(0.9, v) for v in losses])
    r = prune_loop(evaluate, prune_next, threshold=0.1, patience=3, max_steps=100)
    assert (r.steps, r.best, r.stop, len(calls)) == (6, 3, "patience", 6)
    assert [h[1] for h in r.history] == losses[:7]
    # the caps of ours
    r = prune_loop(*scripted([(0.9, 2.0 - i / 10) for i in range(10)])[:2], 0.1, 3, max_steps=4)
    assert (r.steps, r.best, r.stop) == (4, 4, "max_steps")
    r = prune_loop(lambda: (0.9, 1.0), lambda: False, 0.1, 3, max_steps=4)
    assert (r.steps, r.best, r.stop) == (0, 0, "exhausted")


def test_prune_returns_the_best_prefix_of_the_pruned_filters():
    model = tiny()
    original = copy.deepcopy(model)
    reserve = colour_set(20)
    attack = bh.create_attack("badnets")
    defense = GradPrune(max_prune_steps=3, pruning_patience=10, accuracy_threshold=1.0)
    ctx = context(model, reserve, attack=attack)
    train, val = ctx.split(0.1)
    stamp = lambda u: attack.apply_trigger(u, train=True)  # noqa: E731
    mask, result = defense.prune(model, train, val, stamp, ctx)
    assert result.steps == 3 and result.stop == "max_steps"
    losses = [h[1] for h in result.history]
    best = min(range(4), key=lambda i: (losses[i], i))  # threshold 1.0: only the loss decides
    assert result.best == best and len(mask.pruned) == best
    # the model is the original with exactly those filters (and their BatchNorm channels) zeroed
    expected = copy.deepcopy(original)
    mask.apply(expected)
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in model.state_dict().items())
    assert len(set(mask.pruned)) == len(mask.pruned)


# --------------------------------------------------------------------------
# masking during fine-tuning
# --------------------------------------------------------------------------


class ResTiny(nn.Module):
    """conv-BN-ReLU, then a residual conv-BN whose BatchNorm feeds the sum (as ResNet's bn2), not a ReLU."""

    family = "resnet"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward_features(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + h)

    def forward_head(self, f, pre_logits=False):
        p = f.mean((2, 3))
        return p if pre_logits else self.fc(p)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_masked_filters_stay_exactly_zero_after_fine_tuning():
    model = ResTiny().eval()
    reserve = colour_set()
    attack = bh.create_attack("badnets")
    stamp = lambda u: attack.apply_trigger(u, train=True)  # noqa: E731
    layers = feature_convs(model, torch.rand(2, 3, 8, 8))
    assert [(l.conv, l.norm) for l in layers] == [("conv1", "bn1"), ("conv2", "bn2")]
    mask = FilterMask(layers, [(0, 1), (1, 3), (1, 6)])
    mask.apply(model)
    defense = GradPrune(tune_epochs=2, tuning_patience=5, lr=0.05, batch_size=16)

    def tune(m, with_mask):
        ctx = context(m, reserve, attack=attack)
        train, val = ctx.split(0.1)
        return defense.tune(m, mask if with_mask else FilterMask(layers), train, val, stamp, ctx)

    masked = copy.deepcopy(model)
    epochs, best_epoch, _ = tune(masked, True)
    assert epochs == 2 and best_epoch >= 1  # a fine-tuned epoch was kept, not the pruned model itself
    for i, k in mask.pruned:
        conv, norm = getattr(masked, layers[i].conv), getattr(masked, layers[i].norm)
        assert not conv.weight[k].any() and norm.weight[k] == 0 and norm.bias[k] == 0
    assert not torch.equal(masked.fc.weight, model.fc.weight)

    # without the mask, the same fine-tuning regrows the BatchNorm biases in front of the residual sum
    # (behind a ReLU an exactly zero channel gets no gradient, so conv1's filter would stay zero anyway)
    free = copy.deepcopy(model)
    tune(free, False)
    assert free.bn2.bias[3] != 0 and free.bn2.bias[6] != 0


def test_purify_keeps_its_pruned_filters_zero():
    model = tiny()
    defense = GradPrune(max_prune_steps=3, tune_epochs=2, accuracy_threshold=1.0, lr=0.05, batch_size=16)
    out, report = defense.purify(model, context(model, colour_set(20), attack=bh.create_attack("badnets")))
    assert len(report["pruned"]) == 2 and report["tune_best_epoch"] >= 1
    mods = dict(out.net.named_modules())
    pairs = {l.conv: l.norm for l in feature_convs(out, torch.rand(2, 3, 8, 8))}
    for conv, k in report["pruned"]:
        assert not mods[conv].weight[k].any()
        assert mods[pairs[conv]].weight[k] == 0 and mods[pairs[conv]].bias[k] == 0


def test_defaults_follow_the_code():
    cfg = GradPrune.Config()
    assert (cfg.val_ratio, cfg.accuracy_threshold, cfg.pruning_patience, cfg.tuning_patience) == (0.1, 0.1, 10, 10)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size) == (0.001, 0.9, 5e-4, 128)
    assert GradPrune.Config.model_validate_json(cfg.model_dump_json()) == cfg
    for bad in (dict(accuracy_threshold=0.0), dict(val_ratio=1.0), dict(pruning_patience=0), dict(lr=0)):
        with pytest.raises(ValueError):
            GradPrune.Config(**bad)
    assert "vision_transformer" not in GradPrune.families and GradPrune().supports("tiny_cnn")


def test_densenet_end_to_end():
    """DenseNet (version 2): every conv of the dense layers is a candidate; a
    growth conv (concatenated, no exact BN) is zeroed alone, a bottleneck conv
    with its norm2 channel."""
    torch.manual_seed(0)
    model = create_model({"name": "densenet121", "kwargs": {"growth_rate": 8, "block_config": [2, 2]}}, 10, 32)
    model = model.eval()
    layers = {l.conv: l.norm for l in feature_convs(model, torch.rand(2, 3, 32, 32))}
    b1 = "features.denseblock1.denselayer1."
    assert layers[b1 + "conv1"] == b1 + "norm2" and layers[b1 + "conv2"] is None
    assert layers["features.conv0"] == "features.norm0"
    defense = GradPrune(max_prune_steps=3, tune_epochs=1, accuracy_threshold=1.0, batch_size=16)
    assert defense.supports(model.family) and GradPrune.version == "2"
    out, report = defense.purify(model, context(model, colour_set(20, size=32), attack=bh.create_attack("badnets")))
    assert report["tried"] == 3
    mods = dict(out.net.named_modules())
    for conv, k in report["pruned"]:
        assert not mods[conv].weight[k].any()
        if layers[conv] is not None:
            assert mods[layers[conv]].weight[k] == 0
    with torch.no_grad():
        assert torch.isfinite(out(torch.rand(2, 3, 32, 32))).all()
