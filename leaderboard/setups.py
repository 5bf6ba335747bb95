"""Which published setup a measured cell reproduces.

A number in ``reported.yaml`` names the setup it comes from (``setup: NAME``, a
mapping of ``setups.yaml``, or the mapping itself). A setup pins what the
paper states: the training data, the defender's reserve, the model, the
training recipe, each attack's trigger config, each defense's and each
evaluator's key settings. A measured cell shows the reported number only when
what it ran with (its :class:`~backdoor_harness.results.Setup`, read from its
train, purify and evaluate records by :func:`backdoor_harness.results.collect`)
agrees with every pinned field (plugin defaults filled in, so a matrix that leaves
a paper default implicit still matches). Otherwise :func:`differences` names each field that
differs, and the leaderboard lists them under the board.

Besides the pinned fields, a cell never matches when its attack plugin
declares ``substitute`` (recorded in its train record; it generates its own resources instead of the
paper's), when the model's architecture revision in its records is not the
installed one, or when the setup is ``unsupported`` by the harness (the reason
is the note).

A pinned value can differ per attack: ``{by_attack: {badnets: 0.9}, else: 0.5}``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from backdoor_harness.results import PluginSetup, Setup

#: the setups shipped with the leaderboard
SETUPS_FILE = Path(__file__).with_name("setups.yaml")
#: the sections of a setup and where a cell's value comes from
SECTIONS = ("data", "reserve", "model", "recipe", "attacks", "defenses", "evaluators")


def load_setups(path: str | Path | None = SETUPS_FILE) -> dict[str, dict]:
    if path is None or not Path(path).exists():
        return {}
    return dict(yaml.safe_load(Path(path).read_text()) or {})


def _same(measured: Any, wanted: Any) -> bool:
    if isinstance(wanted, bool) or isinstance(measured, bool):
        return measured is wanted or measured == wanted
    if isinstance(wanted, (int, float)) and isinstance(measured, (int, float)):
        try:
            return math.isclose(float(measured), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
        except OverflowError:  # an integer beyond the float range: only an equal one is the same
            return measured == wanted
    if isinstance(wanted, dict) and isinstance(measured, dict):
        return all(_same(measured.get(k), v) for k, v in wanted.items())
    if isinstance(wanted, (list, tuple)) and isinstance(measured, (list, tuple)):
        return len(wanted) == len(measured) and all(_same(m, w) for m, w in zip(measured, wanted))
    return measured == wanted


def _show(value: Any) -> str:
    """A recorded value as the notes quote it (its ``repr``; one too long to print, cut short)."""
    try:
        text = repr(value)
    except ValueError:  # an integer with more digits than Python prints
        return "<a number too long to show>"
    return text if len(text) <= 200 else text[:200] + "…"


def _pinned(value: Any, attack: str | None) -> Any:
    if isinstance(value, dict) and "by_attack" in value:
        return value["by_attack"].get(attack, value.get("else"))
    return value


def _compare(where: str, measured: dict, wanted: dict, attack: str | None) -> list[str]:
    out = []
    for field, value in (wanted or {}).items():
        value = _pinned(value, attack)
        if field not in measured:
            out.append(f"{where}.{field}: not recorded (the paper's {value!r})")
        elif not _same(measured[field], value):
            out.append(f"{where}.{field} {_show(measured[field])} (the paper's {value!r})")
    return out


def differences(setup: dict | None, cell: Setup | None, evaluator: PluginSetup | None = None,
                entry: dict | None = None) -> list[str]:
    """Why a cell is not the setup of a reported number: one phrase per differing field, empty
    when it is. ``cell`` is the cell's :class:`~backdoor_harness.results.Setup`, ``evaluator`` the
    evaluator that produced the metric, ``entry`` the reported number (its own ``attack_config`` /
    ``defense_config`` pin fields too)."""
    if setup is None:
        return ["the reported number names no setup"]
    if setup.get("unsupported"):
        return [f"the paper's setup is not one the harness runs: {setup['unsupported']}"]
    if cell is None:
        return ["the cell's train or purify record is missing, so its setup is unknown"]
    attack, out = cell.attack, []
    out += _compare("data", cell.data, setup.get("data"), attack)
    reserve, why = _reserve_pins(setup.get("reserve"), (entry or {}).get("reserve"))
    if why:
        return [why]
    out += _compare("reserve", cell.reserve, reserve, attack)
    out += _compare("model", cell.model, setup.get("model"), attack)
    out += _compare("recipe", cell.recipe, setup.get("recipe"), attack)
    installed = cell.installed_model_version
    if installed is not None and cell.model_version != installed:
        out.append(f"model {cell.model.get('name')} is architecture revision {cell.model_version or 1}, "
                   f"the installed one is {installed}")
    if cell.attack_substitute:
        out.append(f"attack {attack} is a substitute ({cell.attack_substitute})")
    # an entry's own attack/defense config (a paper's ablation) overrides the setup's pins
    pins = {**((setup.get("attacks") or {}).get(attack) or {}), **((entry or {}).get("attack_config") or {})}
    out += _compare(f"{attack}", cell.attack_config, pins, attack)
    defense = cell.defense
    pins = {**((setup.get("defenses") or {}).get(defense) or {}), **((entry or {}).get("defense_config") or {})}
    out += _compare(f"{defense}", cell.defense_config, pins, attack)
    if evaluator is not None and evaluator.name is not None:
        out += _compare(evaluator.name, evaluator.config, (setup.get("evaluators") or {}).get(evaluator.name), attack)
    return out


def _reserve_pins(pins: dict | None, tag: str | None) -> tuple[dict | None, str | None]:
    """The reserve a number needs: the setup's, or an entry's own ``reserve`` tag (``spc10``:
    10 samples per class; ``ratio0.01``: 1% of the training set)."""
    if not tag:
        return pins, None
    tag = str(tag)
    if tag.startswith("spc") and tag[3:].isdigit():
        return {"reserve_per_class": int(tag[3:])}, None
    if tag.startswith("ratio"):
        try:
            return {"reserve_ratio": float(tag[5:]), "reserve_per_class": None}, None
        except ValueError:
            pass
    return None, f"the paper's reserve {tag!r} is not one the harness builds"
