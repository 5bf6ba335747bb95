"""HARNESS_PLUGINS naming a module that is missing, fails on import, or needs something missing: one
clear message naming the module (and where it failed), exit 2, never a traceback."""

from __future__ import annotations

import pytest

from backdoor_harness import registry
from backdoor_harness.cli import main
from backdoor_harness.errors import HarnessError


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A folder on sys.path for plugin modules; the registry is rebuilt for each test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.reset()
    yield tmp_path
    registry.reset()


@pytest.mark.parametrize("source, expected", [
    (None, "names module 'plugin_under_test', but no such module is importable; put its folder on PYTHONPATH"),
    ("x = 1\nraise RuntimeError('boom at import')\n",
     "importing it failed at {folder}/plugin_under_test.py:2: RuntimeError: boom at import"),
    ("def broken(:\n", "importing it failed at {folder}/plugin_under_test.py:1: SyntaxError"),
    ("import a_dependency_nobody_installed\n", "which imports 'a_dependency_nobody_installed', which is not installed"),
])
def test_a_bad_harness_plugins_module_gets_one_message(plugins, monkeypatch, capsys, source, expected):
    if source is not None:
        (plugins / "plugin_under_test.py").write_text(source)
    monkeypatch.setenv("HARNESS_PLUGINS", "plugin_under_test")
    with pytest.raises(HarnessError) as err:
        registry.get_plugin_manager()
    assert expected.format(folder=plugins) in str(err.value)
    assert "HARNESS_PLUGINS='plugin_under_test'" in str(err.value)
    registry.reset()
    assert main(["list", "attacks"]) == 2
    assert capsys.readouterr().err.startswith("error: HARNESS_PLUGINS='plugin_under_test' names module")


def test_a_module_named_twice_is_registered_once(plugins, monkeypatch):
    (plugins / "twice_plugin.py").write_text("X = 1\n")
    monkeypatch.setenv("HARNESS_PLUGINS", "twice_plugin, twice_plugin")
    assert registry.get_plugin_manager().has_plugin("twice_plugin")


def test_a_hookimpl_that_is_no_hook_gets_one_message(plugins, monkeypatch):
    (plugins / "typo_plugin.py").write_text(
        "from backdoor_harness import hookimpl\n\n@hookimpl\ndef harness_defences():\n    return []\n")
    monkeypatch.setenv("HARNESS_PLUGINS", "typo_plugin")
    with pytest.raises(HarnessError, match="harness_defences.*check its spelling"):
        registry.get_plugin_manager()


@pytest.mark.parametrize("call, code", [("sys.exit(0)", "0"), ("sys.exit()", "None"), ("raise SystemExit(3)", "3")])
def test_a_plugin_module_that_exits_at_import_is_an_error_not_a_silent_exit(plugins, monkeypatch, capsys, call, code):
    """sys.exit(0) at import used to end `harness validate`/`harness run` with exit 0 and nothing done."""
    (plugins / "exiting_plugin.py").write_text(f"import sys\n\n{call}\n")
    monkeypatch.setenv("HARNESS_PLUGINS", "exiting_plugin")
    with pytest.raises(HarnessError) as err:
        registry.get_plugin_manager()
    assert f"names module 'exiting_plugin', but importing it called sys.exit({code}) at " \
           f"{plugins}/exiting_plugin.py:3" in str(err.value)
    for argv in (["list", "attacks"], ["validate", "configs/quickstart.yaml"]):
        registry.reset()
        assert main(argv) == 2
        out = capsys.readouterr()
        assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err  # validate prefixes file: key:
        assert "HARNESS_PLUGINS='exiting_plugin' names module 'exiting_plugin', but importing it called sys.exit(" \
            in out.err
