"""Fine-Pruning's mechanism, tested directly on the tiny model: the activation
ranking on a hand-built feature map, the stopping rule, the head-input pruning
and its structural check, pruned channels kept at zero through fine-tuning."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backdoor_harness.errors import HarnessError
from backdoor_harness.layers import features, head, norm_layers
from backdoor_harness.models import classifier, create_model
from backdoor_harness.plugins.defenses.fp import (ChannelPrune, FinePruning, channel_activations, head_input_layer,
                                                  prune_counts, search_prune_count)
from backdoor_harness.train import Recipe, fit

from helpers import CPU, check_contract, context, noise_set, tiny

#: the hand-built last-layer biases: channel k of the feature map is the constant relu(B[k])
B = torch.tensor([(k * 37) % 64 / 10.0 - 0.55 for k in range(64)])  # a permutation, six values below 0


def constant_features(seed=0):
    """tiny_cnn whose last BN has weight 0 and bias B: every image's feature map
    channel k is relu(B[k]) everywhere, so its mean activation is relu(B[k])."""
    model = tiny(seed)
    _, last_bn = norm_layers(model)[-1]
    with torch.no_grad():
        last_bn.weight.zero_()
        last_bn.bias.copy_(B)
    return model


def expected_order():
    """Channels by increasing relu(B), ties (the zeros) in index order: written out by hand."""
    acts = B.clamp(min=0).tolist()
    return sorted(range(64), key=lambda k: (acts[k], k))


# --------------------------------------------------------------------------
# Activations and the pruning order
# --------------------------------------------------------------------------


def test_activations_are_channel_means_of_the_last_feature_map():
    model = tiny()
    x = noise_set(20).images
    with torch.no_grad():
        direct = features(model, x.float() / 255).mean(dim=(0, 2, 3))
    acts = channel_activations(model, x, batch_size=7, device=CPU)  # 3 uneven chunks
    assert acts.shape == (64,)
    assert torch.allclose(acts, direct, atol=1e-6)
    # on the hand-built model, exactly relu(B)
    assert torch.allclose(channel_activations(constant_features(), x, 7, CPU), B.clamp(min=0), atol=1e-6)


def test_pruning_order_follows_the_activation_ranking():
    model = constant_features()
    before = classifier(model).weight.detach().clone()
    # accuracy never changes (every image gets the same logits), so only the cap stops it: 16 channels
    defense = FinePruning(val_ratio=0.0, acc_ratio=1.0, max_prune_ratio=0.25, epochs=0)
    out, report = defense.purify(model, context(model))
    order = expected_order()
    assert order[:6] == [k for k in range(64) if B[k] < 0]  # the six dead channels first, in index order
    assert report["layer"] == "fc" and report["channels"] == 64 and report["stop"] == "max"
    assert report["pruned"] == order[:16]
    w = classifier(out).weight.detach()
    pruned = torch.zeros(64, dtype=torch.bool)
    pruned[order[:16]] = True
    assert not w[:, pruned].any()  # the pruned channels' input columns are zero...
    assert torch.equal(w[:, ~pruned], before[:, ~pruned])  # ...and nothing else moved (no fine-tuning)
    assert [n for n, _ in report["history"]] == list(range(17))  # step ceil(0.01 * 64) = 1


def test_prune_counts():
    assert prune_counts(64, 0.01, 1.0) == list(range(1, 65))
    assert prune_counts(512, 0.01, 1.0) == list(range(6, 511, 6)) + [512]  # BackdoorBench's step of 6
    assert prune_counts(10, 0.3, 1.0) == [3, 6, 9, 10]
    assert prune_counts(10, 0.01, 0.25) == [1, 2]  # floor(2.5)
    assert prune_counts(10, 0.5, 0.0) == []


def test_search_keeps_the_last_count_that_passed():
    accs = {0: 0.90, 1: 0.89, 2: 0.95, 3: 0.82, 4: 0.80, 5: 0.85}
    calls = []

    def accuracy(n):
        calls.append(n)
        return accs[n]

    # relative drop 0.1: a count passes while 0.90 - A < 0.09, i.e. A > 0.81
    result = search_prune_count(accuracy, [1, 2, 3, 4, 5], 0.1)
    assert result.count == 3 and result.stop == "accuracy"  # 0.80 broke the rule; 3 is kept (not 4)
    assert calls == [0, 1, 2, 3, 4]  # stops at the first break; 5 is never tried
    assert result.history == [(0, 0.90), (1, 0.89), (2, 0.95), (3, 0.82), (4, 0.80)]
    # an accuracy increase is not a drop (2 -> 0.95 passed); a drop of exactly 10% breaks it
    assert search_prune_count({0: 0.5, 1: 0.375}.get, [1], 0.25).count == 0
    assert search_prune_count(accs.get, [1, 2], 0.1).stop == "max"
    assert search_prune_count(accs.get, [], 0.1).stop == "none"


# --------------------------------------------------------------------------
# Where the pruning is expressed
# --------------------------------------------------------------------------


class _ConvHeadNet(nn.Module):
    """MobileNetV3's head in small: pool, a 1x1 conv, an activation, then the Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_head = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 10)

    def forward_features(self, x):
        return F.relu(self.conv(x))

    def forward_head(self, x, pre_logits=False):
        x = F.hardswish(self.conv_head(F.adaptive_avg_pool2d(x, 1))).flatten(1)
        return x if pre_logits else self.fc(x)


