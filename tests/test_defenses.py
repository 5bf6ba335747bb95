"""Each defense's own mechanism, tested directly on the tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import backdoor_harness as bh
from backdoor_harness.models import classifier, create_model

import helpers
from helpers import noise_set, tiny


def context(model):
    """``helpers.context`` whose generator is the one that drew the 200 reserve images (so it starts advanced)."""
    g = torch.Generator().manual_seed(0)
    return helpers.context(model, noise_set(200, generator=g), generator=g)


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
