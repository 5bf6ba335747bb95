"""A defense published as its own pip package is found and runs like a built-in.

Installs ``examples/harness-head-reinit`` into this interpreter's environment
(uninstalled afterwards), then drives the ``harness`` command in subprocesses,
so discovery goes through the installed entry point and nothing else: the
plugin shows up in ``harness list defenses`` under its own distribution, and a
tiny matrix on real CIFAR-10 runs it end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "harness-head-reinit"
CLI = [sys.executable, "-m", "backdoor_harness.cli"]

MATRIX = """\
name: example-package
datasets:
  - name: cifar10
    train_per_class: 30
    test_per_class: 20
models:
  - name: tiny_cnn
    kwargs: {width: 8}
attacks:
  - name: badnets
    config: {stamp: after_augment}
defenses:
  - none
  - name: head_reinit
    config: {epochs: 1}
evaluators: [clean_acc, asr]
seeds: [0]
recipe: {base: cpu-quick, epochs: 1}
"""


def _env() -> dict[str, str]:
    # The subprocesses must load plugins from entry points, whatever the caller set.
    env = dict(os.environ)
    env.pop("HARNESS_DISABLE_PLUGIN_AUTOLOAD", None)
    return env


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, cwd=ROOT, env=_env(), **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    # pip builds a local directory in place (build/, *.egg-info): build a copy,
    # so the checkout stays clean and concurrent test runs do not share a build tree.
    source = tmp_path_factory.mktemp("example") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    done = subprocess.run(pip + ["install", "-q", "--no-deps", "--no-build-isolation", str(source)],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    try:
        yield
    finally:
        subprocess.run(pip + ["uninstall", "-y", "-q", "harness-head-reinit"], capture_output=True, text=True)


@pytest.mark.integration
def test_listed_under_its_own_package(installed):
    done = _run(["list", "defenses"])
    assert done.returncode == 0, done.stderr
    row = next((line for line in done.stdout.splitlines() if line.split()[:1] == ["head_reinit"]), None)
    assert row is not None, done.stdout
    assert "harness-head-reinit" in row


@pytest.mark.integration
def test_runs_in_a_matrix(installed, tmp_path):
    spec = tmp_path / "matrix.yaml"
    spec.write_text(MATRIX)
    workdir = tmp_path / "work"
    done = _run(["run", str(spec), "--workdir", str(workdir), "--no-progress"])
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    done = _run(["leaderboard", "--workdir", str(workdir), "--format", "json"])
    assert done.returncode == 0, done.stderr
    cells = {c["defense"]: c for c in json.loads(done.stdout)}
    assert set(cells) == {"none", "head_reinit"}
    cell = cells["head_reinit"]
    assert (cell["dataset"], cell["model"], cell["attack"], cell["seeds"]) == ("cifar10", "tiny_cnn", "badnets", [0])
    assert set(cell["metrics"]) == {"clean_acc", "asr"}
    for name, value in cell["metrics"].items():
        assert 0.0 <= value <= 1.0, (name, value)
