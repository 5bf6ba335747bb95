"""Plugin discovery (pluggy) and the one way in per kind: ``create_*`` / ``list_*``.

Plugins are found through the ``backdoor_harness`` entry-point group, lazily,
the first time something asks (never at import time). Set
``HARNESS_DISABLE_PLUGIN_AUTOLOAD=1`` to load nothing automatically (tests
register their own), and ``HARNESS_TRACE_PLUGINS=1`` to trace hook calls.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import json
import os
import sys
from typing import Any

import pluggy
from pydantic import ValidationError

from . import hookspecs
from .errors import HarnessError

KINDS = {"attack": "harness_attacks", "defense": "harness_defenses",
         "evaluator": "harness_evaluators", "dataset": "harness_datasets"}

_pm: pluggy.PluginManager | None = None
_tables: dict[str, dict[str, tuple[type, str]]] | None = None
_instances: dict[tuple[str, str, str], Any] = {}


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built (and entry points loaded) on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        if not os.environ.get("HARNESS_DISABLE_PLUGIN_AUTOLOAD"):
            pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        for name in filter(None, (n.strip() for n in os.environ.get("HARNESS_PLUGINS", "").split(","))):
            # plugins from modules not installed as packages, e.g. a local file on PYTHONPATH; worker
            # processes inherit the variable, so they see the same plugins as the driver
            module = _import_plugin_module(name)
            if not pm.is_registered(module):  # named twice, or also installed (an entry point)
                pm.register(module, name=name)
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as err:
            name = pm.get_name(err.plugin) if getattr(err, "plugin", None) is not None else "?"
            raise HarnessError(f"plugin {name!r}: {err} (a @hookimpl whose name is not a hook of backdoor_harness: "
                               f"check its spelling against backdoor_harness.hookspecs)") from None
        if os.environ.get("HARNESS_TRACE_PLUGINS"):
            pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
            pm.enable_tracing()
        _pm = pm
    return _pm


def _import_plugin_module(name: str) -> object:
    """A module named in ``HARNESS_PLUGINS``, imported; a missing or failing one is a HarnessError
    naming it (and, for one that fails, the line that raised)."""
    where = f"HARNESS_PLUGINS={os.environ.get('HARNESS_PLUGINS', '')!r} names module {name!r}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and not (name == err.name or name.startswith(err.name + ".")):  # there, but a dependency is not
            raise HarnessError(f"{where}, which imports {err.name!r}, which is not installed; install it, or remove "
                               f"{name!r} from HARNESS_PLUGINS") from None
        raise HarnessError(f"{where}, but no such module is importable; put its folder on PYTHONPATH (or install "
                           f"it), fix the name, or remove it from HARNESS_PLUGINS") from None
    except (Exception, SystemExit) as err:  # its own code failed (a syntax error, an exception or sys.exit() at import)
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        line = err.lineno if isinstance(err, SyntaxError) else (tb.tb_lineno if tb else None)
        file = err.filename if isinstance(err, SyntaxError) else (tb.tb_frame.f_code.co_filename if tb else "?")
        if isinstance(err, SystemExit):  # uncaught, `harness validate`/`run` would end silently (exit 0 on exit(0))
            raise HarnessError(f"{where}, but importing it called sys.exit({err.code!r}) at {file}:{line}; a plugin "
                               f"module must not exit at import: fix the module or remove it from HARNESS_PLUGINS"
                               ) from None
        raise HarnessError(f"{where}, but importing it failed at {file}:{line}: {type(err).__name__}: {err}; fix "
                           f"the module or remove it from HARNESS_PLUGINS") from None


def reset() -> None:
    """Forget the plugin manager and tables (tests, or after installing a plugin)."""
    global _pm, _tables
    _pm, _tables = None, None
    _instances.clear()


def register(plugin: object, name: str | None = None) -> None:
    """Register an in-process plugin (a module or object with hook implementations)."""
    global _tables
    get_plugin_manager().register(plugin, name=name)
    _instances.clear()
    _tables = None


def _package_of(pm: pluggy.PluginManager, plugin: object) -> str:
    for p, dist in pm.list_plugin_distinfo():
        if p is plugin:
            return f"{dist.project_name} {dist.version}"
    return getattr(plugin, "__name__", None) or pm.get_name(plugin) or repr(plugin)


def _build_tables() -> dict[str, dict[str, tuple[type, str]]]:
    global _tables
    if _tables is None:
        pm = get_plugin_manager()
        tables: dict[str, dict[str, tuple[type, str]]] = {}
        for kind, hook in KINDS.items():
            table: dict[str, tuple[type, str]] = {}
            for impl in getattr(pm.hook, hook).get_hookimpls():
                package = _package_of(pm, impl.plugin)
                for cls in impl.function() or []:
                    if cls.name in table and table[cls.name][0] is not cls:
                        raise HarnessError(
                            f"two {kind} plugins are named {cls.name!r}: {table[cls.name][0].__module__} "
                            f"(from {table[cls.name][1]}) and {cls.__module__} (from {package}); "
                            f"uninstall one of the packages or rename its {kind}")
                    table[cls.name] = (cls, package)
            tables[kind] = table
        _tables = tables
    return _tables


def plugin_table(kind: str) -> dict[str, tuple[type, str]]:
    """``name -> (class, package)`` for one kind."""
    return _build_tables()[kind]


def get_class(kind: str, name: str) -> type:
    table = plugin_table(kind)
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise HarnessError(f"unknown {kind} {name!r}.{hint} Installed: {', '.join(sorted(table)) or '(nothing)'} "
                           f"(see `harness list {kind}s`).")
    return table[name][0]


def format_validation_error(err: ValidationError, where: str) -> str:
    """One line per problem: the key path, what was wrong, and the fix pydantic suggests."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key {loc!r} (remove it or check its spelling)")
        elif e["type"] == "missing":
            lines.append(f"{where}: missing required key {loc!r}")
        else:
            lines.append(f"{where}: {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def create(kind: str, name: str, **config: Any) -> Any:
    """Instantiate a plugin with a validated config; bad configs raise HarnessError."""
    cls = get_class(kind, name)
    try:
        cfg = cls.Config(**config)
    except ValidationError as err:
        fields = ", ".join(cls.Config.model_fields) or "(no keys)"
        raise HarnessError(format_validation_error(err, f"{kind} {name!r}") +
                           f"\n  valid keys of {kind} {name!r}: {fields}") from None
    return cls(cfg)


def instance(kind: str, name: str, config: dict[str, Any] | None = None) -> Any:
    """The plugin ``name`` with ``config``, created once per process and config (validation errors
    as :func:`create`). Shared: use it for plugins that keep no state between calls (defenses,
    evaluators, and attacks only to read their declarations); an attack that loads generated or
    learned state gets its own :func:`create`."""
    memo = (kind, name, json.dumps(config or {}, sort_keys=True, default=str))
    if memo not in _instances:
        _instances[memo] = create(kind, name, **(config or {}))
    return _instances[memo]


def names(kind: str, pattern: str = "*") -> list[str]:
    return sorted(n for n in plugin_table(kind) if fnmatch.fnmatch(n, pattern))


def create_attack(name: str, **config: Any):
    """Create an attack by registry name, e.g. ``create_attack("badnets", poison_rate=0.05)``."""
    return create("attack", name, **config)


def create_defense(name: str, **config: Any):
    """Create a defense by registry name."""
    return create("defense", name, **config)


def create_evaluator(name: str, **config: Any):
    """Create an evaluator by registry name."""
    return create("evaluator", name, **config)


def create_dataset(name: str, **config: Any):
    """Create a data-set source by registry name."""
    return create("dataset", name, **config)


def list_attacks(pattern: str = "*") -> list[str]:
    """Registered attack names matching an fnmatch pattern (``"*blend*"``)."""
    return names("attack", pattern)


def list_defenses(pattern: str = "*") -> list[str]:
    return names("defense", pattern)


def list_evaluators(pattern: str = "*") -> list[str]:
    return names("evaluator", pattern)


def list_datasets(pattern: str = "*") -> list[str]:
    return names("dataset", pattern)
