"""scripts/device-run and `make device-bundle`, end to end on the CPU, so the GPU path cannot rot between GPU runs.

The bundle is built into a temporary folder by the Makefile target itself; the script then
installs it, runs the real preflight on the CPU, and runs tests/device/queue.yaml (a tiny
matrix item cut by `select`, a command item, and items that must be skipped) within a budget.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import ROOT

SCRIPT = ROOT / "scripts" / "device-run"
SHARED = ROOT.parent / "shared"
needs_shared = pytest.mark.skipif(
    not (SHARED / "device-wheels").is_dir() or not (SHARED / "datasets" / "cifar10-jpeg.tar.gz").exists(),
    reason="../shared/device-wheels and ../shared/datasets/cifar10-jpeg.tar.gz hold the bundle's wheels and data")


def load_script():
    loader = importlib.machinery.SourceFileLoader("device_run", str(SCRIPT))
    spec = importlib.util.spec_from_loader("device_run", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def make_bundle(target: Path, *extra: str) -> subprocess.CompletedProcess:
    # -o: never rebuild the venv from here; BIN: the interpreter running the tests builds the wheel
    return subprocess.run(["make", "-s", "-o", ".venv/.installed", "device-bundle", f"DEVICE_DIR={target}",
                           f"BIN={Path(sys.executable).parent}", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def device_run(tmp: Path, bundle: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp / "out"), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, str(SCRIPT), "--bundle", str(bundle), "--site", str(tmp / "site"),
                           "--workdir-root", str(tmp / "runs"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def fake_wheel(folder: Path, dist: str, version: str, top: str) -> Path:
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{top}/__init__.py", "")
        zf.writestr(f"{dist}-{version}.dist-info/METADATA", f"Name: {dist}\nVersion: {version}\n")
    return path


def test_a_dependency_wheel_is_installed_only_when_missing_or_older(tmp_path):
    dr = load_script()
    assert dr.needs_install(fake_wheel(tmp_path, "pyyaml", "0.1", "yaml")) is None  # the venv has a newer one
    assert "older than the bundle's 999.0" in dr.needs_install(fake_wheel(tmp_path, "pyyaml", "999.0", "yaml"))
    assert "not importable" in dr.needs_install(fake_wheel(tmp_path, "no_such_dist", "1.0", "no_such_pkg_xyz"))
    assert dr.wheel_info(fake_wheel(tmp_path, "pydantic", "2.0", "pydantic"))[2] == ["pydantic"]


@needs_shared
def test_the_bundle_fails_over_its_size_limit(tmp_path):
    res = make_bundle(tmp_path / "bundle", "DEVICE_MAX_MIB=1")
    assert res.returncode != 0
    assert "over the 1 MiB limit" in res.stderr


@needs_shared
def test_device_run_on_the_cpu(tmp_path):
    bundle = tmp_path / "bundle"
    res = make_bundle(bundle)
    assert res.returncode == 0, res.stderr
    manifest = (bundle / "MANIFEST.txt").read_text()
    assert re.search(r"^commit: [0-9a-f]{40}", manifest, re.M)
    total = int(re.search(r"^total: (\d+) bytes", manifest, re.M).group(1))
    assert total <= 60 * 2**20
    wheels = sorted(p.name for p in (bundle / "wheels").iterdir())
    assert any(w.startswith("backdoor_harness-") for w in wheels)
    assert len(wheels) == 1 + len(list((SHARED / "device-wheels").glob("*.whl")))
    assert (bundle / "data" / "cifar10-jpeg.tar.gz").stat().st_size == \
        (SHARED / "datasets" / "cifar10-jpeg.tar.gz").stat().st_size

    res = device_run(tmp_path, bundle, "--budget-s", "240", "--queue", "tests/device/queue.yaml", "--device", "cpu")
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2 and "summary.md" in files, files  # the device tool brings back at most 8 files
    summary = (out / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| item")}
    assert rows["tiny-matrix"][0] == "ran" and rows["tiny-command"][0] == "ran"
    assert rows["too-long"][0] == "skipped" and re.search(r"expected 600 min > [\d.]+ min left", rows["too-long"][1])
    assert rows["gpu-only"][0] == "skipped" and "no expected minutes for device kind 'cpu'" in rows["gpu-only"][1]
    assert rows["waiting"][0] == "skipped" and rows["waiting"][1].startswith("blocked:")
    assert "preflight: passed" in summary and "- device: CPU" in summary

    pack = next(out.glob("device-run-cpu-*.tar.gz"))
    with tarfile.open(pack) as tar:
        tar.extractall(tmp_path / "unpacked")
    top = tmp_path / "unpacked" / pack.name[: -len(".tar.gz")]
    records = [json.loads(line) for line in (top / "records" / "tiny.cpu.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "evaluate"]
    assert {(r["attrs"]["attack"], r["attrs"]["defense"], r["attrs"]["evaluator"]) for r in evals} == \
        {(a, d, e) for a in ["badnets"] for d in ["none", "ft"] for e in ["clean_acc", "asr"]}  # select: no blended
    assert all(r["status"] == "done" for r in records)
    assert "badnets" in (top / "tables" / "tiny.cpu.md").read_text()
    assert "backdoor_harness" in (top / "items" / "tiny-command" / "hello.txt").read_text()
    assert json.loads((top / "preflight" / "preflight.json").read_text())
    # on this machine every dependency is importable already: only the project wheel goes in
    installed = json.loads((top / "summary.json").read_text())["installed"]
    assert [line.split()[1] for line in installed if line.startswith("install")] == \
        [w for w in wheels if w.startswith("backdoor_harness-")]
    assert (top / "logs" / "item-tiny-matrix.log").exists() and (top / "logs" / "install.log").exists()


@needs_shared
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA, where the preflight fails")
def test_a_failed_preflight_starts_no_item(tmp_path):
    bundle = tmp_path / "bundle"
    assert make_bundle(bundle).returncode == 0
    res = device_run(tmp_path, bundle, "--budget-s", "240", "--queue", "tests/device/queue.yaml", "--device", "cuda")
    assert res.returncode == 1
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "preflight: FAILED" in summary and "no queue item started" in summary
    assert "| tiny-matrix |" not in summary
    assert not (tmp_path / "runs" / "tiny").exists()


def test_a_command_still_running_when_the_budget_ends_is_stopped(tmp_path):
    dr = load_script()
    run = dr.Run(dr.parse(["--budget-s", "60", "--workdir-root", str(tmp_path), "--out", str(tmp_path / "out")]))
    run.logs.mkdir(parents=True)
    rc, secs = run.call("sleep 30 & sleep 30; wait", "item.log", timeout=1, shell=True)  # a child process too
    assert rc is None and secs < 15
    assert "stopped after" in (run.logs / "item.log").read_text()
    rc, _ = run.call(["true"], "item.log", timeout=10)
    assert rc == 0