@pytest.mark.parametrize("name,layer", [("tiny_cnn", "fc"), ("conv_head_net", "conv_head"),
                                        pytest.param("mobilenetv3_small_100", "conv_head", marks=pytest.mark.slow),
                                        pytest.param("vgg11_bn", "pre_logits.fc1", marks=pytest.mark.slow)])
def test_zeroed_head_inputs_equal_masked_channels(name, layer):
    torch.manual_seed(0)
    if name == "conv_head_net":
        model = _ConvHeadNet().eval()
    else:
        model = create_model({"name": name, "kwargs": {"width": 8}} if name == "tiny_cnn" else name, 10, 32).eval()
    with torch.no_grad():
        f = features(model, torch.rand(3, 3, 32, 32))
    assert head_input_layer(model, f) == layer
    c = f.shape[1]
    channels = list(range(1, c, 3))
    pruned = copy.deepcopy(model)
    ChannelPrune(layer, channels).apply(pruned)
    mask = torch.ones(c)
    mask[channels] = 0
    with torch.no_grad():
        assert torch.allclose(head(pruned, f), head(model, f * mask[None, :, None, None]), atol=1e-5)
        assert not torch.allclose(head(model, f), head(model, f * mask[None, :, None, None]), atol=1e-5)


class _Net(nn.Module):
    """A conv, then a head that pools and (optionally) LayerNorms the channels before its Linear."""

    def __init__(self, layer_norm: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8) if layer_norm else nn.Identity()
        self.fc = nn.Linear(8, 10)

    def forward_features(self, x):
        return F.relu(self.conv(x))

    def forward_head(self, x, pre_logits=False):
        x = self.norm(x.mean(dim=(2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_a_head_that_mixes_channels_is_refused():
    torch.manual_seed(0)
    f = F.relu(torch.randn(2, 8, 4, 4))
    assert head_input_layer(_Net(layer_norm=False), f) == "fc"
    with pytest.raises(HarnessError, match="mixes the feature channels"):
        head_input_layer(_Net(layer_norm=True), f)
    with pytest.raises(HarnessError, match=r"\[B, C, H, W\]"):
        head_input_layer(_Net(layer_norm=False), torch.rand(2, 5, 8))  # tokens, as a ViT's


# --------------------------------------------------------------------------
# Fine-tuning keeps the pruned channels at zero
# --------------------------------------------------------------------------


def test_pruned_channels_stay_zero_after_fine_tuning():
    model = constant_features()
    before = classifier(model).weight.detach().clone()
    defense = FinePruning(val_ratio=0.0, acc_ratio=1.0, max_prune_ratio=0.5, epochs=1, batch_size=20, lr=0.05)
    out, report = defense.purify(model, context(model, noise_set(40)))
    pruned = report["pruned"]
    assert pruned == expected_order()[:32]
    w = classifier(out).weight.detach()
    assert not w[:, pruned].any()
    kept = [k for k in range(64) if k not in pruned]
    assert not torch.allclose(w[:, kept], before[:, kept])  # fine-tuning did move the rest
    # without the re-zeroing, the same fine-tuning regrows them (so the check above can fail)
    regrown = copy.deepcopy(model)
    ChannelPrune("fc", pruned).apply(regrown)
    fit(regrown, noise_set(40), Recipe(epochs=1, batch_size=20, lr=0.05), device=CPU,
        generator=torch.Generator().manual_seed(0), progress=False)
    assert classifier(regrown).weight[:, pruned].abs().sum() > 0


def test_no_fine_tuning_with_zero_epochs_and_a_stop_on_the_first_drop():
    model = tiny()

    def refuse(*a, **k):
        raise AssertionError("fit must not run with epochs=0")

    # a tiny relative tolerance: the first pruning that costs any accuracy stops it
    defense = FinePruning(acc_ratio=1e-6, epochs=0)
    report = defense.purify(model, context(model, fit_fn=refuse)).report
    hist, stop = report["history"], report["stop"]
    acc0 = hist[0][1]
    passed = hist[1:-1] if stop == "accuracy" else hist[1:]
    assert all(a >= acc0 for _, a in passed)
    if stop == "accuracy":
        assert hist[-1][1] < acc0  # the first drop stopped it
    kept = report["pruned"]
    assert len(kept) == (passed[-1][0] if passed else 0)
    assert kept == torch.argsort(torch.tensor(report["activations"]), stable=True)[:len(kept)].tolist()


# --------------------------------------------------------------------------
# Contract and configuration
# --------------------------------------------------------------------------


def test_contract_on_the_tiny_model():
    model = tiny()
    defense = FinePruning(epochs=1, batch_size=32)
    check_contract(model, defense,
                   lambda seed: defense.purify(model, context(model, noise_set(40, seed), seed=seed)).model)


def test_defaults_and_validation():
    cfg = FinePruning.Config()
    assert (cfg.acc_ratio, cfg.prune_step_ratio, cfg.max_prune_ratio, cfg.val_ratio) == (0.1, 0.01, 1.0, 0.1)
    assert (cfg.epochs, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size) == (100, 0.01, 0.9, 5e-4, 128)
    for bad in ({"acc_ratio": 0}, {"val_ratio": 1.0}, {"prune_step_ratio": 0}, {"max_prune_ratio": 1.5},
                {"epochs": -1}, {"momentum": 1.0}, {"unknown": 1}):
        with pytest.raises(ValueError):
            FinePruning.Config(**bad)
    assert "vision_transformer" not in FinePruning.families and "tiny_cnn" in FinePruning.families


def test_densenet_prunes_through_its_classifier():
    """DenseNet (version 2): phi is norm5's BN-ReLU output over the concatenated
    channels, pooled into ``classifier``; the pruned columns stay zero after fine-tuning."""
    torch.manual_seed(0)
    model = create_model({"name": "densenet121", "kwargs": {"growth_rate": 8, "block_config": [2, 2]}}, 10, 32)
    model = model.eval()
    defense = FinePruning(epochs=1, batch_size=16, prune_step_ratio=0.25, acc_ratio=1.0, val_ratio=0.5)
    assert defense.supports(model.family) and FinePruning.version == "2"
    out, report = defense.purify(model, context(model, noise_set(40)))
    assert report["layer"] == "classifier" and report["channels"] == unwrap_features(model)
    assert report["pruned"]  # acc_ratio 1: every step passes
    assert not out.net.classifier.weight[:, report["pruned"]].any()


def unwrap_features(model) -> int:
    with torch.no_grad():
        return features(model, torch.rand(1, 3, 32, 32)).shape[1]
