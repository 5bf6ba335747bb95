"""Grad-Prune: prune the conv filters with the largest unlearning-loss gradient, then fine-tune.

Paper: Dunnett, Arablouei, Miller, Dedeoglu and Jurdak, "Unlearning Backdoor
Attacks through Gradient-Based Model Pruning", arXiv:2405.03918, 2024 (paper
003, §IV); authors' code ``WhoDunnett/Grad-Prune`` (``grad-prune.py``, a
BackdoorBench defense; facts in shared/reference/algorithms.md §5).

Algorithm (a backdoor input x~ is paired with every clean image x, labelled
with x's TRUE label y; "conv filters" are the output filters of every Conv2d
that runs in the feature extractor, timm's ``forward_features``):
1. copy the attacked model f; split the reserve per class into training and
   validation parts (``ctx.split(val_ratio)``, paper 003's rule); build x~ for
   both parts (see "Trigger source" below);
2. on validation: A0 = clean accuracy, L* = backdoor loss = mean CE(f(x~), y);
   the best model is the unpruned one;
3. prune while A0 - A < ``accuracy_threshold`` and the backdoor loss has
   improved within the last ``pruning_patience`` rounds:
   a. with f in eval mode, accumulate over the training part the gradient of
      the unlearning loss L = mean CE(f(x~), y) (paper eq. 2, up to a scale);
   b. score each conv filter i of layer l by xi_{l,i} = mean |grad| over its
      weights (in_channels x kh x kw; eq. 3);
   c. prune the global arg-max of xi over all layers and all filters not yet
      pruned (no per-layer normalisation): zero the filter's weights and bias,
      and the weight and bias of its BatchNorm channel when a BatchNorm
      normalises exactly that conv's output;
   d. re-evaluate on validation: A, L. If L < L* and A0 - A <
      ``accuracy_threshold``, the pruned model is the new best (L* = L) and
      the patience count restarts; otherwise it grows by one;
4. go back to the best pruned model (the first k pruned filters);
5. fine-tune it (SGD ``lr``, ``momentum``, ``weight_decay``, constant, batch
   ``batch_size``, no augmentation, train mode): each step one optimizer step
   on CE(f(x), y) + CE(f(x~), y) over a batch of pairs; the pruned filters
   are re-zeroed after every step; after each epoch, the model with the
   lowest clean CE on validation is kept (the pruned model is the first
   candidate); stop after ``tuning_patience`` epochs without improvement;
6. return the best fine-tuned model (eval mode).

Trigger source (``trigger``):
- ``"oracle"`` (the default; what the authors' code does): x~ is the attack's
  own training trigger, ``ctx.attack.apply_trigger(x, train=True)`` (the code
  reads BackdoorBench's ``bd_train_all``, the training set with the real
  trigger); the defense then declares ``needs = {"oracle_trigger"}``.
- ``"inverted"`` (what the paper assumes, §III-C: "the defender can
  synthesize backdoor inputs using any relevant state-of-the-art synthesis
  approach"): x~ = G(x), G trained by one round of BTI-DBF's trigger
  inversion (:func:`backdoor_harness.plugins.defenses.btidbf.invert_triggers`,
  with its settings, inherited below, including its generator options:
  the authors' U-Net with a soft bound and 50 pre-training epochs by
  default, ``generator: small`` for the fast one) on the training part of
  the reserve; no oracle needed. Version 2 took BTI-DBF's new default
  generator, so ``inverted`` results differ from version 1's.
The default is ``oracle`` because every number the paper reports (Tables I,
II) was produced that way, and the harness's defaults reproduce the papers'
settings; that is an upper bound on what a defender can do. ``inverted`` is
the honest threat model, for comparing against trigger-free defenses; its
quality then also depends on BTI-DBF's inversion.

Defaults (CIFAR-10, the code's ``cifar10.yaml``, algorithms.md §5,
unless noted): validation ratio 0.1; accuracy threshold 0.1 (an ABSOLUTE drop
of validation accuracy, 10 points); pruning and tuning patience 10; SGD lr
0.001, momentum 0.9, weight decay 5e-4, no schedule; batch 128; no
augmentation. The defender's data is the harness's reserve: its default (5%
of the training set) or paper 003's samples-per-class protocol through the
data set option ``reserve_per_class`` (SPC 2, 10, 100: 1+1, 9+1, 90+10 per
class after ``ctx.split``). ``max_prune_steps`` (1000) and ``tune_epochs``
(100) are caps of ours (the code's loops only end by the threshold or the
patience). The inversion settings are BTI-DBF's (paper 000's: 20 decoupling
and 30 generator epochs, norm bound 0.3); ``batch_size`` is shared by the
inversion and Grad-Prune (128 in both).

Departures (from the authors' code; none changes the paper's algorithm):
- Pruned filters are MASKED: they are re-zeroed after every fine-tuning step
  (the code only zeroes them once, so fine-tuning can regrow them), and a
  pruned filter is never selected again (the code can re-select a zeroed
  filter whose gradient is not zero, e.g. a conv with no BatchNorm after it).
- What is zeroed with a filter: its bias, and the BatchNorm channel that
  normalises exactly its output (``layers.conv_norm_pairs``, kept only where
  a forward pass shows that the BatchNorm's input IS the conv's output; this
  drops the approximate pre-activation pairs, where the next block's norm
  normalises conv + shortcut). The code zeroes index k of "the next
  registered parameter" (the bias, a BatchNorm weight, or in the
  bias-free PreActResNet a shortcut filter or the next block's bn1 weight).
- DenseNet: a dense layer's new channels (its ``conv2``) reach the later
  layers through a concatenation, normalized there by each reader's own
  ``norm1``; no BatchNorm takes exactly that conv's output, so pruning such a
  filter zeroes the filter only (every reader's BN then sees a zero channel
  and outputs its constant shift, as for a PreAct block's ``conv2`` whose
  next BN also normalizes the shortcut). The bottleneck ``conv1`` and the stem
  conv have their exact BN (``norm2``, ``norm0``). The code's "next
  registered parameter" rule would zero a channel of the NEXT layer's
  ``norm1`` that belongs to the block's input, not to the pruned filter.
  Version 2 declares DenseNet (version 1 skipped it; the bump makes its
  skipped cells run).
- Families: vision transformers are not declared: the only Conv2d a ViT runs
  is its patch embedding, so "the conv filters" would be the patch
  projection alone, not the paper's pruning of a CNN's convolutional layers.
- Conv filters are those run by ``forward_features``: 1x1/7x7 convs that act
  as dense layers on pooled features in timm's heads (VGG's ``pre_logits``,
  MobileNetV3's ``conv_head``) are not scored, as the BackdoorBench models'
  Linear heads are not; the paper prunes "convolutional layers" only.
- Gradient scoring runs entirely in eval mode (BatchNorm running statistics,
  no dropout, no buffer updates), in fp32: the model is scored as it is
  validated and deployed. The code puts the model in train mode for the
  first training batch only (and so also moves its BN running statistics).
- Losses are means over whole sets (the scoring gradient: eq. 2 divided by
  N; the validation losses: mean CE). The code sums per-batch means over a
  shuffled loader, which differs only when a set spans several batches.
- Fine-tuning runs through the harness's ``fit`` (on CUDA: bf16 autocast,
  channels_last); the code trains in fp32. x~ is recomputed per batch from
  the clean batch (the same uint8 images as the precomputed ones).
- SPC: ``reserve_per_class`` draws spc images per class, so SPC 2 gives 1
  training + 1 validation image per class, as the paper states (§V-B); the
  code draws spc + 1 when spc * val_ratio < 1 (SPC 2: 2 + 1). SPC 10 and 100
  agree (9 + 1, 90 + 10).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from backdoor_harness.plugins.defenses.btidbf import InversionConfig, invert_triggers
from backdoor_harness.toolkit import (CONV_FAMILIES, Defense, HarnessError, ImageSet, Purified, Recipe, capture,
                                      conv_norm_pairs, features, hookimpl, to_float, unwrap)

__all__ = ["FilterMask", "GradPrune", "GradPruneConfig", "PruneResult", "exact_conv_norm_pairs",
           "feature_convs", "filter_scores", "prune_loop", "select_filter"]

_BN = nn.modules.batchnorm._BatchNorm


class GradPruneConfig(InversionConfig):
    """Attributes:
        trigger: where the backdoor inputs come from: ``oracle`` (the attack's
            trigger, as the authors' code) or ``inverted`` (BTI-DBF's inverted
            trigger, as the paper assumes).
        val_ratio: share of each class's reserve images held out for validation.
        accuracy_threshold: largest allowed ABSOLUTE drop of validation clean
            accuracy while pruning (0.1 = 10 points).
        pruning_patience: pruning rounds without a better validation backdoor
            loss before pruning stops.
        max_prune_steps: cap on the number of filters pruned (ours; 0: no pruning).
        tuning_patience: fine-tuning epochs without a better validation clean
            CE before fine-tuning stops.
        tune_epochs: cap on the fine-tuning epochs (ours; 0: no fine-tuning).
        lr: SGD learning rate of the fine-tuning (constant).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        batch_size: images per step (pairs of clean and backdoor images when
            fine-tuning; also BTI-DBF's inversion batch).
        (and BTI-DBF's inversion settings, used with ``trigger: inverted``)
    """

    trigger: Literal["oracle", "inverted"] = "oracle"
    val_ratio: float = Field(default=0.1, gt=0, lt=1)
    accuracy_threshold: float = Field(default=0.1, gt=0, le=1)
    pruning_patience: int = Field(default=10, gt=0)
    max_prune_steps: int = Field(default=1000, ge=0)
    tuning_patience: int = Field(default=10, gt=0)
    tune_epochs: int = Field(default=100, ge=0)
    lr: float = Field(default=0.001, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)


# --------------------------------------------------------------------------
# Conv filters, their BatchNorm channels, and the mask
# --------------------------------------------------------------------------


def _dataflow(model: nn.Module, sample: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One eval-mode pass of ``features`` over float ``sample``: conv name -> its
    output, BatchNorm name -> its input (first call of each module)."""
    probed = [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, (nn.Conv2d, _BN))]
    with capture(model, probed) as cap, torch.no_grad():
        features(model, sample)
    first = cap.first().values()
    outputs = {c.name: c.output for c in first if isinstance(c.module, nn.Conv2d)}
    inputs = {c.name: c.args[0] for c in first if isinstance(c.module, _BN)}
    return outputs, inputs


def exact_conv_norm_pairs(model: nn.Module, sample: torch.Tensor) -> dict[str, str]:
    """conv name -> BatchNorm name, for the pairs of ``layers.conv_norm_pairs``
    whose BatchNorm takes exactly that conv's output as its input (checked on
    one forward pass of ``sample``, float [0, 1] images)."""
    outputs, inputs = _dataflow(model, sample)
    names = {id(m): n for n, m in unwrap(model).named_modules()}
    pairs = {}
    for conv_name, _conv, bn in conv_norm_pairs(model):
        bn_name = names[id(bn)]
        if conv_name in outputs and inputs.get(bn_name) is outputs[conv_name]:
            pairs[conv_name] = bn_name
    return pairs


@dataclass(frozen=True)
class Layer:
    """A prunable conv: its module name and that of its exact BatchNorm (or None)."""

    conv: str
    norm: str | None
    filters: int


def feature_convs(model: nn.Module, sample: torch.Tensor) -> list[Layer]:
    """Every Conv2d that runs in ``forward_features`` (module order) with its exact BatchNorm."""
    outputs, _ = _dataflow(model, sample)
    pairs = exact_conv_norm_pairs(model, sample)
    return [Layer(n, pairs.get(n), m.out_channels) for n, m in unwrap(model).named_modules()
            if isinstance(m, nn.Conv2d) and n in outputs and m.weight.requires_grad]


@dataclass
class FilterMask:
    """The pruned filters, in pruning order, as (layer index, filter index).

    :meth:`apply` zeroes each one in a model of the same architecture: the
    conv's output filter and bias, and its BatchNorm channel's weight and bias.
    """

    layers: list[Layer]
    pruned: list[tuple[int, int]] = field(default_factory=list)

    def prefix(self, k: int) -> "FilterMask":
        return FilterMask(self.layers, self.pruned[:k])

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        if not self.pruned:
            return
        modules = dict(unwrap(model).named_modules())
        for i, k in self.pruned:
            layer = self.layers[i]
            conv = modules[layer.conv]
            conv.weight[k] = 0
            if conv.bias is not None:
                conv.bias[k] = 0
            if layer.norm is not None:
                norm = modules[layer.norm]
                norm.weight[k] = 0
                if norm.bias is not None:
                    norm.bias[k] = 0


# --------------------------------------------------------------------------
# Scoring, selection and the pruning loop
# --------------------------------------------------------------------------


def filter_scores(model: nn.Module, layers: list[Layer], images: torch.Tensor, labels: torch.Tensor,
                  batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """xi per filter, one tensor per layer: mean |dL/dW| over each output filter's
    weights, L = mean CE(f(images), labels) over the whole set, f in eval mode, fp32.

    ``images`` are uint8 (the backdoor inputs), ``labels`` their true labels.
    """
    model.eval()
    modules = dict(unwrap(model).named_modules())
    weights = [modules[layer.conv].weight for layer in layers]
    total = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    n = len(labels)
    for i in range(0, n, batch_size):
        x = to_float(images[i:i + batch_size].to(device), False)
        y = labels[i:i + batch_size].to(device)
        loss = F.cross_entropy(model(x).float(), y, reduction="sum") / n
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for t, g in zip(total, grads):
            if g is not None:
                t.add_(g.float())
    return [t.abs().flatten(1).mean(1) for t in total]


def select_filter(scores: list[torch.Tensor], pruned: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The global arg-max (layer, filter) of ``scores`` over the filters not in
    ``pruned`` (first one on ties, in layer then filter order); None if none is left."""
    flat = torch.cat([s.detach().float().cpu() for s in scores]) if scores else torch.zeros(0)
    offsets = [0]
    for s in scores:
        offsets.append(offsets[-1] + len(s))
    for i, k in pruned:
        flat[offsets[i] + k] = -math.inf
    if len(flat) == 0 or len(pruned) >= len(flat):
        return None
    j = int(torch.argmax(flat))
    layer = max(i for i in range(len(scores)) if offsets[i] <= j)
    return layer, j - offsets[layer]


@dataclass
class PruneResult:
    """What the pruning loop did.

    Attributes:
        steps: filters pruned in all.
        best: filters pruned in the best model (0: the unpruned one).
        history: (validation accuracy, validation backdoor loss) before
            pruning and after each step.
        stop: why it stopped: ``accuracy``, ``patience``, ``max_steps`` or ``exhausted``.
    """

    steps: int
    best: int
    history: list[tuple[float, float]]
    stop: str


def prune_loop(evaluate: Callable[[], tuple[float, float]], prune_next: Callable[[], bool],
               threshold: float, patience: int, max_steps: int) -> PruneResult:
    """Step 2-3's control: ``evaluate()`` -> (validation accuracy, backdoor loss)
    of the current model; ``prune_next()`` prunes one more filter (False when
    none is left). Pruning goes on while the accuracy drop from the unpruned
    model is below ``threshold`` and the backdoor loss improved within the last
    ``patience`` steps; a step is the new best when its loss is lower than the
    best so far and its drop is below ``threshold``."""
    acc0, best_loss = evaluate()
    history = [(acc0, best_loss)]
    acc, best, wait, steps = acc0, 0, 0, 0
    while True:
        if not acc0 - acc < threshold:
            stop = "accuracy"
            break
        if wait >= patience:
            stop = "patience"
            break
        if steps >= max_steps:
            stop = "max_steps"
            break
        if not prune_next():
            stop = "exhausted"
            break
        steps += 1
        acc, loss = evaluate()
        history.append((acc, loss))
        if loss < best_loss and acc0 - acc < threshold:
            best_loss, best, wait = loss, steps, 0
        else:
            wait += 1
    return PruneResult(steps, best, history, stop)


# --------------------------------------------------------------------------
# The defense
# --------------------------------------------------------------------------


@torch.no_grad()
def _validate(model: nn.Module, clean: torch.Tensor, backdoor: torch.Tensor | None, labels: torch.Tensor,
              batch_size: int, device: torch.device) -> tuple[float, float, float]:
    """(clean accuracy, mean clean CE, mean backdoor CE at the true labels) in eval mode, fp32."""
    was_training = model.training
    model.eval()
    correct, clean_ce, bd_ce, n = 0, 0.0, 0.0, len(labels)
    for i in range(0, n, batch_size):
        y = labels[i:i + batch_size].to(device)
        logits = model(to_float(clean[i:i + batch_size].to(device), False)).float()
        correct += int((logits.argmax(1) == y).sum())
        clean_ce += float(F.cross_entropy(logits, y, reduction="sum"))
        if backdoor is not None:
            logits_b = model(to_float(backdoor[i:i + batch_size].to(device), False)).float()
            bd_ce += float(F.cross_entropy(logits_b, y, reduction="sum"))
    model.train(was_training)
    return correct / n, clean_ce / n, bd_ce / n


class GradPrune(Defense):
    """Grad-Prune. ``purify``'s report says what it did:
    {"pruned": [(conv name, filter), ...] kept in the returned model,
    "tried": filters pruned in all, "stop": why pruning stopped,
    "history": [(val acc, val backdoor CE), ...], "tune_epochs": epochs run,
    "tune_best_epoch": the epoch kept (0: the pruned model), "val_ce": its
    validation clean CE}."""

    name = "gradprune"
    version = "2"
    summary = "Grad-Prune: prune conv filters by |grad| of CE(triggered, true label), then fine-tune with patience"
    paper = ("Dunnett et al., Unlearning Backdoor Attacks through Gradient-Based Model Pruning, "
             "arXiv:2405.03918, 2024 (github.com/WhoDunnett/Grad-Prune)")
    Config = GradPruneConfig
    families = CONV_FAMILIES

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"oracle_trigger"}) if self.config.trigger == "oracle" else frozenset()

    # -- the backdoor inputs ---------------------------------------------------

    def trigger_fn(self, model: nn.Module, train: ImageSet, ctx) -> Callable[[torch.Tensor], torch.Tensor]:
        """uint8 images -> their backdoor versions (uint8, same device)."""
        if self.config.trigger == "oracle":
            if ctx.attack is None:
                raise HarnessError("gradprune with trigger 'oracle' needs the attack (ctx.attack); "
                                   "set trigger: inverted to synthesize backdoor inputs instead")
            attack = ctx.attack
            return lambda u: attack.apply_trigger(u, train=True)
        generator = invert_triggers(model, train, self.config, ctx)

        def inverted(u: torch.Tensor) -> torch.Tensor:
            with torch.autocast(ctx.device.type, enabled=False):
                return generator.poison(u)
        return inverted

    # -- the two phases ------------------------------------------------------------

    def prune(self, model: nn.Module, train: ImageSet, val: ImageSet, stamp: Callable, ctx
              ) -> tuple[FilterMask, PruneResult]:
        """Steps 2-4 on ``model`` (in place): returns the mask of the best pruned
        model, which ``model`` is left as."""
        cfg, dev = self.config, ctx.device
        x_train, y_train = train.images.to(dev), train.labels.to(dev)
        bd_train = stamp(x_train)
        x_val, y_val = val.images.to(dev), val.labels.to(dev)
        bd_val = stamp(x_val)
        layers = feature_convs(model, to_float(x_val[:2], False))
        if not layers:
            raise HarnessError(f"gradprune: {type(unwrap(model)).__name__} has no conv filters in forward_features")
        mask = FilterMask(layers)

        def evaluate() -> tuple[float, float]:
            acc, _, bd = _validate(model, x_val, bd_val, y_val, cfg.batch_size, dev)
            return acc, bd

        def prune_next() -> bool:
            scores = filter_scores(model, layers, bd_train, y_train, cfg.batch_size, dev)
            chosen = select_filter(scores, mask.pruned)
            if chosen is None:
                return False
            mask.pruned.append(chosen)
            FilterMask(layers, [chosen]).apply(model)
            return True

        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result = prune_loop(evaluate, prune_next, cfg.accuracy_threshold, cfg.pruning_patience,
                            cfg.max_prune_steps)
        # back to the best: the unpruned weights with the first `best` filters zeroed
        model.load_state_dict(state)
        best = mask.prefix(result.best)
        best.apply(model)
        model.eval()
        return best, result

    def tune(self, model: nn.Module, mask: FilterMask, train: ImageSet, val: ImageSet, stamp: Callable, ctx
             ) -> tuple[int, int, float]:
        """Step 5 on ``model`` (in place, left as the best epoch's model):
        returns (epochs run, best epoch, its validation clean CE)."""
        cfg, dev = self.config, ctx.device
        x_val, y_val = val.images.to(dev), val.labels.to(dev)
        _, best_ce, _ = _validate(model, x_val, None, y_val, cfg.batch_size, dev)
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if cfg.tune_epochs == 0:
            return 0, 0, best_ce
        track = {"epoch": 0, "best": 0, "wait": 0, "ce": best_ce}

        def loss_fn(m, x, y, _step):
            with torch.no_grad(), torch.autocast(dev.type, enabled=False):
                u = x.float().mul(255).round_().to(torch.uint8)  # the trainer's floats are uint8 / 255
                xb = to_float(stamp(u), x.is_cuda)
            return F.cross_entropy(m(x), y) + F.cross_entropy(m(xb), y)

        def on_epoch(epoch: int, _loss: float) -> bool:
            """Keep the best epoch by validation clean CE; stop once the patience is spent."""
            track["epoch"] = epoch + 1
            _, ce, _ = _validate(model, x_val, None, y_val, cfg.batch_size, dev)
            if ce < track["ce"]:
                track.update(ce=ce, best=track["epoch"], wait=0)
                best_state.update({k: v.detach().clone() for k, v in model.state_dict().items()})
            else:
                track["wait"] += 1
            return track["wait"] < cfg.tuning_patience

        recipe = Recipe.tuning(cfg, epochs=cfg.tune_epochs, schedule="constant", augment=False)
        ctx.fit(model, train, recipe, device=dev, generator=ctx.generator, loss_fn=loss_fn, after_step=mask.apply,
                on_epoch=on_epoch, desc="gradprune tune")
        model.load_state_dict(best_state)
        model.eval()
        return track["epoch"], track["best"], track["ce"]

    def purify(self, model, ctx):
        model = copy.deepcopy(model).to(ctx.device).eval()
        cfg = self.config
        train, val = ctx.split(cfg.val_ratio)
        if len(train) == 0 or len(val) == 0:
            raise HarnessError(f"gradprune: the reserve gave {len(train)} training and {len(val)} validation "
                               "images; it needs at least 2 images per class")
        stamp = self.trigger_fn(model, train, ctx)
        mask, result = self.prune(model, train, val, stamp, ctx)
        epochs, best_epoch, val_ce = self.tune(model, mask, train, val, stamp, ctx)
        report = {
            "pruned": [(mask.layers[i].conv, k) for i, k in mask.pruned],
            "tried": result.steps,
            "stop": result.stop,
            "history": result.history,
            "tune_epochs": epochs,
            "tune_best_epoch": best_epoch,
            "val_ce": val_ce,
        }
        return Purified(model, report)


@hookimpl
def harness_defenses():
    return [GradPrune]
