"""The one trainer, shared by attacks, defenses and evaluators.

Data stays uint8 on the device; each batch is augmented there with the data
set's augmentation (random crop with zero padding, 4 pixels by default, and a
horizontal flip where the data set allows it: never for GTSRB; a recipe may
override either), stamped with the trigger when the attack stamps after
augmentation, then scaled to [0, 1]. bf16 autocast and
channels_last on CUDA. All randomness comes from one seeded CPU generator, so
CPU runs are deterministic for a seed.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Iterator, Literal, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .contracts import PoisonedSet, StepInfo
from .data import Augmentation, ImageSet
from .errors import HarnessError


class Recipe(BaseModel):
    """How to train (SGD + cosine, BackdoorBench's recipe by default).

    Attributes:
        epochs: passes over the training set.
        batch_size: images per step.
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        schedule: ``cosine`` (annealed to 0 over the epochs, stepped per epoch,
            as BackdoorBench), ``constant``, or ``triangle`` (per step: linear
            warm-up from 0 to ``lr`` over the first ``warmup`` of the steps,
            then linear decay to 0; the short-run schedule of fast CIFAR-10
            training such as airbench).
        warmup: with ``triangle``, the fraction of the steps spent warming up.
        nesterov: Nesterov momentum.
        label_smoothing: cross-entropy label smoothing of the plain training
            step (not of an attack's or defense's own ``loss_fn``).
        augment: augment the training images at all. With ``true`` each batch gets
            the data set's augmentation (its ``augmentation``: random crop with
            4-pixel padding + horizontal flip for CIFAR; crop only for GTSRB,
            whose mirrored signs are other signs), with ``crop_padding`` and
            ``hflip`` below overriding it; ``false``: none.
        crop_padding: the random crop's zero padding in pixels (0: no crop);
            ``None`` (default): the data set's.
        hflip: random horizontal flips on (``true``) or off (``false``) whatever
            the data set says; ``None`` (default): the data set's. E.g.
            ``hflip: false`` trains CIFAR-10 without flips, ``hflip: true``
            flips GTSRB.
        sam_rho: radius of sharpness-aware minimization (0: plain SGD). Each
            step then takes the gradient at w + e, e the ascent step of radius
            ``sam_rho`` (Foret et al., ICLR 2021). Paper 002's adaptive attack
            (§4.4) trains the backdoored model this way with radii 1.0-3.0.
        sam_adaptive: ASAM's scale-invariant ascent (Kwon et al., ICML 2021;
            e = rho T^2 g / ||T g||, T = |w| + 0.01), the SAM variant whose
            radii are in paper 002's 1.0-3.0 range; ``false`` is plain SAM.
        lr_scale: scale ``lr`` with the batch size: ``lr`` is then the rate at
            ``lr_ref_batch`` images per step, and training uses
            :attr:`effective_lr`: ``lr * batch_size / lr_ref_batch`` with
            ``linear`` (the linear scaling rule of Goyal et al., 2017),
            ``lr * sqrt(batch_size / lr_ref_batch)`` with ``sqrt``. ``None``
            (default): ``lr`` as given, whatever the batch size.
        lr_ref_batch: with ``lr_scale``, the batch size ``lr`` is meant for.
    """

    #: every number finite: an infinite or NaN lr, weight decay, ... is refused when the matrix is read
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    epochs: int = Field(default=100, gt=0)
    batch_size: int = Field(default=128, gt=0)
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    schedule: Literal["cosine", "constant", "triangle"] = "cosine"
    warmup: float = Field(default=0.2, gt=0, lt=1)
    nesterov: bool = False
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    augment: bool = True
    crop_padding: int | None = Field(default=None, ge=0)
    hflip: bool | None = None
    sam_rho: float = Field(default=0.0, ge=0)
    sam_adaptive: bool = True
    lr_scale: Literal["linear", "sqrt"] | None = None
    lr_ref_batch: int = Field(default=128, gt=0)

    @property
    def effective_lr(self) -> float:
        """The learning rate training starts from (the peak of ``triangle``): ``lr``, scaled
        to ``batch_size`` when ``lr_scale`` is set (see the class docstring)."""
        ratio = self.batch_size / self.lr_ref_batch
        return {None: self.lr, "linear": self.lr * ratio, "sqrt": self.lr * math.sqrt(ratio)}[self.lr_scale]

    @classmethod
    def tuning(cls, config: Any, **overrides: Any) -> "Recipe":
        """The recipe of a plugin's own training, from its config: every field of ``config``
        (a pydantic model, e.g. a plugin's ``Config``, or a mapping) named like a recipe field
        (``epochs``, ``lr``, ``batch_size``, ``momentum``, ``weight_decay``, ``schedule``,
        ``augment``, ...), then ``overrides`` over them; the rest keep the recipe's defaults.

        A config field of another name, or one the recipe must not take, goes through
        ``overrides``: ``Recipe.tuning(cfg, epochs=cfg.tune_epochs, schedule="constant")``.
        Other config fields (a defense's thresholds, ...) are ignored.

        Raises:
            HarnessError: an override that is not a recipe field.
        """
        unknown = sorted(set(overrides) - set(cls.model_fields))
        if unknown:
            raise HarnessError(f"Recipe.tuning: {', '.join(map(repr, unknown))} is not a recipe field; "
                               f"recipe fields: {', '.join(cls.model_fields)}")
        if isinstance(config, BaseModel):
            present = {k: getattr(config, k) for k in type(config).model_fields if k in cls.model_fields}
        elif isinstance(config, Mapping):
            present = {k: v for k, v in config.items() if k in cls.model_fields}
        else:
            raise HarnessError(f"Recipe.tuning: a config is a pydantic model or a mapping, "
                               f"got {type(config).__name__}")
        return cls(**{**present, **overrides})

    def payload(self) -> dict:
        """What enters a job key: fields added after CORE_VERSION 2 only when they differ
        from their defaults (``warmup`` only with ``triangle``; ``crop_padding`` and
        ``hflip`` only when set; ``lr_scale`` and ``lr_ref_batch`` only with ``lr_scale``),
        so existing results keep their keys. A data set's own augmentation enters its jobs'
        keys through the data set plugin's ``version``."""
        out = self.model_dump()
        if not self.sam_rho:
            out.pop("sam_rho"), out.pop("sam_adaptive")
        if self.schedule != "triangle":
            out.pop("warmup")
        for name in ("nesterov", "label_smoothing"):
            if not out[name]:
                out.pop(name)
        for name in ("crop_padding", "hflip"):
            if out[name] is None:
                out.pop(name)
        if self.lr_scale is None:
            out.pop("lr_scale"), out.pop("lr_ref_batch")
        return out

    def augmentation_for(self, dataset: Augmentation | None) -> Augmentation | None:
        """The augmentation this recipe applies to a data set whose own is ``dataset``
        (``None``: unknown, i.e. :class:`Augmentation`'s default): that one with this
        recipe's ``crop_padding`` / ``hflip`` over it; ``None`` when it does nothing
        (``augment: false``, or neither crop nor flip)."""
        if not self.augment:
            return None
        base = dataset if dataset is not None else Augmentation()
        chosen = {k: v for k, v in (("crop_padding", self.crop_padding), ("hflip", self.hflip)) if v is not None}
        out = base.model_copy(update=chosen) if chosen else base
        return out if out.active else None

    def lr_factor(self, step: int, total: int) -> float:
        """The ``triangle`` schedule's multiplier of ``lr`` at optimizer step ``step`` of ``total``."""
        top = max(1, round(self.warmup * total))
        return (step + 1) / top if step < top else max(0.0, (total - step) / max(1, total - top))


#: Named recipes. ``backdoorbench`` is the paper-scale CIFAR-10 recipe;
#: ``cpu-quick`` trains the tiny CNN in seconds (quickstart and tests).
RECIPES: dict[str, Recipe] = {
    "backdoorbench": Recipe(),
    "cpu-quick": Recipe(epochs=6, batch_size=128, lr=0.05),
}


def resolve_recipe(value: Any) -> Recipe:
    """A recipe from a name (``RECIPES``), or a dict with an optional ``base`` name."""
    if isinstance(value, Recipe):
        return value
    if isinstance(value, str):
        if value not in RECIPES:
            raise HarnessError(f"unknown recipe {value!r}; named recipes: {', '.join(RECIPES)}")
        return RECIPES[value]
    if isinstance(value, dict):
        value = dict(value)
        base = resolve_recipe(value.pop("base", "backdoorbench"))
        return Recipe(**{**base.model_dump(), **value})
    raise HarnessError(f"a recipe is a name ({', '.join(RECIPES)}) or a mapping, got {value!r}")


#: the ``torch.compile`` modes ``fit`` takes (``harness run --compile MODE``, ``HARNESS_COMPILE=MODE``)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value: str | bool | None) -> str | None:
    """The ``torch.compile`` mode a setting names, ``None`` for no compilation.

    ``None``, ``False``, ``""`` and ``"0"``: off; ``True`` and ``"1"``: ``"default"``; a name
    of :data:`COMPILE_MODES`: that mode. It reads ``harness run --compile [MODE]`` and the
    ``HARNESS_COMPILE`` environment variable that passes it on to workers and Ray actors.

    Raises:
        HarnessError: anything else, naming the modes.
    """
    if value is None or value is False or value in ("", "0"):
        return None
    if value is True or value == "1":
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise HarnessError(f"unknown torch.compile mode {value!r} (harness run --compile MODE, HARNESS_COMPILE=MODE); "
                       f"modes: {', '.join(COMPILE_MODES)}; 1 means default, 0 or nothing means off")


def export_compile_mode(value: str | bool | None) -> str | None:
    """Train every job of this process, and of the workers and Ray actors it starts (they inherit
    the environment), in the ``torch.compile`` mode ``value`` names (:func:`compile_mode`; ``None``:
    not compiled): sets ``HARNESS_COMPILE``, the default mode as ``1``, the value it always had.
    Returns the mode; HarnessError for a bad one, before anything is set."""
    mode = compile_mode(value)
    os.environ["HARNESS_COMPILE"] = {None: "0", "default": "1"}.get(mode, mode)
    return mode


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int = 4
              ) -> torch.Tensor:
    """Crop each image of a zero-padded batch at offsets (``dy``, ``dx``) and mirror it where
    ``flip``, in one gather. ``dy``, ``dx``, ``flip``: ``[B]``, on ``x``'s device."""
    b, _, h, w = x.shape
    dev = x.device
    rows = dy[:, None] + torch.arange(h, device=dev)
    cols = dx[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    padded = F.pad(x, (pad, pad, pad, pad))
    out = padded[torch.arange(b, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def draw_crop_flip(n: int, generator: torch.Generator, pad: int = 4, hflip: bool = True
                   ) -> tuple[torch.Tensor, ...]:
    """The random offsets and flips of ``n`` images, drawn on the CPU in this order: ``dy``,
    ``dx`` (uniform in ``[0, 2 pad]``; none drawn and all 0 when ``pad`` is 0), then the flips
    (each with probability 1/2; none drawn and all ``False`` without ``hflip``)."""
    if pad:
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    else:
        dy = dx = torch.zeros(n, dtype=torch.int64)
    flip = torch.rand(n, generator=generator) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool)
    return dy, dx, flip


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4, hflip: bool = True
                     ) -> torch.Tensor:
    """Random crop of a zero-padded batch plus (``hflip``) random horizontal flip, in one gather.

    Args:
        x: uint8 ``[B, C, H, W]`` on any device.
        generator: CPU generator (the offsets are drawn on the CPU, then moved).
        pad, hflip: the augmentation, e.g. a data set's ``augmentation.crop_padding``
            and ``augmentation.hflip`` (see :func:`augment_batch`).
    """
    dy, dx, flip = draw_crop_flip(len(x), generator, pad, hflip)
    return crop_flip(x, dy.to(x.device), dx.to(x.device), flip.to(x.device), pad)


def augment_batch(x: torch.Tensor, generator: torch.Generator, augmentation: Augmentation | None
                  ) -> torch.Tensor:
    """``x`` (uint8 ``[B, C, H, W]``) with ``augmentation`` applied (a data set's, e.g.
    ``ctx.reserve.augmentation``; ``None``: :class:`Augmentation`'s default, crop 4 + flip)."""
    aug = augmentation if augmentation is not None else Augmentation()
    if not aug.active:
        return x
    return random_crop_flip(x, generator, aug.crop_padding, aug.hflip)


def shuffled_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                     device: torch.device | None = None, augment: bool = True, floats: bool = True,
                     augmentation: Augmentation | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over uint8 ``images`` in shuffled mini-batches, with their ``labels``: the loop of
    defenses that train on the reserve outside :func:`fit`.

    Draws one ``randperm`` from ``generator``, then each batch's crop and flip (``augment``):
    the data set's ``augmentation`` (pass ``reserve.augmentation``; ``None``: crop 4 + flip).
    Batches are on ``device`` (default: the images' own), as [0, 1] floats (``floats``) or uint8.
    """
    device = device if device is not None else images.device
    perm = torch.randperm(len(images), generator=generator)
    for i in range(0, len(images), batch_size):
        idx = perm[i:i + batch_size]
        xb = images[idx.to(images.device)].to(device)
        if augment:
            xb = augment_batch(xb, generator, augmentation)
        yield (to_float(xb, False) if floats else xb), labels[idx.to(labels.device)].to(device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``; to CUDA through pinned memory, without waiting for the GPU."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_float(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = x.float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class _Progress:
    """A one-line progress meter with images/s on stderr (only on a terminal)."""

    def __init__(self, desc: str, total: int, enabled: bool):
        self.desc, self.total, self.done, self.t0 = desc, total, 0, time.perf_counter()
        self.enabled = enabled and sys.stderr.isatty()
        self._last = 0.0

    def update(self, n: int, loss: float | None = None) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.5 or self.done >= self.total):
            self._last = now
            rate = self.done / max(now - self.t0, 1e-9)
            extra = f" loss {loss:.3f}" if loss is not None else ""
            sys.stderr.write(f"\r  {self.desc}: {100 * self.done / self.total:5.1f}% {rate:8.0f} img/s{extra}   ")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


@torch.no_grad()
def sam_ascent(params: list[torch.Tensor], rho: float, adaptive: bool, eta: float = 0.01
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Move ``params`` (with gradients) to w + e, SAM's ascent point; returns
    (params moved, e) so the caller can move them back.

    SAM: e = rho g / ||g||. ASAM: e = rho T^2 g / ||T g||, T = |w| + eta. One
    global norm over all tensors.
    """
    moved = [p for p in params if p.grad is not None]
    grads = [p.grad.float() for p in moved]
    if adaptive:
        scale = [p.abs() + eta for p in moved]
        norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scale, grads)))
        e = [t * t * g * (rho / (norm + 1e-12)) for t, g in zip(scale, grads)]
    else:
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        e = [g * (rho / (norm + 1e-12)) for g in grads]
    torch._foreach_add_(moved, e)
    return moved, e


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, StepInfo], torch.Tensor]
#: ``on_epoch(epoch, loss) -> False to stop`` (see :func:`fit`)
EpochCallback = Callable[[int, float], "bool | None"]


