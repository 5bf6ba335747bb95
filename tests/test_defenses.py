"""Each defense's own mechanism, tested directly on the tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import backdoor_harness as bh
from backdoor_harness.contracts import DefenseContext
from backdoor_harness.data import ImageSet
from backdoor_harness.models import classifier, create_model, model_family
from backdoor_harness.train import fit

CPU = torch.device("cpu")


def tiny(seed=0):
    torch.manual_seed(seed)
    return create_model({"name": "tiny_cnn", "kwargs": {"width": 8}}, 10, 32).eval()


def context(model, n=200, seed=0, attack=None):
    g = torch.Generator().manual_seed(seed)
    reserve = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                       torch.arange(n) % 10, [str(i) for i in range(10)])
    return DefenseContext(reserve=reserve, num_classes=10, device=CPU, generator=g, seed=seed,
                          family=model_family(model), fit=lambda *a, **k: fit(*a, **{"progress": False, **k}),
                          attack=attack)


def test_classifier_is_found_through_timm():
    assert isinstance(classifier(tiny()), nn.Linear) and classifier(tiny()).out_features == 10
    vgg = create_model("vgg11_bn", 10, 32)
    assert classifier(vgg).out_features == 10
    with pytest.raises(bh.HarnessError, match="no linear classifier"):
        classifier(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_fst_keeps_the_head_norm_and_shifts_it_away_from_the_old_head():
    model = tiny()
    w_ori = classifier(model).weight.detach().clone()
    out = bh.create_defense("fst", epochs=2, alpha=0.5).purify(model, context(model))
    w = classifier(out).weight.detach()
    assert torch.allclose(w.norm(), w_ori.norm(), rtol=1e-5)  # projected back after every step
    cos = (w * w_ori).sum() / (w.norm() * w_ori.norm())
    assert cos < 0.2  # re-initialised, then pushed off the old head (a copy would be 1)
    # the penalty is what pushes: alpha 0 leaves the new head freer to align
    free = classifier(bh.create_defense("fst", epochs=2, alpha=0.0).purify(model, context(model))).weight.detach()
    assert (w * w_ori).sum() < (free * w_ori).sum()
