"""The worker-pool executor: same results as in-process, a killed worker's job retried, a job that
always kills its worker recorded failed while the rest of the matrix completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from backdoor_harness import registry
from backdoor_harness.matrix import MatrixSpec
from backdoor_harness.scheduler import run_matrix
from backdoor_harness.store import Store

#: a defense module the spawned workers import through HARNESS_PLUGINS: it SIGKILLs its own
#: process the first `deaths` times it runs (counted in a file, since each death loses memory)
KILLER = '''
import os, signal
from pathlib import Path

import backdoor_harness as bh
from backdoor_harness import PluginConfig


class KillerConfig(PluginConfig):
    deaths: int = 1
    counter: str = ""


class Killer(bh.Defense):
    name = "test_killer"
    version = "1"
    summary = "kills its worker process the first `deaths` times"
    paper = "-"
    Config = KillerConfig

    def purify(self, model, ctx):
        path = Path(self.config.counter)
        n = int(path.read_text()) if path.exists() else 0
        if n < self.config.deaths:
            path.write_text(str(n + 1))
            os.kill(os.getpid(), signal.SIGKILL)
        return bh.Purified(model)


@bh.hookimpl
def harness_defenses():
    return [Killer]
'''


def plugin_module(tmp_path, monkeypatch, name: str, source: str) -> None:
    """Write ``source`` as module ``name`` and load it as a plugin here and in every worker or actor
    (through PYTHONPATH and HARNESS_PLUGINS, as a user would); the registry is reset to see it."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("HARNESS_PLUGINS", name)
    registry.reset()


@pytest.fixture
def killer(tmp_path, monkeypatch):
    plugin_module(tmp_path, monkeypatch, "killer_defense", KILLER)
    yield tmp_path
    registry.reset()


def spec(defenses, attacks=("badnets", "blended")) -> MatrixSpec:
    return MatrixSpec.model_validate({
        "datasets": [{"name": "cifar10", "train_per_class": 20, "test_per_class": 10}],
        "models": [{"name": "tiny_cnn", "kwargs": {"width": 8}}],
        "attacks": [{"name": a, "config": {"stamp": "after_augment"}} for a in attacks],
        "defenses": defenses, "evaluators": ["clean_acc", "asr"], "recipe": {"base": "cpu-quick", "epochs": 1}})


def metrics(workdir) -> dict[str, dict]:
    store = Store(workdir)
    try:
        return {r.label: r.metrics for r in store.records("evaluate")}
    finally:
        store.close()


@pytest.mark.integration
def test_two_workers_give_the_results_of_one_process(tmp_path):
    quick = spec(["none", {"name": "ft", "config": {"epochs": 1}}])
    run_matrix(quick, tmp_path / "one", progress=False, log=lambda *a: None)
    lines: list[str] = []
    counts = run_matrix(quick, tmp_path / "pool", progress=False, log=lines.append, workers=2)
    assert counts["done"] == 14 and counts["failed"] == 0, counts
    assert "2 workers on CPU" in lines[0]
    assert metrics(tmp_path / "pool") == metrics(tmp_path / "one")


@pytest.mark.integration
def test_a_killed_worker_is_replaced_and_its_job_retried(killer):
    counter = killer / "deaths"
    quick = spec(["none", {"name": "test_killer", "config": {"deaths": 1, "counter": str(counter)}}], ["badnets"])
    lines: list[str] = []
    counts = run_matrix(quick, killer / "work", progress=False, log=lines.append, workers=2)
    assert counts["failed"] == 0 and counts["blocked"] == 0 and counts["done"] == 7, counts
    assert counter.read_text() == "1"  # it died once ...
    assert sum("died (exit code -9)" in line and "retry 1 of 2" in line for line in lines) == 1  # ... was retried
    assert len(metrics(killer / "work")) == 4


@pytest.mark.integration
def test_a_job_that_always_kills_its_worker_fails_and_the_rest_completes(killer):
    quick = spec(["none", {"name": "test_killer", "config": {"deaths": 99, "counter": str(killer / "n")}}],
                 ["badnets"])
    counts = run_matrix(quick, killer / "work", progress=False, log=lambda *a: None, workers=2, retries=1)
    # the killer's purify fails after 1 + 1 runs, its 2 evaluations are blocked, the rest is done
    assert counts == {"cached": 0, "done": 4, "failed": 1, "skipped": 0, "blocked": 2}, counts
    store = Store(killer / "work")
    failed = [r for r in store.records() if r.status == "failed"]
    store.close()
    assert all("died (exit code -9) while running it, 2 times (retries: 1)" in r.error for r in failed)
    assert (killer / "n").read_text() == "2"