def fit(model: nn.Module, data: ImageSet | PoisonedSet, recipe: Recipe, *, device: torch.device,
        generator: torch.Generator, loss_fn: LossFn | None = None, desc: str = "train",
        progress: bool = True, after_step: Callable[[nn.Module], None] | None = None,
        compile: bool | str = False, augmentation: Augmentation | None = None,
        on_epoch: EpochCallback | None = None) -> dict[str, float]:
    """Train ``model`` in place on ``data`` with ``recipe``.

    Args:
        model: a model taking [0, 1] float images.
        data: clean images (``ImageSet``) or an attacker's ``PoisonedSet``;
            with ``stamp="after_augment"`` the trigger is stamped onto the
            poisoned samples of every augmented batch.
        recipe: optimizer (at ``recipe.effective_lr``: ``lr`` scaled to the batch
            size when the recipe says so), schedule, and whether and how to augment:
            its ``crop_padding`` / ``hflip`` override the data set's augmentation.
        device: where to train; data is moved there once.
        generator: seeded CPU generator: shuffling and augmentation.
        loss_fn: replaces cross-entropy (training-controlled attacks,
            defenses with a penalty).
        desc: label of the progress meter.
        after_step: called with the model after every optimizer step
            (projections, masks), under ``torch.no_grad``.
        compile: run the forward pass through ``torch.compile`` (the plain
            cross-entropy step only: not with ``loss_fn`` or SAM): ``True`` or a
            mode of :data:`COMPILE_MODES` (see :func:`compile_mode`; ``True`` is
            ``"default"``; ``reduce-overhead`` and ``max-autotune`` add CUDA
            graphs). Compiled code is cached per model class and input shape in
            the process.
        augmentation: the data set's augmentation (the runner passes the one of
            the cell's data set); default: ``data.augmentation`` when ``data``
            carries one (an ``ImageSet`` loaded from a source, or a subset of
            one such as the defender's reserve), else crop 4 + flip.
        on_epoch: called after every epoch (after its last ``after_step`` and the
            epoch's learning-rate step) as ``on_epoch(epoch, loss)``: ``epoch`` the
            index of the epoch just finished (0-based, as :class:`StepInfo`'s),
            ``loss`` its last step's loss as a float. It may evaluate the model
            (the next epoch puts it back in train mode). Returning ``False`` (not
            merely falsy: ``None`` goes on) stops training there, e.g. early
            stopping on a validation loss; nothing more is then drawn from
            ``generator``.

    The shuffling and augmentation of an epoch are drawn at its start (on the
    CPU generator) and moved to the device at once, and the poisoned positions
    of every batch are known on the CPU, so the step loop never waits for the
    device.

    Returns:
        ``{"images_per_s", "wall_s", "final_loss"}`` (over the epochs run, fewer than the
        recipe's when ``on_epoch`` stopped training), and on CUDA ``peak_mem_mib``: the
        peak of memory allocated by torch on the device while it trained (MiB, an int;
        the allocator's peak is reset when training starts); the model is left in eval mode.
    """
    mode = compile_mode(compile)
    if len(data.labels) == 0:
        raise HarnessError(f"{desc}: the training set is empty")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    model.train()
    images, labels = data.images.to(device), data.labels.to(device)
    aug = recipe.augmentation_for(augmentation if augmentation is not None
                                  else getattr(data, "augmentation", None))  # None: no augmentation
    stamp_fn = getattr(data, "stamp_fn", None) if getattr(data, "stamp", None) == "after_augment" else None
    n, bs = len(labels), recipe.batch_size
    steps = math.ceil(n / bs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=recipe.effective_lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay, nesterov=recipe.nesterov and recipe.momentum > 0,
                          **({"fused": True} if cuda else {}))
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs)
             if recipe.schedule == "cosine" else None)
    per_step = (torch.optim.lr_scheduler.LambdaLR(opt, lambda t: recipe.lr_factor(t, recipe.epochs * steps))
                if recipe.schedule == "triangle" else None)
    compiled = mode is not None and loss_fn is None and not recipe.sam_rho
    forward = torch.compile(model, mode=mode) if compiled else model
    graphs = compiled and mode in ("reduce-overhead", "max-autotune")  # CUDA graphs: one step is one replay
    bar = _Progress(desc, recipe.epochs * n, progress)
    t0 = time.perf_counter()
    loss = torch.zeros((), device=device)
    num_classes = int(getattr(model, "num_classes", None) or labels.max().item() + 1)
    epochs_run = 0
    for epoch in range(recipe.epochs):
        perm_cpu = torch.randperm(n, generator=generator)
        draws = [perm_cpu]
        if aug is not None:
            draws += draw_crop_flip(n, generator, aug.crop_padding, aug.hflip)
        perm, *draws_dev = to_device(torch.stack([d.long() for d in draws]), device).unbind(0)
        if stamp_fn is not None:  # the epoch's poisoned positions, and where each batch's share starts
            hits = data.poison_mask.cpu()[perm_cpu].nonzero().squeeze(1)
            bounds = torch.searchsorted(hits, torch.arange(steps + 1) * bs).tolist()
            hits = to_device(hits, device)
        for i in range(steps):
            idx = perm[i * bs:(i + 1) * bs]
            xb, yb = images[idx], labels[idx]
            if aug is not None:
                dy, dx, flip = (a[i * bs:(i + 1) * bs] for a in draws_dev)
                xb = crop_flip(xb, dy, dx, flip.bool(), aug.crop_padding)
            if stamp_fn is not None and bounds[i + 1] > bounds[i]:
                at = hits[bounds[i]:bounds[i + 1]] - i * bs
                xb[at] = stamp_fn(xb[at])
            xf = to_float(xb, cuda)
            info = StepInfo(epoch, epoch * steps + i, num_classes, generator)
            if graphs:  # a new step: the graphs' outputs of the last one may be overwritten
                torch.compiler.cudagraph_mark_step_begin()

            def step_loss() -> torch.Tensor:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    if loss_fn is not None:
                        return loss_fn(model, xf, yb, info)
                    return F.cross_entropy(forward(xf), yb, label_smoothing=recipe.label_smoothing)

            loss = step_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.sam_rho:
                ascent = sam_ascent(params, recipe.sam_rho, recipe.sam_adaptive)
                opt.zero_grad(set_to_none=True)
                step_loss().backward()  # the gradient at w + e updates w
                with torch.no_grad():
                    torch._foreach_sub_(ascent[0], ascent[1])
            opt.step()
            if per_step is not None:
                per_step.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step(model)
            bar.update(len(idx), None)
        if sched is not None:
            sched.step()
        epochs_run += 1
        if on_epoch is not None:
            if on_epoch(epoch, float(loss.detach())) is False:
                break
            model.train()
    model.eval()  # a trained model is handed on for inference; BN statistics stay as trained
    wall = time.perf_counter() - t0
    final = float(loss.detach())
    if not math.isfinite(final):
        raise HarnessError(f"{desc}: training diverged (loss {final}); lower the recipe's lr")
    out = {"images_per_s": epochs_run * n / wall, "wall_s": wall, "final_loss": final}
    if cuda:
        out["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return out


def predict(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """Predicted classes (int64, CPU) of uint8 images, in eval mode, without autograd
    (``torch.inference_mode``; the tensor returned is an ordinary one, usable anywhere)."""
    cuda = device.type == "cuda"
    model.to(device).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            xb = to_float(to_device(images[i:i + batch_size], device), cuda)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out.append(model(xb).argmax(1))
    # concatenated outside inference mode: a normal tensor, not an inference tensor
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.int64)
