"""Every attack's backdoor is learned at the quickstart scale (slow: ``--runslow``).

Each attack of ``configs/attacks-cpu.yaml`` (the matrix behind the README's
attack table: CIFAR-10 1,000 images/class, tiny_cnn, recipe cpu-quick) runs
alone in a fresh work directory. The claim checked is the issue's: the
undefended attacked model's ASR is well above the clean reference model's
rate of sending the same triggered images to the target (``clean_asr``),
and clean accuracy stays far above chance. The margins are below every
measured value in the README table (seed 0, one thread): the tightest are
WaNet (20.9% against 3.4%) and BPP (16.2% against 3.3%), whose
training-controlled backdoors a tiny CNN only partly learns in 6 CPU epochs;
the data-poisoning attacks reach 58-100%.
"""

from __future__ import annotations

import pytest

import backdoor_harness as bh
from backdoor_harness.leaderboard.render import collect
from backdoor_harness.matrix import load_matrix
from backdoor_harness.scheduler import run_matrix
from backdoor_harness.store import Store

from helpers import ROOT

CONFIG = ROOT / "configs" / "attacks-cpu.yaml"
SPEC = load_matrix(CONFIG)
#: one entry per registered attack, at its defaults; the config's other entries (BadNets all-to-all,
#: which 6 CPU epochs do not teach a tiny CNN) are in the README table only
ENTRIES = {ref.display: ref for ref in SPEC.attacks if ref.display == ref.name}

#: ASR must exceed the clean model's by this much (absolute) and be this many times it ...
MARGIN = 0.10
RATIO = 3.0
#: ... and clean accuracy must stay above this (chance is 0.10)
MIN_CLEAN_ACC = 0.35


def test_the_attack_table_covers_every_registered_attack():
    assert set(bh.list_attacks()) <= set(ENTRIES)


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(ENTRIES))
def test_backdoor_is_learned(label, tmp_path):
    spec = SPEC.model_copy(update={"attacks": [ENTRIES[label]]})
    counts = run_matrix(spec, tmp_path, progress=False, log=lambda *a, **k: None)
    assert counts["failed"] == 0 and counts["blocked"] == 0, counts
    store = Store(tmp_path)
    try:
        (cell,) = collect(store.records())
    finally:
        store.close()
    m = cell["metrics"]
    assert m["asr"] >= m["clean_asr"] + MARGIN and m["asr"] >= RATIO * m["clean_asr"], m
    assert m["clean_acc"] >= MIN_CLEAN_ACC, m
