"""The reference models: BackdoorBench's PreAct-ResNet-18, the CIFAR ResNet-18
that timm's ``resnet18`` becomes at 32x32, architecture versions in job keys,
and the small-input rule for vision transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from backdoor_harness.jobs import job_key
from backdoor_harness.matrix import MatrixSpec, expand
from backdoor_harness.models import ModelSpec, create_model, model_version, vit_size_kwargs

# --------------------------------------------------------------------------
# Parameter counts, computed from the reference architectures
# --------------------------------------------------------------------------


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k  # bias-free, as in both reference files


def _bn(c: int) -> int:
    return 2 * c  # affine weight and bias


def backdoorbench_preact18_params(num_classes: int = 10) -> int:
    """PreActResNet18 of SCLBD/BackdoorBench ``models/preact_resnet.py`` (commit
    3f4b1a92, the file at HEAD): conv1 3x3 3->64, then per stage (64, 128, 256,
    512; stride 1, 2, 2, 2) two PreActBlocks [bn1(in), conv1 3x3 in->out,
    bn2(out), conv2 3x3 out->out, and a 1x1 conv shortcut in->out when the
    stride or width changes], adaptive average pool, ``linear`` 512->classes.
    No BatchNorm after the last block."""
    total, cin = _conv(3, 64, 3), 64
    for i, cout in enumerate((64, 128, 256, 512)):
        for j in range(2):
            stride = 2 if (i > 0 and j == 0) else 1
            total += _bn(cin) + _conv(cin, cout, 3) + _bn(cout) + _conv(cout, cout, 3)
            if stride != 1 or cin != cout:
                total += _conv(cin, cout, 1)
            cin = cout
    return total + 512 * num_classes + num_classes


def cifar_resnet18_params(num_classes: int = 10) -> int:
    """ResNet18 of BackdoorBench ``models/resnet.py`` (commit d51d764c, the
    kuangliu/pytorch-cifar file; deleted from BackdoorBench in 68f1369, whose
    ``resnet18`` is now torchvision's ImageNet network): conv1 3x3 3->64 +
    bn1, then per stage two BasicBlocks [conv1 3x3 in->out, bn1, conv2 3x3
    out->out, bn2, and a 1x1 conv + BN shortcut when the stride or width
    changes], 4x4 average pool, ``linear`` 512->classes."""
    total, cin = _conv(3, 64, 3) + _bn(64), 64
    for i, cout in enumerate((64, 128, 256, 512)):
        for j in range(2):
            stride = 2 if (i > 0 and j == 0) else 1
            total += _conv(cin, cout, 3) + _bn(cout) + _conv(cout, cout, 3) + _bn(cout)
            if stride != 1 or cin != cout:
                total += _conv(cin, cout, 1) + _bn(cout)
            cin = cout
    return total + 512 * num_classes + num_classes


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_reference_counts():
    # the two formulas against the numbers they give (and the known 11.17M of the CIFAR ResNet-18)
    assert backdoorbench_preact18_params() == 11_171_146
    assert cifar_resnet18_params() == 11_173_962


# --------------------------------------------------------------------------
# PreAct-ResNet-18 = BackdoorBench's network
# --------------------------------------------------------------------------


def backdoorbench_preact18_keys() -> set[str]:
    """State-dict keys of BackdoorBench's PreActResNet18 (same file), from its naming."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "linear.weight", "linear.bias"}
    for i in range(1, 5):
        for j in range(2):
            p = f"layer{i}.{j}."
            keys |= {p + f"{b}.{t}" for b in ("bn1", "bn2") for t in bn}
            keys |= {p + "conv1.weight", p + "conv2.weight"}
            if i > 1 and j == 0:
                keys.add(p + "shortcut.0.weight")
    return keys


def test_preact_resnet18_is_backdoorbench_parameter_for_parameter():
    model = create_model("preact_resnet18", 10, 32)
    assert n_params(model.net) == backdoorbench_preact18_params(10)  # was 1024 more: a final BN(512)
    assert set(model.net.state_dict()) == backdoorbench_preact18_keys()
    assert n_params(create_model("preact_resnet18", 43, 32).net) == backdoorbench_preact18_params(43)


def test_preact_resnet18_features_are_the_last_block_output():
    torch.manual_seed(0)
    model = create_model("preact_resnet18", 10, 32).eval()
    net = model.net
    assert not [m for m in net.modules() if isinstance(m, nn.BatchNorm2d) and m.num_features == 512
                and m is not net.layer4[1].bn1 and m is not net.layer4[1].bn2 and m is not net.layer4[0].bn2]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        z = (x - model.mean) / model.std
        out = net.layer4(net.layer3(net.layer2(net.layer1(net.conv1(z)))))
        feats = net.forward_features(z)
        assert torch.equal(feats, out)
        assert feats.shape == (2, 512, 4, 4) and (feats < 0).any()  # a residual sum: no final ReLU
        assert torch.allclose(model(x), net.linear(out.mean((2, 3))), atol=1e-6)
    assert net.get_classifier() is net.linear and net.num_features == 512
    net.reset_classifier(5)
    assert net.linear.out_features == 5 and net.get_classifier() is net.linear


def test_model_versions():
    assert model_version("preact_resnet18") == "2"
    assert model_version("tiny_cnn") is None and model_version("resnet18") is None
    assert ModelSpec(name="preact_resnet18").versions == {"model": "2"}
    assert ModelSpec(name="tiny_cnn").versions == {}


def _jobs(model: str, attack: str = "badnets", evaluators=("clean_acc", "asr")) -> list:
    spec = MatrixSpec.model_validate({"datasets": [{"name": "cifar10", "train_per_class": 10}],
                                      "models": [model], "attacks": [attack], "defenses": ["none"],
                                      "evaluators": list(evaluators), "recipe": "cpu-quick"})
    return expand(spec)


def _key_without_model_version(job) -> str:
    """The key as the harness computed it before models declared versions."""
    return job_key(job.kind, job.payload, job.deps, {k: v for k, v in job.versions.items() if k != "model"})


def test_a_declared_architecture_version_is_part_of_the_train_key():
    train = next(j for j in _jobs("preact_resnet18") if j.kind == "train")
    assert train.versions["model"] == "2"
    assert train.key != _key_without_model_version(train)
    for name in ("tiny_cnn", "resnet18"):  # undeclared: the keys of earlier runs still hold
        for job in _jobs(name):
            assert "model" not in job.versions and job.key == _key_without_model_version(job)


def test_clean_and_prepare_jobs_that_build_the_model_carry_its_version():
    # lc prepares with a clean model of the matrix's model; its prepare job and the clean train job build it
    jobs = _jobs("preact_resnet18", attack="lc")
    built = [j for j in jobs if j.kind in ("train", "prepare")]
    assert {j.kind for j in built} == {"train", "prepare"} and len(built) == 3
    assert all(j.versions.get("model") == "2" and j.key != _key_without_model_version(j) for j in built)
    # a prepare job that builds no model keeps its key (and stays shared across models)
    preps = [[j for j in _jobs(model, attack="ssba") if j.kind == "prepare"] for model in ("preact_resnet18", "tiny_cnn")]
    assert [len(p) for p in preps] == [1, 1] and preps[0][0].key == preps[1][0].key
    assert "model" not in preps[0][0].versions and preps[0][0].key == _key_without_model_version(preps[0][0])


# --------------------------------------------------------------------------
# timm's resnet18 at 32x32 = the CIFAR ResNet-18
# --------------------------------------------------------------------------


def test_resnet18_at_32px_is_the_cifar_resnet18():
    model = create_model("resnet18", 10, 32)
    net = model.net
    stem = net.conv1
    assert isinstance(stem, nn.Conv2d)
    assert (stem.kernel_size, stem.stride, stem.padding, stem.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert isinstance(net.bn1, nn.BatchNorm2d)
    assert isinstance(net.maxpool, nn.Identity)
    assert not [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    assert [len(s) for s in (net.layer1, net.layer2, net.layer3, net.layer4)] == [2, 2, 2, 2]
    assert [s[0].conv1.out_channels for s in (net.layer1, net.layer2, net.layer3, net.layer4)] == [64, 128, 256, 512]
    with torch.no_grad():
        assert net.forward_features(torch.rand(1, 3, 32, 32)).shape == (1, 512, 4, 4)
    assert n_params(net) == cifar_resnet18_params(10)
    # at ImageNet sizes the stem is left alone
    big = create_model("resnet18", 10, 224).net
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)


# --------------------------------------------------------------------------
# Vision transformers at small inputs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size,patch", [(32, 4), (64, 8), (28, 2), (96, 12), (16, 2)])
def test_vit_patch_rule(size, patch):
    assert vit_size_kwargs("vit_small_patch16_224", size, {}, True) == {"img_size": size, "patch_size": patch}


def test_vit_rule_leaves_what_the_user_set():
    assert vit_size_kwargs("vit_small_patch16_224", 224, {}, True) == {"img_size": 224}
    assert vit_size_kwargs("vit_small_patch16_224", 32, {}, False) == {"img_size": 32}
    assert vit_size_kwargs("vit_small_patch16_224", 32, {"patch_size": 8}, True) == {"img_size": 32}
    assert vit_size_kwargs("vit_small_patch16_224", 32, {"img_size": 32}, True) == {}
    assert vit_size_kwargs("vit_small_patch16_224", 32, {"dynamic_img_size": True}, True) == {}
    assert vit_size_kwargs("resnet18", 32, {}, True) == {}
    assert vit_size_kwargs("deit_tiny_patch16_224", 32, {}, True) == {"img_size": 32, "patch_size": 4}


def test_a_vit_by_name_runs_at_32px_with_an_8x8_token_grid():
    spec = {"name": "vit_tiny_patch16_224", "kwargs": {"depth": 1}}
    model = create_model(spec, 10, 32).eval()
    assert model.net.patch_embed.patch_size == (4, 4) and model.net.patch_embed.grid_size == (8, 8)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
