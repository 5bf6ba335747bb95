"""The three plugin contracts (Attack, Defense, Evaluator) and their contexts.

Images are uint8 tensors ``[N, 3, H, W]`` in pixel space everywhere; triggers
work on them directly. Models take float images in ``[0, 1]`` (normalization
is a layer inside the model, see :mod:`backdoor_harness.models`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, NamedTuple

import torch
from pydantic import Field

from .data import ImageSet, validation_split
from .plugin import Plugin, PluginConfig
from .store import Metric


# --------------------------------------------------------------------------
# Attacks
# --------------------------------------------------------------------------


@dataclass
class PoisonedSet:
    """A training set as the attacker hands it over.

    Attributes:
        images: uint8 ``[N, 3, H, W]``. With ``stamp="before_augment"`` the
            trigger is already in the pixels of the poisoned samples.
        labels: int64 ``[N]``, already flipped to the target for poisoned samples.
        poison_mask: bool ``[N]``, which samples the attack poisoned.
        stamp: when the trigger is applied. ``"after_augment"`` means the
            trainer stamps ``stamp_fn`` onto the masked samples of every
            augmented batch.
        stamp_fn: the trigger, for ``after_augment``.
        source: optional int64 ``[N]``, the index of each row in the set it
            was drawn from (set by :meth:`Attack.poisoned_samples`, so the
            original labels are ``train.labels[source]``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    poison_mask: torch.Tensor
    stamp: Literal["before_augment", "after_augment"] = "before_augment"
    stamp_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    source: torch.Tensor | None = None

    @property
    def poison_indices(self) -> torch.Tensor:
        return self.poison_mask.nonzero().flatten()

    def triggered_images(self) -> torch.Tensor:
        """The images with the trigger in the pixels of every poisoned sample,
        whichever ``stamp`` says (``after_augment`` samples get ``stamp_fn``
        now, without augmentation); the set itself is not modified."""
        if self.stamp == "before_augment" or not bool(self.poison_mask.any()):
            return self.images
        images = self.images.clone()
        idx = self.poison_indices
        images[idx] = self.stamp_fn(images[idx])
        return images


class AttackConfig(PluginConfig):
    """Settings shared by every attack.

    Attributes:
        target: the target class (all-to-one), at least 0 and below the data set's class
            count (checked when the matrix is validated if the data set's source knows its
            class count, else when the training job starts).
        poison_rate: fraction of the *whole* training set that is poisoned
            (BackdoorBench's convention), in [0, 1].
        stamp: ``before_augment`` stamps the trigger into the stored pixels,
            so random crop/flip move it (the data-poisoning threat model and
            BackdoorBench's convention; the default, and what paper-scale
            configs use). ``after_augment`` stamps it after augmentation, which
            short CPU runs need to learn the backdoor in a few epochs.
    """

    target: int = Field(default=0, ge=0)
    poison_rate: float = Field(default=0.1, ge=0, le=1, allow_inf_nan=False)
    stamp: Literal["before_augment", "after_augment"] = "before_augment"


class AllToAllConfig(AttackConfig):
    """For attacks whose paper defines an all-to-all variant.

    Attributes:
        mode: ``all2one`` (every triggered image -> ``target``) or ``all2all``
            (class c -> (c + 1) mod C, the BadNets paper's all-to-all attack;
            ``target`` is then unused and every test image counts for ASR).
    """

    mode: Literal["all2one", "all2all"] = "all2one"


class Attack(Plugin):
    """A backdoor attack.

    Data-poisoning attacks (``training_controlled = False``) only implement
    :meth:`apply_trigger` (and, if they need it, :meth:`target_labels`,
    :meth:`select_poison`). Training-controlled attacks set
    ``training_controlled = True`` and implement :meth:`training_loss`, which
    the shared trainer calls in place of plain cross-entropy.
    """

    kind = "attack"
    Config = AttackConfig
    training_controlled: ClassVar[bool] = False
    #: poisons only target-class samples and keeps their labels (SIG, LC); see :meth:`select_poison`
    clean_label: ClassVar[bool] = False
    #: Whether the attack's trigger is the reference one. ``None``: it is the
    #: paper's or BackdoorBench's trigger (the same pattern, or the same
    #: generation rule and settings). Otherwise a short, non-empty phrase saying
    #: what replaces the reference trigger, e.g. ``"own StegaStamp-style
    #: encoder, not BackdoorBench's pre-encoded images"``. The leaderboard never
    #: shows a paper's published number beside an attack whose ``substitute``
    #: is set. A class attribute, or a property where the config decides (read
    #: it on an instance: Blended's ``pattern: gaussian`` is paper 000's
    #: trigger, its default uniform noise is a substitute).
    substitute: ClassVar[str | None] = None

    # -- the trigger ---------------------------------------------------------

    def apply_trigger(self, images: torch.Tensor, *, train: bool = False) -> torch.Tensor:
        """Stamp the trigger on a batch of uint8 images (any device); returns uint8."""
        raise NotImplementedError

    def target_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The label a triggered image should be classified as: ``target``
        (all-to-one), or ``(c + 1) mod C`` when the config (an
        :class:`AllToAllConfig`) says ``mode: all2all``."""
        if getattr(self.config, "mode", "all2one") == "all2all":
            return (labels + 1) % num_classes
        return torch.full_like(labels, self.config.target)

    def test_mask(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Which test images count for ASR/robust accuracy: those whose true
        class differs from their target (BackdoorBench's convention)."""
        return self.target_labels(labels, num_classes) != labels

    # -- poisoning the training set -----------------------------------------

    def select_poison(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Indices to poison: ``round(rate * N)`` drawn uniformly from all samples, or, for a
        ``clean_label`` attack, from the target class only (all of it, with a warning naming the
        rate reached, when the class is too small)."""
        n = len(labels)
        count = round(self.config.poison_rate * n)
        if not self.clean_label:
            return torch.randperm(n, generator=generator)[:count]
        pool = (labels == self.config.target).nonzero().flatten()
        if count > len(pool):
            warnings.warn(
                f"{self.name}: poison_rate {self.config.poison_rate} asks for {count} images but the target class "
                f"{self.config.target} has only {len(pool)}; poisoning all of them "
                f"(poison rate reached: {len(pool) / max(n, 1):.4f})", UserWarning, stacklevel=2)
            count = len(pool)
        return pool[torch.randperm(len(pool), generator=generator)[:count]]

    def stamped(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> PoisonedSet:
        """``images`` with the training trigger on the samples ``index``, stamped
        when ``config.stamp`` says (now, or by the trainer after augmentation).
        ``labels`` are kept as given (poisoning flips them first; EP does not)."""
        mask = torch.zeros(len(labels), dtype=torch.bool)
        mask[index] = True
        stamp_fn = None
        if self.config.stamp == "before_augment":
            images = images.clone()
            if len(index):
                images[index] = self.apply_trigger(images[index], train=True)
        else:
            stamp_fn = lambda x: self.apply_trigger(x, train=True)  # noqa: E731
        return PoisonedSet(images, labels, mask, self.config.stamp, stamp_fn)

    def poison(self, train: ImageSet, generator: torch.Generator) -> PoisonedSet:
        """Return the poisoned training set (the input is never modified)."""
        idx = self.select_poison(train.labels, generator)
        labels = train.labels.clone()
        labels[idx] = self.target_labels(train.labels[idx], train.num_classes)
        return self.stamped(train.images, labels, idx)

    def poisoned_samples(self, train: ImageSet, count: int, generator: torch.Generator, *,
                         flipped_only: bool = False) -> PoisonedSet:
        """``count`` poisoned training samples as this attack makes them, for attacks on a
        trained model that reuse the attacker's poisoned data (the Retuning Attack, QRA).

        Data-poisoning attacks: a uniform draw (without replacement, from ``generator``)
        of ``count`` of the samples that ``poison(train, generator)`` poisons, with their
        poisoned pixels and labels. So a dirty-label attack gives stamped images
        relabelled to their target (target-class originals included, when the attack
        poisons those), and a clean-label attack gives target-class images (with any
        pixel change its ``poison`` makes, e.g. LC's adversarial perturbation) and the
        trigger, at their own label. An attack that overrides :meth:`poison` is
        followed automatically (its ``poison`` runs on the whole set; with the default
        ``poison`` only the drawn samples are stamped, with the same result).
        ``flipped_only`` keeps only samples whose poisoned label differs from their
        true label (none, for a clean-label attack).

        Training-controlled attacks have no poisoned training set: ``count`` training
        images whose label the trigger changes (:meth:`test_mask`), drawn uniformly,
        with the training trigger and their target labels (``flipped_only`` changes
        nothing).

        Returns a :class:`PoisonedSet` of those samples only (fewer than ``count`` when
        the attack poisons fewer): every row is poisoned; the trigger is in the pixels
        or in ``stamp_fn`` as ``config.stamp`` says (:meth:`PoisonedSet.triggered_images`
        gives the pixels either way); ``source`` holds each row's index in ``train``.
        ``train`` is not modified.
        """
        if count <= 0:  # nothing to stamp (and no poisoning to run)
            pick = torch.zeros(0, dtype=torch.int64)
            out = self.stamped(train.images[pick], train.labels[pick], pick)
        elif self.training_controlled:
            pool = self.test_mask(train.labels, train.num_classes).nonzero().flatten()
            pick = pool[torch.randperm(len(pool), generator=generator)[:count]]
            labels = self.target_labels(train.labels[pick], train.num_classes)
            out = self.stamped(train.images[pick], labels, torch.arange(len(pick)))
        else:
            with warnings.catch_warnings():  # a too small class was already reported when the model was poisoned
                warnings.simplefilter("ignore", UserWarning)
                if type(self).poison is Attack.poison:  # the default poisoning: stamp only the drawn samples
                    pool = self.select_poison(train.labels, generator).sort().values
                    full = None
                else:  # an attack's own poisoning: run it, then draw
                    full = self.poison(train, generator)
                    pool = full.poison_indices
            poisoned_labels = (self.target_labels(train.labels[pool], train.num_classes) if full is None
                               else full.labels[pool])
            if flipped_only:
                keep = poisoned_labels != train.labels[pool]
                pool, poisoned_labels = pool[keep], poisoned_labels[keep]
            order = torch.randperm(len(pool), generator=generator)[:count]
            pick = pool[order]
            if full is None:
                out = self.stamped(train.images[pick], poisoned_labels[order], torch.arange(len(pick)))
            else:
                out = PoisonedSet(full.images[pick], full.labels[pick], torch.ones(len(pick), dtype=torch.bool),
                                  full.stamp, full.stamp_fn)
        out.source = pick.to(torch.int64)
        return out

    def poison_test(self, test: ImageSet) -> ImageSet:
        """The poisoned test set: eligible images stamped, labelled with their target.

        ``meta["true_labels"]`` keeps the original labels (for robust accuracy), and
        ``meta["index"]`` (int64) each image's index in ``test``: the kept predictions of an
        evaluation (:mod:`backdoor_harness.predictions`) name their images by it. An attack that
        overrides this method should set both.
        """
        keep = self.test_mask(test.labels, test.num_classes)
        images = self.apply_trigger(test.images[keep], train=False)
        true = test.labels[keep]
        return ImageSet(images, self.target_labels(true, test.num_classes), test.classes,
                        meta={"true_labels": true, "index": keep.nonzero().flatten()})

    # -- generated resources and learned state -----------------------------------

    #: ``prepare`` needs the clean reference model of the cell's data set, model
    #: and seed (a surrogate for adversarial perturbations); then the prepare job
    #: is per model, otherwise it is shared by every model of a data set.
    prepare_needs_clean_model: ClassVar[bool] = False

    @classmethod
    def prepares(cls) -> bool:
        """Whether the attack generates resources before poisoning (it overrides :meth:`prepare`)."""
        return cls.prepare is not Attack.prepare

    def prepare(self, ctx: "PrepareContext") -> None:
        """Generate what the attack needs (a pattern, an encoder, adversarial
        images) from the clean training set, deterministically from
        ``ctx.generator``, and keep it as tensors in :meth:`state_dict`.

        Runs once per (data set, [model,] seed, attack config) as a job of the
        DAG; its state is cached by content hash and loaded into the attack of
        every job that uses it. Never download anything here.
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors the attack generated or learned (``prepare``, or a training-
        controlled attack's generator); saved with the model and restored by
        :meth:`load_state_dict` before the attack is used again."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise NotImplementedError(f"attack {self.name!r} got state {sorted(state)} but does not load any")

    # -- training-controlled attacks ------------------------------------------

    def training_loss(self, model: torch.nn.Module, images: torch.Tensor,
                      labels: torch.Tensor, step: "StepInfo") -> torch.Tensor:
        """Loss of one training step (float images in [0, 1], augmented).

        Only for ``training_controlled`` attacks; the trainer calls it instead
        of cross-entropy and backpropagates the result.
        """
        raise NotImplementedError


@dataclass
class StepInfo:
    """Where the trainer is, for training-controlled attacks."""

    epoch: int
    step: int
    num_classes: int
    generator: torch.Generator


@dataclass
class PrepareContext:
    """What an attack's ``prepare`` sees.

    Attributes:
        train: the clean training set of the cell.
        device: where to compute.
        generator: seeded CPU generator; the only source of randomness.
        seed: the cell's seed.
        fit: the shared trainer (``fit(model, data, recipe, ...)``).
        clean_model: the clean reference model (eval mode), when the attack
            sets ``prepare_needs_clean_model``.
    """

    train: ImageSet
    device: torch.device
    generator: torch.Generator
    seed: int
    fit: Callable[..., Any]
    clean_model: torch.nn.Module | None = None


# --------------------------------------------------------------------------
# Defenses
# --------------------------------------------------------------------------


@dataclass
class DefenseContext:
    """What a defender has.

    Attributes:
        reserve: the defender's clean data (default 5% of the training set).
        num_classes: number of classes.
        device: where to compute.
        generator: seeded CPU generator; the only source of randomness.
        seed: the cell's seed.
        family: the model family (``resnet``, ``vgg``, ...), see ``models.model_family``.
        fit: the shared trainer, ``fit(model, train_set, recipe, ...)``.
        attack: the attack, only for defenses that declare ``oracle_trigger``.
    """

    reserve: ImageSet
    num_classes: int
    device: torch.device
    generator: torch.Generator
    seed: int
    family: str
    fit: Callable[..., Any]
    attack: Attack | None = None

    def split(self, fraction: float = 0.1) -> tuple[ImageSet, ImageSet]:
        """(train, validation) parts of the reserve, for defenses that validate.

        Paper 003's protocol: per class, ``max(1, round(fraction * n))`` samples
        go to validation (10% by default; with 2 samples per class, one each).
        Draws from ``generator``.
        """
        train, val = validation_split(self.reserve.labels, fraction, self.generator)
        return self.reserve.subset(train), self.reserve.subset(val)


class Purified(NamedTuple):
    """What :meth:`Defense.purify` returns.

    Attributes:
        model: the purified model (a copy: the model the defense was given is never modified).
        report: what the defense found or did (flagged classes, pruned channels, ...), stored in
            the purify record as ``metrics["report"]`` (tensors and arrays become lists); empty
            when it has nothing to report.
    """

    model: torch.nn.Module
    report: dict[str, Any] = {}


class Defense(Plugin):
    """A purification defense: ``purify(model, ctx) -> Purified(model, report)``.

    ``purify`` must not modify the model it is given (copy it first), and must
    be deterministic for a seed on CPU. The harness checks both what it returns
    (a :class:`Purified` holding a ``torch.nn.Module``) and that the model it
    was given is unchanged; either failing fails the cell.

    Attributes:
        needs: what beyond clean reserve data it requires; ``"oracle_trigger"``
            gives it ``ctx.attack`` (an oracle: leaderboards show it, never rank it).
        families: model families it supports, or ``{"*"}`` for any.
        baseline: it returns the model as it is (the undefended reference row:
            leaderboards show it first and never rank it; its ASR checks that the
            attack works).
    """

    kind = "defense"
    needs: ClassVar[frozenset[str]] = frozenset()
    families: ClassVar[frozenset[str]] = frozenset({"*"})
    baseline: ClassVar[bool] = False

    def supports(self, family: str) -> bool:
        return "*" in self.families or family in self.families

    def purify(self, model: torch.nn.Module, ctx: DefenseContext) -> Purified:
        raise NotImplementedError


# --------------------------------------------------------------------------
# Evaluators
# --------------------------------------------------------------------------


@dataclass
class EvalContext:
    """What an evaluator sees.

    Attributes:
        backdoored: the attacked model (eval mode, on ``device``).
        purified: the defended model.
        clean_test: the clean test set.
        poisoned_test: the attack's poisoned test set (``meta["true_labels"]``;
            ``meta["index"]``: each image's index in ``clean_test``).
        attack: the attack.
        device: where to compute.
        predict: ``predict(role, split) -> int64 predictions``, one per image of the
            split, in its order. ``role`` is ``"backdoored"``, ``"purified"`` or
            ``"clean"`` (the clean reference model: evaluators that set
            ``needs_clean_model``); ``split`` is ``"clean"`` or ``"poisoned"``.
            Computed once per (model checkpoint, test images, trigger) and kept in the
            work directory (:mod:`backdoor_harness.predictions`), so every evaluator of
            every cell and every later run that needs the same predictions shares one
            forward pass; the evaluation's record names the files it read. Each call
            returns a fresh tensor (changing it changes nothing else).
        clean_model: the clean reference model, when the evaluator asked for it.
        defended: name -> the same attacked model purified by another defense,
            for each defense the evaluator asked for in ``needs_defenses``.
        train: the clean training set of the cell (attacks re-poison from it).
        reserve: the defender's clean reserve of the cell.
        seed: the cell's seed; ``generator`` is seeded with it.
        fit: the shared trainer (as in :class:`DefenseContext`).
        extra: free room for later evaluators.
    """

    backdoored: torch.nn.Module
    purified: torch.nn.Module
    clean_test: ImageSet
    poisoned_test: ImageSet
    attack: Attack
    device: torch.device
    predict: Callable[[str, str], torch.Tensor]
    clean_model: torch.nn.Module | None = None
    defended: dict[str, torch.nn.Module] = field(default_factory=dict)
    train: ImageSet | None = None
    reserve: ImageSet | None = None
    seed: int = 0
    generator: torch.Generator | None = None
    fit: Callable[..., Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Evaluator(Plugin):
    """Computes named metrics of one purified model.

    ``evaluate`` returns a mapping of declared metric names to finite numbers (a
    list of them for a ``curve`` metric), each inside its metric's ``range`` when
    one is declared; the harness checks this before the evaluation is marked
    done, and anything else fails the cell. A declared metric may be left out
    (one the config turns off, or that has no value in this cell).

    Attributes:
        metrics: name -> :class:`Metric` for every key ``evaluate`` returns.
        needs_clean_model: ask the scheduler for the clean reference model
            (a class attribute, or a property when the config decides)
            (one training job per data set, model and seed, shared by all).
        needs_defenses: ``{"name", "config"}`` mappings of other defenses
            whose purified model of the same attacked model the evaluator
            uses (``ctx.defended[name]``); the scheduler adds those purify
            jobs, shared with the matrix's own rows when the configs agree.
    """

    kind = "evaluator"
    metrics: ClassVar[dict[str, Metric]] = {}
    needs_clean_model: ClassVar[bool] = False
    needs_defenses: ClassVar[tuple[dict, ...]] = ()

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        raise NotImplementedError
