"""Plugins are created once per process per config (``registry.instance``): validating a matrix,
expanding it and running its jobs share one instance of each data set source, defense and evaluator
(and one of each attack, read for its declarations), however many jobs use it and however often the
matrix is run.
The exception, on purpose: the job handlers give every train job (and the jobs downstream of it)
attacks of their own, since an attack holds the state it generated or learned."""

from __future__ import annotations

import json
from collections import Counter

from backdoor_harness import handlers, registry
from backdoor_harness.matrix import load_matrix
from backdoor_harness.plugin import Plugin
from backdoor_harness.scheduler import run_matrix

from helpers import tiny_matrix, write_matrix


def test_each_plugin_is_created_once_per_config_and_attacks_once_per_job(tmp_path, monkeypatch):
    built: Counter = Counter()  # (kind, name, effective config) -> instances constructed
    fresh: Counter = Counter()  # (kind, name) -> instances the job handlers create for themselves
    init = Plugin.__init__

    def counting_init(self, config=None, **kwargs):
        init(self, config, **kwargs)
        built[(self.kind, self.name, json.dumps(self.config.model_dump(mode="json"), sort_keys=True))] += 1

    def counting_create(kind, name, **config):
        fresh[(kind, name)] += 1
        return registry.create(kind, name, **config)

    monkeypatch.setattr(registry, "_instances", {})  # nothing left over from other tests of this process
    monkeypatch.setattr(Plugin, "__init__", counting_init)
    monkeypatch.setattr(handlers, "create", counting_create)

    spec = load_matrix(write_matrix(tmp_path, tiny_matrix("instances")))  # validation creates them first
    counts = run_matrix(spec, tmp_path / "work", device="cpu", progress=False, log=lambda *a: None)
    assert counts["failed"] == counts["blocked"] == 0 and counts["done"] == 7, counts  # 1 train, 2 purify, 4 evaluate

    shared = {k: n for k, n in built.items() if k[0] != "attack"}
    assert {k[:2] for k in shared} == {("dataset", "cifar10"), ("defense", "none"), ("defense", "ft"),
                                       ("evaluator", "clean_acc"), ("evaluator", "asr")}
    assert all(n == 1 for n in shared.values()), shared  # validation and the data loader, two purify and four evaluate jobs: one each
    # the attack: one shared instance read for its declarations (validation, expand), and the handlers' own
    # (the train job's, untrained, and one holding its trained state for the purify and evaluate jobs)
    assert fresh == {("attack", "badnets"): 2}
    (attack,) = [k for k in built if k[0] == "attack"]
    assert built[attack] == 1 + fresh[("attack", "badnets")]

    before = (dict(built), dict(fresh))
    again = run_matrix(spec, tmp_path / "work", device="cpu", progress=False, log=lambda *a: None)
    assert again["cached"] == 7 and again["done"] == 0
    assert (dict(built), dict(fresh)) == before  # the same process and configs: nothing created again
