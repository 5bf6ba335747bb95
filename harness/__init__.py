"""backdoor-harness: a benchmark harness for backdoor attacks and purification defenses.

The public API, timm-style: ``create_attack / create_defense / create_evaluator``
and ``list_attacks / list_defenses / list_evaluators``; plugins implement the
hooks of :mod:`backdoor_harness.hookspecs` with ``@hookimpl``.
"""

__version__ = "0.1.0"

from .contracts import (AllToAllConfig, Attack, AttackConfig, Defense, DefenseContext, EvalContext, Evaluator,
                        Metric, PluginConfig, PoisonedSet, PrepareContext, Purified, StepInfo)
from .data import DatasetSource, ImageSet
from .errors import HarnessError
from .hookspecs import hookimpl
from .registry import (create_attack, create_dataset, create_defense, create_evaluator, get_plugin_manager,
                       list_attacks, list_datasets, list_defenses, list_evaluators)

__all__ = [
    "AllToAllConfig", "Attack", "AttackConfig", "DatasetSource", "Defense", "DefenseContext", "EvalContext",
    "Evaluator", "HarnessError", "ImageSet", "Metric", "PluginConfig", "PoisonedSet", "PrepareContext", "Purified", "StepInfo",
    "create_attack", "create_dataset", "create_defense", "create_evaluator", "get_plugin_manager", "hookimpl", "list_attacks",
    "list_datasets", "list_defenses", "list_evaluators", "__version__",
]