@pytest.mark.integration
def test_the_ray_executor_gives_the_results_of_the_local_one(tmp_path):
    ray = pytest.importorskip("ray", reason="the test extras install Ray: pip install -e '.[test]'")
    quick = spec(["none", {"name": "ft", "config": {"epochs": 1}}], ["badnets"])
    run_matrix(quick, tmp_path / "local", progress=False, log=lambda *a: None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a local instance, on the CPU
    try:
        lines: list[str] = []
        counts = run_matrix(quick, tmp_path / "ray", progress=False, log=lines.append, executor="ray")
    finally:
        ray.shutdown()
    assert counts["done"] == 7 and counts["failed"] == 0, counts
    assert "2 Ray actors" in lines[0]
    assert metrics(tmp_path / "ray") == metrics(tmp_path / "local")
    store = Store(tmp_path / "ray")
    assert {r.device for r in store.records()} == {"cpu (x86_64, 1 threads)"}  # records from the actors
    store.close()


#: a defense whose first run announces itself (a file) and then waits to be killed with its node
STALLER = '''
import time
from pathlib import Path

import backdoor_harness as bh
from backdoor_harness import PluginConfig


class StallerConfig(PluginConfig):
    folder: str = ""


class Staller(bh.Defense):
    name = "test_staller"
    version = "1"
    summary = "the first run stalls until its node is removed"
    paper = "-"
    Config = StallerConfig

    def purify(self, model, ctx):
        runs = Path(self.config.folder) / "runs"
        n = int(runs.read_text()) if runs.exists() else 0
        runs.write_text(str(n + 1))
        if n == 0:
            time.sleep(300)
        return bh.Purified(model)


@bh.hookimpl
def harness_defenses():
    return [Staller]
'''


@pytest.mark.slow  # about 70 s (a local cluster started, a node lost, a new one joined): `make test` keeps
@pytest.mark.integration  # the Ray executor's equality test above; --runslow adds this one
def test_ray_reruns_the_job_of_a_lost_node(tmp_path, monkeypatch):
    """A real node loss: a local Ray cluster of a head (no CPUs) and one worker node; while the
    actor on that node runs a job, the node's processes are killed and a new node joins. Ray
    restarts the actor there, the executor reruns the job, and the matrix completes."""
    ray = pytest.importorskip("ray", reason="the test extras install Ray: pip install -e '.[test]'")
    from ray.cluster_utils import Cluster

    plugin_module(tmp_path, monkeypatch, "staller_defense", STALLER)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    first = cluster.add_node(num_cpus=1)

    from backdoor_harness.executor import RayExecutor

    poll, lost = RayExecutor.poll, []

    def poll_and_lose_the_node(self):  # the driver's loop (Ray starts nodes from the main thread only)
        if not lost and (tmp_path / "runs").exists():
            lost.append(cluster.add_node(num_cpus=1))
            cluster.remove_node(first, allow_graceful=False)
        return poll(self)

    monkeypatch.setattr(RayExecutor, "poll", poll_and_lose_the_node)
    lines: list[str] = []
    try:
        quick = spec(["none", {"name": "test_staller", "config": {"folder": str(tmp_path)}}], ["badnets"])
        counts = run_matrix(quick, tmp_path / "work", progress=False, log=lines.append, executor="ray",
                            address=cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
        registry.reset()
    assert lost, "the job never started on the first node"
    assert counts["done"] == 7 and counts["failed"] == 0, (counts, lines)
    assert (tmp_path / "runs").read_text() == "2"  # stalled once on the lost node, then run again
    # Ray reports the call lost as the actor's node goes (unavailable, or died if Ray noticed first)
    assert sum("ray actor 0 unavailable" in line or "retry 1 of 2" in line for line in lines) == 1, lines


@pytest.mark.integration
def test_a_ray_actor_never_opens_the_store(tmp_path):
    """What an actor runs needs only the upstream records the driver sends (SQLite must not be shared
    across nodes): a train job, then its purify job, in a work directory with no database."""
    from backdoor_harness.executor import _RayWorker
    from backdoor_harness.matrix import expand

    jobs = {j.key: j for j in expand(spec(["none"], ["badnets"]))}
    train = next(j for j in jobs.values() if j.kind == "train")
    purify = next(j for j in jobs.values() if j.kind == "purify")
    actor = _RayWorker(str(tmp_path), "cpu", jobs)
    trained = actor.run(train.key, {})
    assert trained["status"] == "done", trained["error"]
    purified = actor.run(purify.key, {train.key: trained})
    assert purified["status"] == "done", purified["error"]
    assert not list(tmp_path.glob("results.sqlite*"))


#: a defense that writes its worker's pid to a file and then waits to be killed
SLEEPER = '''
import os, time
from pathlib import Path

import backdoor_harness as bh
from backdoor_harness import PluginConfig


class SleeperConfig(PluginConfig):
    folder: str = ""


class Sleeper(bh.Defense):
    name = "test_sleeper"
    version = "1"
    summary = "announces its worker's pid, then sleeps"
    paper = "-"
    Config = SleeperConfig

    def purify(self, model, ctx):
        (Path(self.config.folder) / f"pid-{os.getpid()}").write_text(str(os.getppid()))
        time.sleep(300)
        return bh.Purified(model)


@bh.hookimpl
def harness_defenses():
    return [Sleeper]
'''

SLEEPY_MATRIX = """
name: sleepy
datasets: [{name: cifar10, train_per_class: 10, test_per_class: 5}]
models: [{name: tiny_cnn, kwargs: {width: 4}}]
attacks: [{name: badnets, config: {stamp: after_augment}}]
defenses: [{name: test_sleeper, config: {folder: FOLDER}}]
evaluators: [clean_acc]
recipe: {base: cpu-quick, epochs: 1}
"""


def children(pid: int) -> set[int]:
    """The live (not zombie) child processes of ``pid``, from /proc."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def harness_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "backdoor_harness.cli", *args]


@pytest.fixture
def sleeper(tmp_path, monkeypatch):
    plugin_module(tmp_path, monkeypatch, "sleeper_defense", SLEEPER)
    spec = tmp_path / "m.yaml"
    spec.write_text(SLEEPY_MATRIX.replace("FOLDER", str(tmp_path)))
    yield tmp_path, spec
    registry.reset()


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_workers_die_with_a_killed_driver(sleeper):
    """SIGKILL of `harness run --workers 2` while one worker runs a job and the other waits for one:
    both workers and the multiprocessing resource tracker exit within seconds."""
    folder, spec = sleeper
    driver = subprocess.Popen(harness_cli("run", str(spec), "--workdir", str(folder / "work"), "--workers", "2",
                                          "--no-progress"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(folder.glob("pid-*")) and driver.poll() is None:
            time.sleep(0.1)
        busy = [int(p.name[4:]) for p in folder.glob("pid-*")]
        assert busy, f"the sleeper never started: {driver.stderr.read().decode() if driver.poll() is not None else ''}"
        kids = children(driver.pid)  # the two workers and the resource tracker
        assert len(kids) >= 3 and set(busy) < kids, (kids, busy)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(pid) for pid in kids):
        time.sleep(0.1)
    left = [pid for pid in kids if alive(pid)]
    for pid in left:  # do not leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the killed driver still alive after 10 s: {left}"


@pytest.mark.integration
def test_ctrl_c_stops_the_workers_and_releases_the_claims(sleeper):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) during `harness run
    --workers 2`: exit 130 with one line, no traceback from the workers, no worker left, no
    claim left, the busy job not marked done."""
    folder, spec = sleeper
    work = folder / "work"
    driver = subprocess.Popen(harness_cli("run", str(spec), "--workdir", str(work), "--workers", "2",
                                          "--no-progress"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(folder.glob("pid-*")) and driver.poll() is None:
            time.sleep(0.1)
        kids = children(driver.pid)
        assert list(folder.glob("pid-*")), driver.communicate()
        os.killpg(driver.pid, signal.SIGINT)
        out, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, (out, err)
    assert "interrupted; rerun the same command to resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(pid) for pid in kids):
        time.sleep(0.1)
    assert not [pid for pid in kids if alive(pid)]
    store = Store(work)
    try:
        assert store.claims() == {} and not store.db.execute("SELECT * FROM claims").fetchall()
        assert {r.kind: r.status for r in store.records()}.get("purify") == "running"  # not done
    finally:
        store.close()
    assert not list((work / ".runs").glob("[!.]*"))  # the lease given back
