"""The registry: did-you-mean, duplicates, entry-point discovery, plugin attributes."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import pytest

import backdoor_harness as bh
from backdoor_harness import registry


@pytest.fixture
def fresh_registry():
    registry.reset()
    yield
    registry.reset()


@pytest.mark.parametrize("create, wrong, right", [(bh.create_attack, "blend", "blended"),
                                                  (bh.create_defense, "ftt", "ft"),
                                                  (bh.create_evaluator, "clean_accuracy", "clean_acc")])
def test_did_you_mean(create, wrong, right):
    with pytest.raises(bh.HarnessError, match=f"Did you mean '{right}'"):
        create(wrong)


def test_list_patterns():
    assert bh.list_attacks("*blend*") == ["blended"]
    assert {"none", "ft", "ep"} <= set(bh.list_defenses())
    assert {"clean_acc", "asr", "robust_acc", "der"} <= set(bh.list_evaluators())


@pytest.mark.parametrize("kind", sorted(registry.KINDS))
def test_every_plugin_declares_itself(kind):
    for name, (cls, package) in registry.plugin_table(kind).items():
        assert cls.name == name
        for attr in ("version", "summary", "paper"):
            assert isinstance(getattr(cls, attr), str) and getattr(cls, attr), f"{name}.{attr}"
        assert cls.Config.model_config.get("extra") == "forbid", name
        assert package


def test_unknown_config_key_is_an_error():
    with pytest.raises(bh.HarnessError, match="unknown key 'colour'"):
        bh.create_attack("badnets", colour="red")


def test_duplicate_names_fail_naming_both(fresh_registry):
    class Impostor(bh.Attack):
        name = "badnets"
        version = "9"
        summary = "a second badnets"
        paper = "-"

    registry.register(types.SimpleNamespace(harness_attacks=bh.hookimpl(lambda: [Impostor])), name="impostor")
    with pytest.raises(bh.HarnessError) as err:
        bh.list_attacks()
    msg = str(err.value)
    assert "'badnets'" in msg and "backdoor_harness.plugins.attacks.badnets" in msg and __name__ in msg


class FakeEntryPoint:
    def __init__(self, name, module):
        self.name, self.group, self.value, self._module = name, "backdoor_harness", module.__name__, module

    def load(self):
        return self._module


class FakeDistribution:
    version = "4.2"
    files = ()

    def __init__(self, module):
        self.metadata = {"name": "harness-fake-defense"}
        self.entry_points = [FakeEntryPoint("fake", module)]


def test_entry_point_discovery(fresh_registry, monkeypatch):
    class Fake(bh.Defense):
        name = "fake_defense"
        version = "1"
        summary = "found through an entry point"
        paper = "-"

        def purify(self, model, ctx):
            return bh.Purified(model)

    module = types.ModuleType("harness_fake_defense")
    module.harness_defenses = bh.hookimpl(lambda: [Fake])
    monkeypatch.setitem(sys.modules, module.__name__, module)
    real = list(importlib.metadata.distributions())
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: real + [FakeDistribution(module)])
    assert "fake_defense" in bh.list_defenses()
    cls, package = registry.plugin_table("defense")["fake_defense"]
    assert cls is Fake and package == "harness-fake-defense 4.2"
    assert "badnets" in bh.list_attacks()  # the built-ins came through the same group


def test_autoload_can_be_disabled(fresh_registry, monkeypatch):
    monkeypatch.setenv("HARNESS_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert bh.list_attacks() == []


def test_every_hook_is_specified_documented_and_used():
    """Meta-test (datasette style): each hookspec has a docstring, and the
    built-ins implement every hook through the same entry-point group."""
    from backdoor_harness import hookspecs

    pm = registry.get_plugin_manager()
    specs = [name for name in dir(hookspecs) if name.startswith("harness_")]
    assert specs == sorted(registry.KINDS.values())
    for name in specs:
        assert (getattr(hookspecs, name).__doc__ or "").strip(), f"{name} has no docstring"
        impls = getattr(pm.hook, name).get_hookimpls()
        assert any(i.plugin.__name__.startswith("backdoor_harness.") for i in impls), f"no built-in implements {name}"
