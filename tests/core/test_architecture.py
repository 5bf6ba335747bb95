"""The import rules of the design, checked from the source (every import, lazy ones included):

- the core (``harness/``) imports no plugin module and no leaderboard module (``cli.py``, the
  application shell, may import the leaderboard), names no installed plugin or metric, and has
  no import cycle;
- the leaderboard reads the core's results and record types only, never the registry;
- every plugin module has an entry point and imports from the harness only the toolkit (or
  another plugin module).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from backdoor_harness import registry

from helpers import ROOT

CORE = ROOT / "harness"
PACKAGE = "backdoor_harness"
#: the application shell: the command line renders boards, so it may import the leaderboard (the README
#: generator is the leaderboard's, leaderboard/readme.py, handed the core's readers by scripts/readme-tables)
SHELL = {"cli"}
#: what the leaderboard may import from the core
LEADERBOARD_MAY_IMPORT = {"results", "store", "errors"}


def module_name(path: Path) -> str:
    """The import name of a file of the tree (``harness/x.py`` -> ``backdoor_harness.x``)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts[0] == "harness":
        parts = parts[1:]
    return ".".join([PACKAGE, *parts])


def imports(path: Path, name: str | None = None) -> set[str]:
    """Every module ``path`` (module ``name``, default: from its place in the tree) imports from the
    package, at any depth of its code (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    here = (name or module_name(path)).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: set[str] = set()
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for stmt in block.body for n in ast.walk(stmt)}  # annotations only, never run
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.add(mod)
            # `from . import x` / `from pkg import module`: the names may be modules
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m == PACKAGE or m.startswith(PACKAGE + ".")}


def existing(modules: set[str]) -> set[str]:
    """The modules of the tree among ``modules`` (drop imported names that are not modules)."""
    files = {module_name(p) for p in all_files()}
    return {m for m in modules if m in files}


def all_files() -> list[Path]:
    return sorted([*CORE.glob("*.py"), *(ROOT / "leaderboard").glob("*.py"), *(ROOT / "plugins").rglob("*.py")])


def core_files() -> list[Path]:
    return sorted(CORE.glob("*.py"))


def plugin_modules() -> list[Path]:
    return sorted(p for p in (ROOT / "plugins").rglob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", core_files(), ids=lambda p: p.name)
def test_the_core_imports_no_plugin_and_no_leaderboard(path: Path):
    bad = {m for m in imports(path) if m.startswith(f"{PACKAGE}.plugins")}
    if path.stem not in SHELL:
        bad |= {m for m in imports(path) if m.startswith(f"{PACKAGE}.leaderboard")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sorted((ROOT / "leaderboard").glob("*.py")), ids=lambda p: p.name)
def test_the_leaderboard_reads_records_only(path: Path):
    core = {m.split(".")[1] for m in existing(imports(path)) if not m.startswith(f"{PACKAGE}.leaderboard")
            and m != PACKAGE}
    assert core <= LEADERBOARD_MAY_IMPORT, (f"{path.relative_to(ROOT)} imports core modules "
                                            f"{sorted(core - LEADERBOARD_MAY_IMPORT)}")


def test_no_import_cycle_in_the_core():
    graph = {module_name(p): existing(imports(p)) - {module_name(p), PACKAGE} for p in core_files()}
    graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle in the core: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def _string_literals(path: Path) -> dict[str, int]:
    """Every string constant of ``path`` outside docstrings, with its line."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value: n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings}


def plugin_and_metric_names() -> set[str]:
    out = set()
    for kind in registry.KINDS:
        for name in registry.names(kind):
            out.add(name)
            if kind == "evaluator":
                out.update(registry.get_class(kind, name).metrics)
    return out


@pytest.mark.parametrize("path", core_files(), ids=lambda p: p.name)
def test_the_core_names_no_plugin(path: Path):
    named = plugin_and_metric_names()
    found = {s: line for s, line in _string_literals(path).items() if s in named}
    assert not found, (f"{path.relative_to(ROOT)} names plugins or metrics "
                       + ", ".join(f"{s!r} (line {line})" for s, line in sorted(found.items())))


def entry_points() -> dict[str, str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return meta["project"]["entry-points"][PACKAGE]


@pytest.mark.parametrize("path", plugin_modules(), ids=lambda p: str(p.relative_to(ROOT / "plugins")))
def test_every_plugin_module_has_an_entry_point(path: Path):
    assert module_name(path) in set(entry_points().values()), (
        f"{path.relative_to(ROOT)} is not registered: add `name = \"{module_name(path)}\"` to "
        f"[project.entry-points.{PACKAGE}] in pyproject.toml")


@pytest.mark.parametrize("path", plugin_modules(), ids=lambda p: str(p.relative_to(ROOT / "plugins")))
def test_a_plugin_imports_only_the_toolkit(path: Path):
    allowed = (f"{PACKAGE}.toolkit", f"{PACKAGE}.plugins")
    bad = {m for m in existing(imports(path)) if not m.startswith(allowed)}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}; import them from {PACKAGE}.toolkit"


def test_the_rules_see_a_violation(tmp_path: Path):
    """The checks above are not vacuous: the parser finds lazy and relative imports and literals."""
    probe = tmp_path / "probe.py"
    probe.write_text('"""doc: none"""\ndef f():\n    from .leaderboard import render\n    return "badnets"\n')
    assert f"{PACKAGE}.leaderboard.render" in imports(probe, f"{PACKAGE}.probe")
    assert "badnets" in _string_literals(probe) and "doc: none" not in _string_literals(probe)
