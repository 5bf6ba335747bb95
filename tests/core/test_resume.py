"""Resume and sharing: SIGKILL a real `harness run` mid-matrix and rerun, or run two at once on one
work directory; either way the results equal an uninterrupted run's and no job runs twice."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from backdoor_harness.store import Store

MATRIX = """
name: resume
datasets:
  - {name: cifar10, train_per_class: 40, test_per_class: 20}
models:
  - {name: tiny_cnn, kwargs: {width: 8}}
attacks:
  - {name: badnets, config: {stamp: after_augment}}
  - {name: blended, config: {stamp: after_augment}}
defenses: [none, {name: ft, config: {epochs: 8}}, {name: ep, config: {epochs: 8}}, test_gate]
evaluators: [clean_acc, asr, der]
seeds: [0]
recipe: {base: cpu-quick, epochs: 6}
"""


#: a defense that returns the model unchanged; where $GATE_DIR is set, the first of its calls (in either
#: run) waits there until the test creates $GATE_DIR/go. Not in its config, so not in the job keys.
GATE = '''
import os, time
from pathlib import Path

import backdoor_harness as bh


class Gate(bh.Defense):
    name = "test_gate"
    version = "1"
    summary = "returns the model unchanged; the first call waits for $GATE_DIR/go where GATE_DIR is set"
    paper = "-"

    def purify(self, model, ctx):
        folder = os.environ.get("GATE_DIR")
        if folder:
            try:
                os.close(os.open(Path(folder) / "entered", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return bh.Purified(model)
            deadline = time.time() + 300
            while not (Path(folder) / "go").exists():
                if time.time() > deadline:
                    raise RuntimeError("the test never opened the gate")
                time.sleep(0.05)
        return bh.Purified(model)


@bh.hookimpl
def harness_defenses():
    return [Gate]
'''


@pytest.fixture(scope="module", autouse=True)
def gate_plugin(tmp_path_factory):
    """Every `harness run` of this module loads the gate defense (PYTHONPATH and HARNESS_PLUGINS, as a
    user would)."""
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "gate_defense.py").write_text(textwrap.dedent(GATE))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]))
        mp.setenv("HARNESS_PLUGINS", "gate_defense")
        yield


def harness(*args: str) -> list[str]:
    return [sys.executable, "-m", "backdoor_harness.cli", *args]


def done_jobs(workdir: Path) -> dict[str, float]:
    db = workdir / "results.sqlite"
    if not db.exists():
        return {}
    try:
        con = sqlite3.connect(db, timeout=1)
        rows = con.execute("SELECT key, finished FROM jobs WHERE status = 'done'").fetchall()
        con.close()
    except sqlite3.OperationalError:
        return {}
    return {k: float(f) for k, f in rows}


def metrics(workdir: Path) -> dict[str, dict]:
    store = Store(workdir)
    out = {r.key: r.metrics for r in store.records("evaluate")}
    store.close()
    return out


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> tuple[Path, int, dict[str, dict]]:
    """The matrix file, its job count, and the metrics of an uninterrupted run of it."""
    folder = tmp_path_factory.mktemp("resume")
    spec = folder / "m.yaml"
    spec.write_text(MATRIX)
    total = int(subprocess.run(harness("validate", str(spec)), capture_output=True, text=True, check=True)
                .stdout.split("valid; ")[1].split()[0])
    subprocess.run(harness("run", str(spec), "--workdir", str(folder / "fresh"), "--no-progress"), check=True,
                   capture_output=True)
    return spec, total, metrics(folder / "fresh")


@pytest.mark.integration
def test_killed_run_resumes_without_recomputing(tmp_path: Path, fresh):
    spec, total, uninterrupted = fresh

    killed = tmp_path / "killed"
    proc = subprocess.Popen(harness("run", str(spec), "--workdir", str(killed), "--no-progress"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(done_jobs(killed)) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = done_jobs(killed)
    assert 3 <= len(before) < total, f"kill landed outside the matrix ({len(before)}/{total} done)"

    out = subprocess.run(harness("run", str(spec), "--workdir", str(killed), "--no-progress"),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    after = done_jobs(killed)
    assert len(after) == total
    # finished jobs were reused, not recomputed: their records are untouched
    assert {k: after[k] for k in before} == before
    assert f"cached {len(before)} done {total - len(before)}" in out.stdout

    assert metrics(killed) == uninterrupted

    # a third run has nothing left to do
    again = subprocess.run(harness("run", str(spec), "--workdir", str(killed), "--no-progress"),
                           capture_output=True, text=True, check=True)
    assert f"cached {total} done 0" in again.stdout


@pytest.mark.integration
def test_two_runs_on_one_workdir_share_the_jobs(tmp_path: Path, fresh, monkeypatch):
    spec, total, uninterrupted = fresh
    shared = tmp_path / "shared"
    # Whichever run first purifies with the gate waits there; the other must then do the rest it can
    # (at least the other attack's gate cell), so both runs do jobs however the two start on a loaded box.
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv("GATE_DIR", str(gate))
    procs = [subprocess.Popen(harness("run", str(spec), "--workdir", str(shared), "--no-progress"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.time() + 300
        # all but the gated purify and its 3 evaluations
        while len(done_jobs(shared)) < total - 4 and time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.1)
        assert (gate / "entered").exists() and len(done_jobs(shared)) == total - 4, \
            (len(done_jobs(shared)), [p.poll() for p in procs])
    finally:
        (gate / "go").touch()
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    # every job ran in exactly one of them; the other counted it as cached (done there)
    counts = [dict(zip(*[iter(out.strip().splitlines()[-1].split())] * 2)) for out, _ in outs]
    assert all(c["failed"] == c["blocked"] == "0" and int(c["cached"]) + int(c["done"]) == total for c in counts)
    done = [int(c["done"]) for c in counts]
    assert sum(done) == total and min(done) > 0, (done, outs[0][0])
    assert len(done_jobs(shared)) == total
    assert metrics(shared) == uninterrupted
    assert not list((shared / ".runs").glob("[!.]*"))  # both leases given back
