"""A defense published as its own pip package is found and runs like a built-in.

Installs ``examples/harness-head-reinit`` into this interpreter's environment
(uninstalled afterwards), then drives the ``harness`` command in subprocesses,
so discovery goes through the installed entry point and nothing else: the
plugin shows up in ``harness list defenses`` under its own distribution, a
tiny matrix on real CIFAR-10 runs it end to end, and the package's own golden
tests pass with the fixtures of the harness's pytest plugin.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

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
        yield source
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


@pytest.mark.integration
def test_its_own_golden_tests_pass_with_the_harness_fixtures(installed):
    # `pytest` in the package's folder, as its author runs it: the golden marker and the
    # harness_golden / harness_matrix fixtures must come from the installed harness (pytest11).
    from backdoor_harness.data import data_roots

    env = {**_env(), "OMP_NUM_THREADS": "1"}
    for var in ("PYTEST_ADDOPTS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_PLUGINS"):
        env.pop(var, None)
    if not env.get("HARNESS_DATA") and data_roots():  # the same data the harness finds from here
        env["HARNESS_DATA"] = str(data_roots()[0])
    done = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--strict-markers"],
                          capture_output=True, text=True, cwd=installed, env=env)
    out = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, out
    assert "test_head_reinit_golden.py::test_golden_numbers_hold PASSED" in done.stdout, out
    summary = done.stdout.rstrip().splitlines()[-1]  # "=== 2 passed in 6.7s ==="
    assert "2 passed" in summary and "skipped" not in summary and "deselected" not in summary, out
