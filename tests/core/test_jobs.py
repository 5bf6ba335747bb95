"""Job keys and the DAG: stable across processes, changed by exactly what they depend on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from backdoor_harness import registry
from backdoor_harness.matrix import MatrixSpec, expand
from backdoor_harness.results import upstream_of
from backdoor_harness.store import job_record

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


#: the kind of job behind each upstream role
ROLE_KINDS = {"clean": "train", "prepare": "prepare", "train": "train", "purified": "purify", "defended": "purify"}


def test_records_name_their_upstream_jobs_by_role():
    """Every role a job has (LC's prepare job its clean model, QRA its clean model and its reference
    defense) is in its record by name: the keys of deps, in their order; read by position (records
    written before roles were recorded), the first keys get the same roles."""
    jobs = {j.key: j for j in expand(MatrixSpec.model_validate({
        **BASE, "attacks": ["badnets", "lc"], "defenses": ["none", "ep"],
        "evaluators": ["asr", {"name": "qra", "config": {"reference": "ep"}}]}))}
    seen = set()
    for job in jobs.values():
        rec = job_record(job, "done")
        assert rec.upstream == job.upstream and list(rec.upstream.values()) == rec.deps == job.deps
        assert upstream_of(rec) == rec.upstream
        assert upstream_of(rec.model_copy(update={"upstream": {}})).items() <= rec.upstream.items()
        for role, key in rec.upstream.items():
            kind, _, name = role.partition(":")
            up = jobs[key]
            assert up.kind == ROLE_KINDS[kind], (job.label, role, up.label)
            assert up.cell.role == {"clean": "clean", "train": "attacked"}.get(kind, up.cell.role)
            assert not name or up.defense.name == name
            seen.add((job.kind, kind))
    assert seen == {("prepare", "clean"), ("train", "prepare"), ("purify", "train"), ("evaluate", "train"),
                    ("evaluate", "purified"), ("evaluate", "clean"), ("evaluate", "defended")}


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


def test_validation_split_follows_the_spc_protocol():
    from backdoor_harness.data import validation_split

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2])  # SPC 2 for classes 0 and 1; class 2 has one sample
    train, val = validation_split(labels, 0.1, g)
    assert sorted(labels[val].tolist()) == [0, 1] and sorted(labels[train].tolist()) == [0, 1, 2]
    assert set(train.tolist()).isdisjoint(val.tolist()) and len(train) + len(val) == 5
    labels = torch.arange(100) % 10  # SPC 10: one per class; SPC 100 would give 10
    train, val = validation_split(labels, 0.1, g)
    assert torch.bincount(labels[val]).tolist() == [1] * 10
    train, val = validation_split(torch.arange(1000) % 10, 0.1, g)
    assert torch.bincount((torch.arange(1000) % 10)[val]).tolist() == [10] * 10


def test_spc_entries_share_the_training_jobs_and_keep_their_labels():
    spec = MatrixSpec.model_validate({
        "datasets": [{"name": "cifar10", "reserve_per_class": n, "label": f"cifar10-spc{n}"} for n in (2, 10, 100)],
        "models": ["tiny_cnn"], "attacks": ["badnets"], "defenses": ["ft"], "evaluators": ["asr"]})
    jobs = expand(spec)
    assert sum(j.kind == "train" for j in jobs) == 1  # the reserve does not change the attacked model
    purify = [j for j in jobs if j.kind == "purify"]
    assert len({j.key for j in purify}) == 3
    assert sorted(j.cell.dataset for j in jobs if j.kind == "evaluate") == [
        "cifar10-spc10", "cifar10-spc100", "cifar10-spc2"]
    assert [j.payload["reserve"]["reserve_per_class"] for j in purify] == [2, 10, 100]


# -- per-attack settings (paper 000's PAM radius and retuning counts differ by attack) ---------------

TWO = {**BASE, "attacks": ["badnets", {"name": "blended", "config": {"alpha": 0.1}}]}


def keys2(**over) -> dict[str, str]:
    return {j.label: j.key for j in expand(MatrixSpec.model_validate({**TWO, **over}))}


def test_per_attack_defense_config_changes_only_that_attacks_cells():
    before = keys2()
    after = keys2(defenses=["none", {"name": "ft", "config": {"epochs": 2}, "per_attack": {"badnets": {"epochs": 3}}}])
    plain = keys2(defenses=["none", {"name": "ft", "config": {"epochs": 2}}])
    # blended's cells run with epochs 2: the same keys as a matrix without per_attack
    assert {k: v for k, v in after.items() if "/blended/" in k} == {k: v for k, v in plain.items() if "/blended/" in k}
    assert changed(before, after) == {k for k in before if "/ft/" in k}
    assert changed(plain, after) == {k for k in before if "/ft/" in k and "/badnets/" in k}
    jobs = {j.label: j for j in expand(MatrixSpec.model_validate({**TWO, "defenses": [
        {"name": "ft", "config": {"epochs": 2}, "per_attack": {"badnets": {"epochs": 3}}}]}))}
    assert jobs["purify cifar10/tiny_cnn/badnets/ft/s0"].payload["defense"] == {"name": "ft", "config": {"epochs": 3}}
    assert jobs["purify cifar10/tiny_cnn/blended/ft/s0"].payload["defense"] == {"name": "ft", "config": {"epochs": 2}}


def test_per_attack_evaluator_config():
    plain = keys2(evaluators=["clean_acc", {"name": "retune", "config": {"control": False}}])
    after = keys2(evaluators=["clean_acc", {"name": "retune", "config": {"control": False},
                                           "per_attack": {"blended": {"poison_count": 1}}}])
    assert changed(plain, after) == {k for k in plain if k.startswith("evaluate") and "/blended/" in k
                                     and k.split("/")[-2] == "retune"}


@pytest.mark.parametrize("entry, message", [
    ({"name": "ft", "per_attack": {"badnet": {"epochs": 3}}}, "per_attack names ['badnet'], not an attack"),
    ({"name": "ft", "per_attack": {"badnets": {"epochz": 3}}}, "defenses[0] (per_attack badnets)"),
])
def test_per_attack_mistakes_are_named(tmp_path, entry, message):
    import yaml

    from backdoor_harness.errors import HarnessError
    from backdoor_harness.matrix import load_matrix

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({**TWO, "defenses": [entry]}))
    with pytest.raises(HarnessError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        load_matrix(path)
    path.write_text(yaml.safe_dump({**TWO, "attacks": [{"name": "badnets", "per_attack": {"badnets": {}}}]}))
    with pytest.raises(HarnessError, match="per_attack` is for defenses and evaluators"):
        load_matrix(path)
