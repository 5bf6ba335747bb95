"""Every extension point of backdoor-harness, in one place.

A plugin is any importable module (or object) registered under the
``backdoor_harness`` entry-point group that implements one or more of the
hooks below with ``@backdoor_harness.hookimpl``. The built-in attacks,
defenses, evaluators and data sets are registered exactly that way, from the
harness's own ``pyproject.toml``.

Each hook returns a list of *classes* (not instances); the core flattens the
results of every plugin into one ``name -> class`` table per kind and fails
loudly when two plugins register the same name. Hook implementations may take
fewer arguments than the spec (none, today), so specs can grow without
breaking plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from .contracts import Attack, Defense, Evaluator
    from .data import DatasetSource

PROJECT = "backdoor_harness"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------
# Plugins of the benchmark matrix
# --------------------------------------------------------------------------


@hookspec
def harness_attacks() -> list[type["Attack"]]:
    """Return the attack classes this plugin provides.

    Each class subclasses :class:`backdoor_harness.Attack`, has unique
    ``name``, a ``version``, a one-line ``summary``, the ``paper`` it
    implements and a pydantic ``Config`` with ``extra="forbid"``.

    :return: a list of ``Attack`` subclasses (may be empty).
    """


@hookspec
def harness_defenses() -> list[type["Defense"]]:
    """Return the defense (purification) classes this plugin provides.

    Each class subclasses :class:`backdoor_harness.Defense`. It declares what
    it needs from the defender's side (``needs``, e.g. ``{"oracle_trigger"}``)
    and which model families it supports (``families``); the scheduler records
    cells it cannot run as skipped, with the reason.

    :return: a list of ``Defense`` subclasses (may be empty).
    """


@hookspec
def harness_evaluators() -> list[type["Evaluator"]]:
    """Return the evaluator classes this plugin provides.

    Each class subclasses :class:`backdoor_harness.Evaluator` and lists the
    metrics it produces (``metrics``: name -> :class:`Metric`, which says
    whether higher is better).

    :return: a list of ``Evaluator`` subclasses (may be empty).
    """


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


@hookspec
def harness_datasets() -> list[type["DatasetSource"]]:
    """Return the data-set sources this plugin provides.

    Each class subclasses :class:`backdoor_harness.data.DatasetSource`: it has
    a ``name``, a pydantic ``Config`` and ``load(config) -> (train, test)``
    returning uint8 :class:`ImageSet` tensors. Decoding is cached by the core.

    :return: a list of ``DatasetSource`` subclasses (may be empty).
    """
