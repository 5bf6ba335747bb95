"""Everything a plugin module needs, in one import: ``from backdoor_harness.toolkit import ...``.

Built-in plugins and third-party packages alike import only this module from the harness
(a plugin may also import another plugin's module, e.g. a shared trigger inverter). What
is here is the plugin API; the rest of the core may change without notice.

- the contracts: :class:`Attack`, :class:`Defense`, :class:`Evaluator` (and
  :class:`DatasetSource`), their configs and contexts, :class:`Metric`,
  :class:`Purified`, and ``hookimpl`` to register them;
- training: :class:`Recipe` (``Recipe.tuning(config, **overrides)``: a plugin's own training
  recipe from its config's fields), :func:`fit` (the shared trainer; ``on_epoch`` to watch or
  stop it after each epoch) and its batch helpers;
- the metric definitions (:mod:`backdoor_harness.metrics`);
- model surgery: the layers of timm and CIFAR models (:mod:`backdoor_harness.layers`),
  :func:`capture` (record modules' forward calls, hooks removed and train/eval modes restored
  on exit) and :func:`eval_mode`, and the model-family sets for a defense's ``families``
  (:data:`CONV_FAMILIES`, :data:`BATCHNORM_FAMILIES`, :data:`SPATIAL_FAMILIES`);
- data-set sources: the data roots and cache, and readers of image folders and archives;
- other plugins by name (``create_defense`` ...), e.g. a defense an evaluator compares against;
- :class:`HarnessError` for bad input.
"""

from .contracts import (AllToAllConfig, Attack, AttackConfig, Defense, DefenseContext, EvalContext, Evaluator,
                        Metric, PoisonedSet, PrepareContext, Purified, StepInfo)
from .data import (Augmentation, DatasetSource, ImageSet, SourceConfig, cache_dir, data_roots, from_torchvision,
                   read_imagefolder, read_imagefolder_archive, split_from_files)
from .errors import HarnessError
from .hookspecs import hookimpl
from .layers import (BATCHNORM_FAMILIES, CONV_FAMILIES, SPATIAL_FAMILIES, Call, Capture, ConvNormLink, capture,
                     classifier, conv_norm_links, conv_norm_pairs, eval_mode, features, head, norm_layers, unwrap)
from .metrics import accuracy, attack_success_rate, defense_effectiveness_rate, robust_accuracy, score
from .plugin import Plugin, PluginConfig
from .registry import create_attack, create_defense, create_evaluator
from .train import EpochCallback, LossFn, Recipe, augment_batch, fit, predict, shuffled_batches, to_float

__all__ = [
    # data-set sources: where data lives and how image folders and archives are read
    "cache_dir", "data_roots", "from_torchvision", "read_imagefolder", "read_imagefolder_archive", "split_from_files",
    "AllToAllConfig", "Attack", "AttackConfig", "Augmentation", "ConvNormLink", "DatasetSource", "Defense",
    "DefenseContext", "EvalContext", "Evaluator", "HarnessError", "ImageSet", "Metric", "Plugin", "PluginConfig",
    "PoisonedSet", "PrepareContext", "Purified", "Recipe", "SourceConfig", "StepInfo", "accuracy",
    "attack_success_rate", "augment_batch", "classifier", "conv_norm_links", "conv_norm_pairs",
    "defense_effectiveness_rate", "features", "fit", "head", "hookimpl", "norm_layers", "predict",
    "robust_accuracy", "score", "shuffled_batches", "to_float", "unwrap",
    # plugin-author helpers: model families, forward-call capture, the trainer's callback types
    "BATCHNORM_FAMILIES", "CONV_FAMILIES", "SPATIAL_FAMILIES", "Call", "Capture", "EpochCallback", "LossFn",
    "capture", "eval_mode",
    # other plugins, by registry name
    "create_attack", "create_defense", "create_evaluator",
]
