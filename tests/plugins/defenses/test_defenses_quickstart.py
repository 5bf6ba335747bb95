"""Every defense on BadNets at the quickstart scale (slow: ``--runslow``; about an hour on one CPU thread).

Runs ``configs/defenses-cpu.yaml``, the matrix behind the README's defense
table, and asserts only what holds robustly at that scale: the undefended
model is backdoored, exact purification removes the backdoor, every defense
finishes and leaves a usable model. Which of the others remove the backdoor
depends on the seed at this scale: the table records it, this test does not
claim it.
"""

from __future__ import annotations

import pytest

from backdoor_harness.matrix import load_matrix

from helpers import ROOT

CONFIG = ROOT / "configs" / "defenses-cpu.yaml"
DEFENSES = [ref.display for ref in load_matrix(CONFIG).defenses]


@pytest.fixture(scope="module")
def cells(harness_matrix):
    return {c["defense"]: c for c in harness_matrix(CONFIG)}


@pytest.mark.slow
def test_the_undefended_model_is_backdoored_and_ep_removes_it(cells):
    assert cells["none"]["metrics"]["asr"] >= 0.80
    assert cells["ep"]["metrics"]["asr"] <= 0.20


@pytest.mark.slow
@pytest.mark.parametrize("defense", DEFENSES)
def test_every_defense_finishes_with_a_usable_model(cells, defense):
    cell = cells[defense]
    assert cell["status"] == {}, cell["status"]
    assert cell["metrics"]["clean_acc"] >= 0.30, cell["metrics"]  # chance is 0.10; the undefended model ~0.53
