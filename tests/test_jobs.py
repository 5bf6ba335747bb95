"""Job keys and the DAG: stable across processes, changed by exactly what they depend on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from backdoor_harness import registry
from backdoor_harness.matrix import MatrixSpec, expand

BASE = {"datasets": [{"name": "cifar10", "train_per_class": 10}], "models": ["tiny_cnn"],
        "attacks": ["badnets"], "defenses": ["none", "ft"], "evaluators": ["clean_acc", "asr"],
        "recipe": "cpu-quick"}


def keys(**over) -> dict[str, str]:
    return {j.label: j.key for j in expand(MatrixSpec.model_validate({**BASE, **over}))}


def test_dag_shape_and_order():
    jobs = expand(MatrixSpec.model_validate({**BASE, "seeds": [0, 1]}))
    kinds = [j.kind for j in jobs]
    assert (kinds.count("train"), kinds.count("purify"), kinds.count("evaluate")) == (2, 4, 8)
    seen = set()
    for job in jobs:
        assert set(job.deps) <= seen, f"{job.label} runs before its upstream"
        seen.add(job.key)
    assert len(seen) == len(jobs)


def test_keys_are_stable_across_processes():
    code = ("import json; from backdoor_harness.matrix import MatrixSpec, expand; "
            f"print(json.dumps({{j.label: j.key for j in expand(MatrixSpec.model_validate({BASE!r}))}}))")
    other = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout)
    assert other == keys() == keys()


def changed(a: dict, b: dict) -> set[str]:
    return {label for label in a if a[label] != b[label]}


def test_a_defense_config_changes_only_its_own_jobs():
    before, after = keys(), keys(defenses=["none", {"name": "ft", "config": {"epochs": 3}}])
    assert changed(before, after) == {label for label in before if "/ft/" in label}


@pytest.mark.parametrize("over", [
    {"attacks": [{"name": "badnets", "config": {"poison_rate": 0.05}}]},
    {"recipe": {"base": "cpu-quick", "lr": 0.02}},
    {"datasets": [{"name": "cifar10", "train_per_class": 11}]},
    {"seeds": [1]},
])
def test_upstream_changes_change_every_key(over):
    before = keys()
    after = {label.replace("/s1", "/s0"): key for label, key in keys(**over).items()}
    assert changed(before, after) == set(before)


def test_evaluator_change_touches_only_evaluations():
    before, after = keys(), keys(evaluators=["clean_acc", {"name": "asr", "label": "asr"}])
    assert before == after  # a label equal to the name is the same job
    plugin_cls = registry.get_class("evaluator", "asr")
    old = plugin_cls.version
    try:
        plugin_cls.version = old + ".1"
        bumped = keys()
    finally:
        plugin_cls.version = old
    assert changed(before, bumped) == {label for label in before if label.startswith("evaluate") and "/asr/" in label}


def test_plugin_version_is_part_of_the_key(monkeypatch):
    before = keys()
    monkeypatch.setattr(registry.get_class("attack", "badnets"), "version", "999")
    assert changed(before, keys()) == set(before)
