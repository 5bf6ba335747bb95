"""CLP's mechanism, tested directly: the UCLC of a tiny conv-BN pair by hand,
the outlier rule by hand, a planted high-Lipschitz channel pruned, no data used."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from backdoor_harness.data import ImageSet
from backdoor_harness.errors import HarnessError
from backdoor_harness.layers import conv_norm_pairs, unwrap
from backdoor_harness.models import create_model
from backdoor_harness.plugins.defenses.clp import CLP, channel_lipschitz, clp_links, clp_prune, outlying_channels

from helpers import CLASSES, check_contract, context, noise_set, tiny


# --------------------------------------------------------------------------
# UCLC by hand
# --------------------------------------------------------------------------


def pair(eps, var):
    """Conv2d(2 -> 3, kernel 1x2) whose filters, as 2x2 matrices (in_channels x kh*kw), are
    [[3, 0], [0, 4]] (spectral norm 4), [[1, 1], [1, 1]] (2) and [[0, 0], [0, -5]] (5),
    then a BN with gamma (2, -3, 0.5) and the given eps and running variances."""
    conv = nn.Conv2d(2, 3, kernel_size=(1, 2), bias=False)
    bn = nn.BatchNorm2d(3, eps=eps)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[3., 0.]], [[0., 4.]]],
                                        [[[1., 1.]], [[1., 1.]]],
                                        [[[0., 0.]], [[0., -5.]]]]))
        bn.weight.copy_(torch.tensor([2., -3., 0.5]))
        bn.running_var.copy_(torch.tensor(var))
    return conv, bn


def test_uclc_of_a_tiny_conv_bn_pair_by_hand():
    # sigma = sqrt(var + eps) = (2, 3, 1): UCLC = 4 * 2/2, 2 * 3/3, 5 * 0.5/1
    conv, bn = pair(eps=1.0, var=[3., 8., 0.])
    assert torch.allclose(channel_lipschitz(conv, bn), torch.tensor([4., 2., 2.5], dtype=torch.float64))
    # the authors' code leaves eps out: sigma = sqrt(var) = (2, 3, 0.5)
    conv, bn = pair(eps=1e-5, var=[4., 9., 0.25])
    assert torch.allclose(channel_lipschitz(conv, bn, bn_eps=False),
                          torch.tensor([4., 2., 5.], dtype=torch.float64))
    with_eps = channel_lipschitz(conv, bn, bn_eps=True)
    assert torch.allclose(with_eps, torch.tensor([4 * 2 / math.sqrt(4 + 1e-5), 2 * 3 / math.sqrt(9 + 1e-5),
                                                  2.5 / math.sqrt(0.25 + 1e-5)], dtype=torch.float64))


def test_depthwise_filter_norm_is_its_frobenius_norm():
    conv = nn.Conv2d(3, 3, 3, groups=3, bias=False)
    bn = nn.BatchNorm2d(3, eps=0.0)
    with torch.no_grad():
        conv.weight.fill_(1.0)  # each filter a 1 x 9 row of ones: norm 3
    assert torch.allclose(channel_lipschitz(conv, bn), torch.full((3,), 3.0, dtype=torch.float64))


def test_outlier_rule_by_hand():
    # mean + 0 * std: values above the mean
    assert outlying_channels(torch.tensor([1., 2., 3., 4.]), 0.0).tolist() == [2, 3]
    # one outlier among n equal values has z = (n - 1) / sqrt(n) with the unbiased std:
    # n = 16 -> 3.75 > 3 (pruned); n = 10 -> 2.85 (kept, whatever its size)
    assert outlying_channels(torch.tensor([1.] * 15 + [1000.]), 3.0).tolist() == [15]
    assert outlying_channels(torch.tensor([1.] * 9 + [1000.]), 3.0).tolist() == []
    assert outlying_channels(torch.tensor([7.]), 0.0).tolist() == []  # one channel: no std


# --------------------------------------------------------------------------
# A planted channel, on the tiny model
# --------------------------------------------------------------------------


def planted(channel=5, scale=50.0):
    """The tiny model with one filter of its 16-channel conv scaled up (UCLC x ``scale``)."""
    model = tiny()
    conv_name, conv, bn = conv_norm_pairs(model)[1]
    assert conv.out_channels == 16
    with torch.no_grad():
        conv.weight[channel] *= scale
    names = {id(m): n for n, m in unwrap(model).named_modules()}
    return model, names[id(bn)]


def test_a_planted_channel_is_pruned_and_the_others_kept():
    model, bn_name = planted()
    given = {k: v.clone() for k, v in model.state_dict().items()}
    defense = CLP()
    out, found = defense.purify(model, context(model, noise_set(20)))
    assert found["pruned"][bn_name] == [5]
    bn = dict(unwrap(out).named_modules())[bn_name]
    bn0 = dict(unwrap(model).named_modules())[bn_name]
    assert bn.weight[5] == 0 and bn.bias[5] == 0
    keep = [k for k in range(16) if k != 5]
    assert torch.equal(bn.weight[keep], bn0.weight[keep]) and torch.equal(bn.bias[keep], bn0.bias[keep])
    # only BN weights and biases of pruned channels change: convs, running stats, head untouched
    report = found["pruned"]
    for k, v in out.state_dict().items():
        bn_of = k.removeprefix("net.").rsplit(".", 1)[0]
        if k.endswith((".weight", ".bias")) and report.get(bn_of):
            idx = report[bn_of]
            assert not v[idx].any()
            rest = torch.ones(len(v), dtype=torch.bool)
            rest[idx] = False
            assert torch.equal(v[rest], given[k][rest]), k
        else:
            assert torch.equal(v, given[k]), k
    assert all(torch.equal(given[k], v) for k, v in model.state_dict().items())  # the input is untouched
    # without the plant, channel 5 of that layer stays
    clean = tiny()
    assert 5 not in clp_prune(clean, 3.0)[bn_name]


def test_a_larger_u_prunes_a_subset():
    model = tiny()
    with torch.no_grad():  # spread the UCLCs so that several channels stand out at small u
        for _, conv, _ in conv_norm_pairs(model):
            conv.weight.mul_(torch.linspace(0.5, 3.0, conv.out_channels)[:, None, None, None] ** 2)
    counts = []
    sets = []
    for u in (0.5, 1.0, 2.0, 3.0):
        m = tiny()
        m.load_state_dict(model.state_dict())
        pruned = clp_prune(m, u)
        sets.append({(n, k) for n, ks in pruned.items() for k in ks})
        counts.append(len(sets[-1]))
    assert all(a >= b for a, b in zip(sets, sets[1:]))  # nested
    assert counts[0] > counts[-1]


# --------------------------------------------------------------------------
# Data-free
# --------------------------------------------------------------------------


def test_uses_no_data_and_no_randomness():
    model, _ = planted()
    empty = ImageSet(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), CLASSES)

    def refuse(*a, **k):
        raise AssertionError("CLP must not train")

    ctx = context(model, empty, fit_fn=refuse)
    rng = ctx.generator.get_state().clone()
    out = CLP().purify(model, ctx).model
    assert torch.equal(ctx.generator.get_state(), rng)  # no draw from the cell's generator
    full = CLP().purify(model, context(model, noise_set(100), seed=3)).model
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in out.state_dict().items())  # data does not matter
    assert not out.training


def test_contract_and_config():
    model, _ = planted()
    defense = CLP()
    check_contract(model, defense, lambda seed: defense.purify(model, context(model, noise_set(20), seed)).model)
    cfg = CLP.Config()
    assert (cfg.u, cfg.bn_eps) == (3.0, True)
    with pytest.raises(ValueError):
        CLP.Config(u=-1)
    with pytest.raises(ValueError):
        CLP.Config(threshold=3)
    assert "vision_transformer" not in CLP.families and {"resnet", "tiny_cnn"} <= CLP.families


def test_a_model_without_conv_bn_pairs_is_refused():
    vit = create_model({"name": "vit_tiny_patch16_224",
                        "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
                        "adapt_stem": False}, 10, 32)
    with pytest.raises(HarnessError, match="no convolution followed by a BatchNorm"):
        CLP().purify(vit, context(vit, noise_set(10)))


# --------------------------------------------------------------------------
# The pairing through the data flow; DenseNet
# --------------------------------------------------------------------------


def small_densenet():
    torch.manual_seed(0)
    return create_model({"name": "densenet121", "kwargs": {"growth_rate": 16, "block_config": [2, 2]}}, 10, 32).eval()


@pytest.mark.parametrize("name", ["tiny_cnn", "preact_resnet18", "resnet18",
                                  pytest.param("efficientnet_b0", marks=pytest.mark.slow),
                                  pytest.param("mobilenetv3_large_100", marks=pytest.mark.slow),
                                  pytest.param("vgg11_bn", marks=pytest.mark.slow)])
def test_links_are_the_module_order_pairs_on_conv_bn_networks(name):
    """Version 1 paired in module order; on every family it declared the links are the same pairs."""
    torch.manual_seed(0)
    model = create_model(name, 10, 32).eval()
    names = {id(m): n for n, m in unwrap(model).named_modules()}
    old = [(c, names[id(b)]) for c, _, b in conv_norm_pairs(model)]
    links = clp_links(model)
    assert sorted((l.conv_name, l.norm_name) for l in links) == sorted(old)
    assert all(l.offset == 0 for l in links)
    # the pre-activation blocks' bn1 (conv + shortcut) keep their approximate pair; the rest is exact
    assert all(l.exact for l in links) == (name != "preact_resnet18")


def test_densenet_links_follow_the_concatenation():
    model = small_densenet()
    links = {(l.conv_name, l.norm_name): l.offset for l in clp_links(model)}
    b1 = "features.denseblock1."
    # stem: 32 channels (2 x growth); layer 1's new 16 channels come after them in every later reader
    assert links[(b1 + "denselayer1.conv2", b1 + "denselayer2.norm1")] == 32
    assert links[(b1 + "denselayer1.conv2", "features.transition1.norm")] == 32
    assert links[(b1 + "denselayer2.conv2", "features.transition1.norm")] == 48
    assert links[(b1 + "denselayer1.conv1", b1 + "denselayer1.norm2")] == 0
    assert links[("features.conv0", "features.norm0")] == 0
    # the transition's conv reaches the next block through its 2x2 average pool
    b2 = "features.denseblock2."
    assert links[("features.transition1.conv", b2 + "denselayer1.norm1")] == 0
    assert links[("features.transition1.conv", b2 + "denselayer2.norm1")] == 0
    assert links[("features.transition1.conv", "features.norm5")] == 0
    # the block's input (relu(norm0(conv0))) is no conv's output: conv0 reaches no norm1
    assert (("features.conv0", b1 + "denselayer1.norm1") not in links
            and ("features.conv0", b1 + "denselayer2.norm1") not in links)


def test_a_planted_densenet_channel_is_pruned_in_every_reader():
    model = small_densenet()
    conv = dict(unwrap(model).named_modules())["features.denseblock1.denselayer1.conv2"]
    with torch.no_grad():
        conv.weight[5] *= 50
    readers = {l.norm_name: l.offset for l in clp_links(model)
               if l.conv_name == "features.denseblock1.denselayer1.conv2"}
    assert set(readers) == {"features.denseblock1.denselayer2.norm1", "features.transition1.norm"}
    defense = CLP()
    out, found = defense.purify(model, context(model, noise_set(10)))
    modules = dict(unwrap(out).named_modules())
    for norm_name, offset in readers.items():
        assert offset + 5 in found["pruned"][norm_name]
        assert modules[norm_name].weight[offset + 5] == 0 and modules[norm_name].bias[offset + 5] == 0
    with torch.no_grad():
        assert torch.isfinite(out(torch.rand(2, 3, 32, 32))).all()
    assert "densenet" in CLP.families and CLP.version == "2"
