"""Integration: the quickstart matrix on real CIFAR-10 shows the phenomenon.

Asserts the shape of the result, not exact values: the undefended models are
backdoored (ASR >= 80%), plain fine-tuning leaves the backdoor (ASR >= 60%),
exact purification removes it (ASR <= 20%), and clean accuracy is well above
chance (10%).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT



@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("quickstart")
    cli = [sys.executable, "-m", "backdoor_harness.cli"]
    # the quickstart runs as users run it: every core (make test pins the unit tests to one thread)
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    subprocess.run(cli + ["run", str(ROOT / "configs" / "quickstart.yaml"), "--workdir", str(workdir),
                          "--no-progress"], check=True, cwd=ROOT, env=env)
    out = subprocess.run(cli + ["leaderboard", "--workdir", str(workdir), "--format", "json"], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout
    return {(c["attack"], c["defense"]): c["metrics"] for c in json.loads(out)}


@pytest.mark.slow  # minutes on 2 cores: `make test` checks the same phenomenon on the golden matrix
@pytest.mark.integration
@pytest.mark.parametrize("attack", ["badnets", "blended"])
def test_quickstart_phenomenon(quickstart, attack):
    none, ep, ft = quickstart[(attack, "none")], quickstart[(attack, "ep")], quickstart[(attack, "ft")]
    assert none["asr"] >= 0.80
    assert ep["asr"] <= 0.20
    assert ft["asr"] >= 0.60  # plain fine-tuning on the reserve leaves the backdoor in place
    for cell in (none, ep, ft):
        assert cell["clean_acc"] >= 0.35
        assert set(cell) == {"clean_acc", "asr", "robust_acc", "der"}
    assert none["der"] == pytest.approx(0.5)
    assert ep["der"] > 0.8
    assert ep["robust_acc"] > none["robust_acc"]
