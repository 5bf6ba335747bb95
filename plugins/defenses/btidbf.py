"""BTI-DBF(U): backdoor trigger inversion by decoupling benign features, then unlearning.

Paper: Xu et al., "Towards Reliable and Efficient Backdoor Trigger Inversion via
Decoupling Benign Features", ICLR 2024, the unlearning variant BTI-DBF(U);
authors' code ``xuxiong0214/BTIDBF`` (``pretrain.py``, ``btidbfu.py``; facts in
shared/reference/algorithms.md §3), with the settings paper 000 uses for its
"BTI" baseline (Appendix B.2: 20 decoupling and 30 generator iterations, norm
bound 0.3). The classifier is split as f = g(phi(x)): phi is the last feature
map (timm's ``forward_features``), g the rest (``forward_head``).

Algorithm:
1. copy the attacked model f; build the trigger generator G (``generator``,
   see below) and pre-train it towards the identity for ``pretrain_epochs``
   epochs (Adam, ``generator_lr``, f in eval mode) with the code's loss
   CE(softmax(f(x)), softmax(f(G(x)))) + MSE(phi(x), phi(G(x))) + w * L_n,
   w = 100 while L_n > 0.1, else 0.01 (L_n: the pixel MSE below; the CE term
   is the code's, which feeds the softmax outputs as logits and as soft target);
2. for each of ``rounds`` rounds:
   a. decouple benign features, on a copy of the current f in train mode:
      learn a mask m = tanh(theta) / (2 + 1e-7) + 0.5 (theta ~ N(0, 1), the
      shape of one sample's feature map) for ``mask_epochs`` epochs (Adam,
      ``mask_lr``) minimising CE(g(m * phi(x)), y) - CE(g((1 - m) * phi(x)), y):
      m keeps the features that carry the clean prediction, 1 - m the rest;
   b. train G for ``generator_epochs`` epochs (a new Adam, ``generator_lr``,
      kept across rounds; the copy in eval mode) with
      L_b = MSE(m * phi(x), m * phi(G(x))), L_bd = MSE((1 - m) * phi(x),
      (1 - m) * phi(G(x))) and L_n = MSE(x, G(x)) in the model's normalised
      pixel space: the loss is L_n when L_n > ``norm_bound`` or
      L_b > ``feat_bound`` (the SOFT bound: G is pulled back), else
      -L_bd + ``benign_weight`` * L_b (G keeps the benign features and moves
      the others); from round 2 on, + CE(f(G(x)), t) (:func:`switched_loss`);
   c. in round 1, detect the target t: the class f predicts most often on
      G(x + ``detect_noise`` * N(0, 1)) over the reserve;
   d. unlearn for ``epochs`` epochs (Adam, ``lr``, all parameters, train
      mode): in every batch, replace int(``poison_fraction`` * B + 1) random
      images x by G(x), keeping their true labels; loss
      CE(f(x_mixed), y) + ``feature_weight`` * MSE(phi(x), phi(x_mixed));
3. return f.
Batches are shuffled and augmented (random crop + flip), as the code's loader.

Generators (``generator``; both work in the model's normalised space z):
- ``unet`` (the default; the code's): a 4-level U-Net, encoder blocks of
  widths w, 2w, 4w, 8w (w = ``generator_width``, default 32) of
  (3x3 conv -> InstanceNorm(affine) -> LeakyReLU(0.01)) x 2 with 2x2 max-pool
  between, a bottleneck block of 16w, a decoder of (3x3 ConvTranspose, stride
  2, output_padding 1 -> LeakyReLU -> concat skip -> block) and a final 1x1
  conv to 3 channels, no output activation: G(x) = denormalise(U(z)). Image
  sides must be multiples of 16. It starts at PyTorch's default initialisation
  (far from the identity): the pre-training of step 1 brings it there.
- ``small`` (ours, for CPU runs): a residual two-level U-Net (widths w, 2w, 4w,
  default w = 16; the same blocks with LeakyReLU(0.2); nearest upsampling;
  any image size), G(x) = denormalise(z + d(z)), whose 1x1 output conv starts
  at ``generator_init`` times PyTorch's default, so G starts near the identity
  (mean(d ** 2) about 0.002 at 0.1) without pre-training. Near it, not at it:
  there both feature MSEs have zero gradient and G would never move.

Bounds (``bound``):
- ``soft`` (the default; the code's): only the loss switch of step 2b holds G
  near the images; generated images are not clipped (the code's are not).
- ``hard`` (ours): also, each image's perturbation d = z(G(x)) - z is scaled
  down to mean(d ** 2) <= ``norm_bound`` and G(x) is clamped to valid pixels
  [0, 1], so every generated image respects the bound by construction and
  the L_n branch of the switch only fires on L_b > ``feat_bound`` (or by
  rounding, when every image sits at the bound).
``generator: small, bound: hard, pretrain_epochs: 0`` is version 1 of this
plugin, exactly.

Defaults (CIFAR-10, the code's ``cfg.py``, ``pretrain.py`` and
``btidbfu.py``): batch 128; the U-Net of width 32, pre-trained 50 epochs
(Adam lr 1e-3); mask 20 epochs, Adam lr 0.01; generator 30 epochs, Adam lr
1e-3 (kept across rounds); soft bound, norm_bound 0.3 and feat_bound 3 (both
MSE values); benign weight 0.01; detection noise 0.03; 5 rounds of 30
unlearning epochs, Adam lr 1e-4; 10% + 1 generated images per batch;
feature-MSE weight 1.

Departures:
- Pre-training runs inside the defense, on the defender's reserve (the code's
  ``pretrain.py`` is a separate script over the same clean split), every time
  the defense runs.
- Normalised space: the model's own normalisation (the harness's wrapper,
  training-set statistics) rather than the code's fixed CIFAR constants.
- Generated images handed out as uint8 (:meth:`TriggerGenerator.poison`) are
  clamped to [0, 1] first, whatever the bound.
- Data: the harness's reserve (5% by default; the code's ``split.pth`` is also
  5%). The code's ``use_max_bd_feat`` and ``earlystop`` options (off by
  default) are not implemented.
- Fixed rounds and epochs: paper 000 runs BTI-DBF(U) "until the loss
  converges"; the defaults are the code's 5 rounds of 30 epochs.
- The ``small`` generator and the ``hard`` bound are ours (options; see above).
- On CUDA every pass runs under bf16 autocast (as the harness's ``fit``).
  Train mode also enables dropout (VGG's and MobileNet's heads), which draws
  from torch's global generator, as in ``fit``.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from backdoor_harness.toolkit import (Defense, HarnessError, ImageSet, PluginConfig, Purified, features, head, hookimpl,
                                      shuffled_batches, to_float)

__all__ = ["BTIDBF", "BTIDBFConfig", "InversionConfig", "SmallGenerator", "TriggerGenerator", "TriggerInverter",
           "UNetGenerator", "build_generator", "check_unet_size", "decouple_benign_features", "invert_triggers",
           "mix_inverted", "pretrain_generator", "switched_loss"]

#: the generator widths used when ``generator_width`` is not given
DEFAULT_WIDTH = {"unet": 32, "small": 16}
#: pre-training's pixel-MSE threshold and the weights of L_n above and below it (the code's pretrain.py)
PRETRAIN_THRESHOLD, PRETRAIN_PULL, PRETRAIN_KEEP = 0.1, 100.0, 0.01


class InversionConfig(PluginConfig):
    """BTI-DBF's trigger-inversion settings (shared with PAM and Grad-Prune).

    Attributes:
        batch_size: images per step (inversion and unlearning).
        generator: ``unet`` (the code's 4-level U-Net) or ``small`` (our
            residual two-level net, for CPU runs).
        bound: ``soft`` (the code's: the loss switches to L_n above the bound)
            or ``hard`` (also each image's perturbation scaled to the bound,
            images clamped to [0, 1]).
        pretrain_epochs: epochs of pre-training G towards the identity
            (``preround``), for either generator.
        mask_epochs: epochs of benign-feature decoupling per round (``mround``).
        mask_lr: Adam learning rate of the mask.
        generator_epochs: epochs of generator training per round (``uround``).
        generator_lr: Adam learning rate of the generator (``gen_lr``), also
            for pre-training.
        generator_width: channels of the generator's first block (doubled per
            level); default 32 for ``unet`` (the code's), 16 for ``small``.
        generator_init: ``small`` only: scale of its output conv at
            initialisation (times PyTorch's default): how close to the identity
            it starts.
        norm_bound: bound on the MSE between x and G(x), in the model's
            normalised pixel space (per batch; with ``hard`` also per image).
        feat_bound: bound on the MSE of the benign features (L_b).
        benign_weight: weight of L_b in the generator loss.
        detect_noise: std of the Gaussian noise (normalised space) added before
            G when detecting the target class.
    """

    batch_size: int = Field(default=128, gt=0)
    generator: Literal["unet", "small"] = "unet"
    bound: Literal["soft", "hard"] = "soft"
    pretrain_epochs: int = Field(default=50, ge=0)
    mask_epochs: int = Field(default=20, ge=0)
    mask_lr: float = Field(default=0.01, gt=0)
    generator_epochs: int = Field(default=30, ge=0)
    generator_lr: float = Field(default=1e-3, gt=0)
    generator_width: int | None = Field(default=None, gt=0)
    generator_init: float = Field(default=0.1, gt=0)
    norm_bound: float = Field(default=0.3, gt=0)
    feat_bound: float = Field(default=3.0, gt=0)
    benign_weight: float = Field(default=0.01, ge=0)
    detect_noise: float = Field(default=0.03, ge=0)

    @property
    def width(self) -> int:
        """The generator width in use: ``generator_width``, or the generator's default."""
        return self.generator_width if self.generator_width is not None else DEFAULT_WIDTH[self.generator]


# --------------------------------------------------------------------------
# The generators
# --------------------------------------------------------------------------

#: the U-Net's levels: image sides must be multiples of 2 ** UNET_LEVELS
UNET_LEVELS = 4


def _block(cin: int, cout: int, slope: float) -> nn.Sequential:
    """(3x3 conv -> InstanceNorm(affine) -> LeakyReLU) x 2."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout, affine=True),
                         nn.LeakyReLU(slope), nn.Conv2d(cout, cout, 3, padding=1),
                         nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(slope))


def check_unet_size(height: int, width: int, where: str = "BTI-DBF") -> None:
    """Raise :class:`HarnessError` unless both sides are multiples of 2 ** UNET_LEVELS."""
    k = 2 ** UNET_LEVELS
    if height % k or width % k:
        raise HarnessError(f"{where}: the U-Net trigger generator (generator: unet) needs image sides that are "
                           f"multiples of {k} ({UNET_LEVELS} poolings by 2), got {height}x{width}; set the "
                           f"defense's config to generator: small (any size) or use images of a multiple of {k}")


class UNetGenerator(nn.Module):
    """The code's U-Net on normalised images: [N, 3, H, W] -> [N, 3, H, W], H and W multiples of 16.

    Encoder blocks of widths w, 2w, 4w, 8w with 2x2 max-pool after each, a
    bottleneck block of 16w, then per level: 3x3 ConvTranspose (stride 2,
    output_padding 1, channels kept) -> LeakyReLU -> concat the skip -> block
    down to the skip's width; a final 1x1 conv to 3 channels; no output
    activation. Built on the meta device: initialise it (:func:`_initialise`).
    """

    def __init__(self, width: int = 32, levels: int = UNET_LEVELS):
        super().__init__()
        widths = [width * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList(_block(cin, c, 0.01) for cin, c in zip([3] + widths[:-1], widths))
        self.bottom = _block(widths[-1], 2 * widths[-1], 0.01)
        ups, merges, c = [], [], 2 * widths[-1]
        for skip in reversed(widths):
            ups.append(nn.ConvTranspose2d(c, c, 3, stride=2, padding=1, output_padding=1))
            merges.append(_block(c + skip, skip, 0.01))
            c = skip
        self.up, self.merge = nn.ModuleList(ups), nn.ModuleList(merges)
        self.out = nn.Conv2d(width, 3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        check_unet_size(*z.shape[-2:])
        skips, h = [], z
        for block in self.down:
            h = block(h)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        h = self.bottom(h)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            h = merge(torch.cat([F.leaky_relu(up(h), 0.01), skip], 1))
        return self.out(h)


class SmallGenerator(nn.Module):
    """Our residual two-level U-Net: [N, 3, H, W] -> a perturbation d of the same shape, any H, W.

    Blocks of widths w, 2w, 4w (LeakyReLU(0.2)), max-pool down, nearest
    upsampling, skips; a 1x1 output conv. Built on the meta device.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.mid = _block(3, w, 0.2), _block(w, 2 * w, 0.2), _block(2 * w, 4 * w, 0.2)
        self.dec2, self.dec1 = _block(6 * w, 2 * w, 0.2), _block(3 * w, w, 0.2)
        self.out = nn.Conv2d(w, 3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(z)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(m, size=e2.shape[-2:]), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:]), e1], 1))
        return self.out(d1)


@torch.no_grad()
def _initialise(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default initialisation, drawn from ``generator`` (not torch's global one):
    conv and transposed-conv weights and biases U(+-1/sqrt(fan_in)); InstanceNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            bound = 1 / math.sqrt(m.weight[0].numel())  # fan_in as torch computes it, for both kinds
            m.weight.copy_(torch.empty(m.weight.shape).uniform_(-bound, bound, generator=generator))
            m.bias.copy_(torch.empty(m.bias.shape).uniform_(-bound, bound, generator=generator))
        elif isinstance(m, nn.InstanceNorm2d):
            m.weight.fill_(1)
            m.bias.zero_()


class TriggerGenerator(nn.Module):
    """G on float [0, 1] images, working in the model's normalised space z = (x - mean) / std.

    ``kind="unet"``: G(x) = mean + std * U(z); ``kind="small"``: G(x) = x + std * d(z).
    ``bound="hard"``: each image's perturbation (normalised units) is scaled to
    mean(d ** 2) <= ``norm_bound`` and G(x) clamped to [0, 1]; ``"soft"``: neither.

    Args:
        mean, std: the model's normalisation (3 values each).
        generator: the seeded generator the weights are drawn from.
        kind, width, bound, norm_bound: see :class:`InversionConfig`.
        init_scale: ``small`` only: its output conv starts at this times PyTorch's default.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, *,
                 kind: Literal["unet", "small"] = "unet", width: int | None = None,
                 bound: Literal["soft", "hard"] = "soft", norm_bound: float = 0.3, init_scale: float = 0.1):
        super().__init__()
        if kind not in DEFAULT_WIDTH or bound not in ("soft", "hard"):
            raise HarnessError(f"BTI-DBF: unknown generator {kind!r} or bound {bound!r}; "
                               "use generator: unet | small and bound: soft | hard")
        width = width if width is not None else DEFAULT_WIDTH[kind]
        with torch.device("meta"):  # no draws from torch's global generator; initialised below
            self.net = UNetGenerator(width) if kind == "unet" else SmallGenerator(width)
        self.net.to_empty(device="cpu")
        _initialise(self.net, generator)
        if kind == "small":
            with torch.no_grad():  # near the identity, not at it: there both feature MSEs
                self.net.out.weight.mul_(init_scale)  # have zero gradient, so G would never move
                self.net.out.bias.mul_(init_scale)
        self.register_buffer("mean", mean.detach().float().reshape(1, -1, 1, 1).cpu().clone())
        self.register_buffer("std", std.detach().float().reshape(1, -1, 1, 1).cpu().clone())
        self.kind, self.bound, self.norm_bound = kind, bound, norm_bound

    def perturbation(self, x: torch.Tensor) -> torch.Tensor:
        """d = z(G(x)) - z in normalised units (with ``hard``, already scaled to the bound)."""
        z = (x - self.mean) / self.std
        out = self.net(z).float()
        d = out if self.kind == "small" else out - z.float()
        if self.bound == "hard":
            mse = d.pow(2).mean((1, 2, 3), keepdim=True)
            d = d * torch.clamp(torch.sqrt(self.norm_bound / (mse + 1e-12)), max=1.0)
        return d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = x.float() + self.std * self.perturbation(x)
        return gx.clamp(0, 1) if self.bound == "hard" else gx

    def normalised_mse(self, x: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
        """MSE between x and G(x) in normalised units (the code's L_n)."""
        return F.mse_loss(gx.float() / self.std, x.float() / self.std)

    @torch.no_grad()
    def poison(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """uint8 images -> generated (poisoned) uint8 images (clamped to [0, 1] first), on the images' device."""
        dev = self.std.device
        out = [torch.round(self(to_float(images[i:i + batch_size].to(dev), False)).clamp(0, 1) * 255)
               .to(torch.uint8) for i in range(0, len(images), batch_size)]
        return torch.cat(out).to(images.device) if out else images.clone()


def build_generator(model: nn.Module, config: InversionConfig, generator: torch.Generator) -> TriggerGenerator:
    """The generator ``config`` asks for, in ``model``'s normalised space, drawn from ``generator``."""
    mean, std = _normalisation(model)
    return TriggerGenerator(mean, std, generator, kind=config.generator, width=config.width, bound=config.bound,
                            norm_bound=config.norm_bound, init_scale=config.generator_init)


@torch.no_grad()
def mix_inverted(generator: TriggerGenerator, x: torch.Tensor, fraction: float,
                 rng: torch.Generator) -> torch.Tensor:
    """A copy of the batch ``x`` with int(fraction * B + 1) random images replaced by G(x)."""
    b = len(x)
    k = min(b, int(fraction * b + 1))
    idx = torch.randperm(b, generator=rng)[:k].to(x.device)
    out = x.clone()
    out[idx] = generator(x[idx]).to(out.dtype)
    return out


# --------------------------------------------------------------------------
# Trigger inversion
# --------------------------------------------------------------------------


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _mask(theta: torch.Tensor) -> torch.Tensor:
    return torch.tanh(theta) / (2 + 1e-7) + 0.5


def _normalisation(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's (mean, std) when it is the harness's normalisation wrapper, else (0, 1)."""
    if all(hasattr(model, a) for a in ("mean", "std", "net")):
        return model.mean, model.std
    return torch.zeros(3), torch.ones(3)


def _check(reserve: ImageSet, config: InversionConfig | None = None) -> None:
    if len(reserve) == 0:
        raise HarnessError("BTI-DBF: the defender's reserve is empty; give the defense clean data (reserve > 0)")
    if config is not None and config.generator == "unet":
        check_unet_size(*reserve.images.shape[-2:])


def switched_loss(pixel: torch.Tensor, benign: torch.Tensor, backdoor: torch.Tensor, *, norm_bound: float,
                  feat_bound: float, benign_weight: float) -> tuple[torch.Tensor, bool]:
    """Step 2b's loss and whether it pulled G back: L_n when L_n > ``norm_bound`` or
    L_b > ``feat_bound`` (strictly, compared in the losses' dtype), else -L_bd + ``benign_weight`` * L_b.

    Args:
        pixel: L_n, the normalised pixel MSE between x and G(x).
        benign: L_b, the MSE of the benign (masked) features.
        backdoor: L_bd, the MSE of the other features.
    """
    if bool(pixel.detach() > norm_bound) or bool(benign.detach() > feat_bound):  # in the tensors' dtype, as the code
        return pixel, True
    return -backdoor + benign_weight * benign, False


def pretrain_generator(g: TriggerGenerator, model: nn.Module, reserve: ImageSet, config: InversionConfig,
                       rng: torch.Generator, device: torch.device) -> None:
    """Step 1: ``config.pretrain_epochs`` epochs of pre-training G towards the identity
    (its own Adam, ``generator_lr``) on a copy of ``model`` in eval mode; G is left in eval mode.

    Loss (the code's ``pretrain.py``): CE(softmax(f(x)), softmax(f(G(x)))) +
    MSE(phi(x), phi(G(x))) + w * L_n, w = 100 while L_n > 0.1, else 0.01.
    """
    if config.pretrain_epochs == 0:
        return
    _check(reserve, config)
    net = copy.deepcopy(model).to(device).requires_grad_(False).eval()
    opt = torch.optim.Adam(g.parameters(), lr=config.generator_lr)
    g.train()
    for _ in range(config.pretrain_epochs):
        for x, _y in shuffled_batches(reserve.images, reserve.labels, config.batch_size, rng, device,
                                      augmentation=reserve.augmentation):
            with _autocast(device):
                with torch.no_grad():
                    phi_x = features(net, x)
                    logits_x = head(net, phi_x)
                gx = g(x)
                phi_g = features(net, gx)
                pred = F.cross_entropy(F.softmax(logits_x.float(), 1), F.softmax(head(net, phi_g).float(), 1))
                feat = F.mse_loss(phi_g.float(), phi_x.float())
                pixel = g.normalised_mse(x, gx)
                weight = PRETRAIN_PULL if pixel.item() > PRETRAIN_THRESHOLD else PRETRAIN_KEEP
                loss = pred + feat + weight * pixel
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    g.eval()
    if not math.isfinite(float(loss.detach())):
        raise HarnessError(f"BTI-DBF: generator pre-training diverged (loss {float(loss)}); "
                           "lower the config's generator_lr")


def decouple_benign_features(net: nn.Module, reserve: ImageSet, config: InversionConfig,
                             rng: torch.Generator, device: torch.device) -> torch.Tensor:
    """Step 2a: the benign-feature mask m in [0, 1], the shape of one sample's feature map.

    ``net`` runs in train mode (batch statistics), as in the code: pass a copy,
    its BN running statistics change.
    """
    _check(reserve)
    net.to(device).requires_grad_(False).eval()
    with torch.no_grad():
        shape = features(net, to_float(reserve.images[:1].to(device), False)).shape[1:]
    theta = torch.randn(shape, generator=rng).to(device).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=config.mask_lr)
    net.train()
    for _ in range(config.mask_epochs):
        for x, y in shuffled_batches(reserve.images, reserve.labels, config.batch_size, rng, device,
                                      augmentation=reserve.augmentation):
            with _autocast(device):
                m = _mask(theta)
                phi = features(net, x)
                loss = F.cross_entropy(head(net, m * phi), y) - F.cross_entropy(head(net, (1 - m) * phi), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    return _mask(theta).detach()


class TriggerInverter:
    """BTI-DBF's trigger inversion (steps 1 to 2c): building and pre-training G
    happen here, at construction; G and its optimizer persist across rounds, as
    in the code.

    Attributes:
        generator: the :class:`TriggerGenerator` G (float [0, 1] images in and out).
        target: the detected target class, after :meth:`detect_target`.
        mask: the last benign-feature mask.
        pulled_back: in the last :meth:`invert`, the steps whose loss was L_n.
    """

    def __init__(self, model: nn.Module, reserve: ImageSet, config: InversionConfig, ctx):
        _check(reserve, config)
        self.reserve, self.config, self.ctx = reserve, config, ctx
        self.generator = build_generator(model, config, ctx.generator).to(ctx.device)
        pretrain_generator(self.generator, model, reserve, config, ctx.generator, ctx.device)
        self.opt = torch.optim.Adam(self.generator.parameters(), lr=config.generator_lr)
        self.target: int | None = None
        self.mask: torch.Tensor | None = None
        self.pulled_back = 0

    def invert(self, model: nn.Module) -> TriggerGenerator:
        """One round: decouple benign features, then train G, on a copy of ``model``.

        After :meth:`detect_target`, G is also pushed towards the target (CE).
        """
        cfg, dev, rng = self.config, self.ctx.device, self.ctx.generator
        net = copy.deepcopy(model)
        mask = self.mask = decouple_benign_features(net, self.reserve, cfg, rng, dev)
        g = self.generator.train()
        self.pulled_back = 0
        for _ in range(cfg.generator_epochs):
            for x, y in shuffled_batches(self.reserve.images, self.reserve.labels, cfg.batch_size, rng, dev,
                                          augmentation=self.reserve.augmentation):
                with _autocast(dev):
                    with torch.no_grad():
                        phi_x = features(net, x)
                    gx = g(x)
                    phi_g = features(net, gx)
                    benign = F.mse_loss(mask * phi_g, mask * phi_x)
                    backdoor = F.mse_loss((1 - mask) * phi_g, (1 - mask) * phi_x)
                    loss, pulled = switched_loss(g.normalised_mse(x, gx), benign, backdoor,
                                                 norm_bound=cfg.norm_bound, feat_bound=cfg.feat_bound,
                                                 benign_weight=cfg.benign_weight)
                    self.pulled_back += pulled
                    if self.target is not None:
                        loss = loss + F.cross_entropy(head(net, phi_g), torch.full_like(y, self.target))
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
        return g.eval()

    @torch.no_grad()
    def detect_target(self, model: nn.Module) -> int:
        """Step 2c: the class ``model`` predicts most often on G(x + noise) over the reserve."""
        dev, rng, g = self.ctx.device, self.ctx.generator, self.generator.eval()
        model.eval()
        counts = torch.zeros(self.ctx.num_classes, dtype=torch.int64)
        for x, _ in shuffled_batches(self.reserve.images, self.reserve.labels, self.config.batch_size, rng,
                                       dev, augmentation=self.reserve.augmentation):
            noise = torch.randn(x.shape, generator=rng).to(dev) * (self.config.detect_noise * g.std)
            with _autocast(dev):
                pred = model(g(x + noise)).argmax(1)
            counts += torch.bincount(pred.cpu(), minlength=self.ctx.num_classes)[: self.ctx.num_classes]
        self.target = int(counts.argmax())
        return self.target


def invert_triggers(model: nn.Module, reserve: ImageSet, config: InversionConfig, ctx) -> TriggerGenerator:
    """BTI-DBF's inversion on ``model`` (unchanged): the generator, pre-trained and
    then trained for one round, with the detected target class as its ``target`` attribute.

    ``generator(x01)`` maps float images to generated ones;
    ``generator.poison(uint8)`` maps uint8 images to uint8 ones.
    """
    inverter = TriggerInverter(model, reserve, config, ctx)
    generator = inverter.invert(model)
    generator.target = inverter.detect_target(copy.deepcopy(model))
    return generator


# --------------------------------------------------------------------------
# The defense
# --------------------------------------------------------------------------


class BTIDBFConfig(InversionConfig):
    """Attributes:
        rounds: inversion + unlearning rounds (``nround``).
        epochs: unlearning epochs per round (``ul_round``).
        lr: Adam learning rate of the unlearning.
        poison_fraction: generated images per batch, int(fraction * B + 1).
        feature_weight: weight of MSE(phi(x), phi(x_mixed)) in the unlearning loss.
        (and the inversion settings of :class:`InversionConfig`)
    """

    rounds: int = Field(default=5, gt=0)
    epochs: int = Field(default=30, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    poison_fraction: float = Field(default=0.1, ge=0, le=1)
    feature_weight: float = Field(default=1.0, ge=0)


def _unlearn(model: nn.Module, generator: TriggerGenerator, opt: torch.optim.Optimizer, config: BTIDBFConfig,
             ctx) -> None:
    """Step 2d: ``config.epochs`` epochs on the reserve mixed with G(x) at the true labels."""
    dev, rng = ctx.device, ctx.generator
    model.train()
    for _ in range(config.epochs):
        for x, y in shuffled_batches(ctx.reserve.images, ctx.reserve.labels, config.batch_size, rng, dev,
                                      augmentation=ctx.reserve.augmentation):
            mixed = mix_inverted(generator, x, config.poison_fraction, rng)
            with _autocast(dev):
                phi_x = features(model, x)
                phi_m = features(model, mixed)
                loss = F.cross_entropy(head(model, phi_m), y) + config.feature_weight * F.mse_loss(phi_m, phi_x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    if not math.isfinite(float(loss.detach())):
        raise HarnessError(f"btidbf: unlearning diverged (loss {float(loss)}); lower the config's lr")


class BTIDBF(Defense):
    name = "btidbf"
    version = "2"  # 2: the code's U-Net, pre-trained, and soft bound by default
    summary = "BTI-DBF(U): invert triggers via decoupled benign features, unlearn them at true labels (rounds)"
    paper = ("Xu et al., Towards Reliable and Efficient Backdoor Trigger Inversion via Decoupling Benign "
             "Features, ICLR 2024 (github.com/xuxiong0214/BTIDBF)")
    Config = BTIDBFConfig
    needs = frozenset()
    families = frozenset({"*"})  # any model with timm's forward_features/forward_head, ViT included

    def purify(self, model, ctx):
        model = copy.deepcopy(model).to(ctx.device)
        cfg = self.config
        inverter = TriggerInverter(model, ctx.reserve, cfg, ctx)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)  # kept across rounds, as in the code
        for r in range(cfg.rounds):
            generator = inverter.invert(model)
            if r == 0:
                inverter.detect_target(model)
            _unlearn(model, generator, opt, cfg, ctx)
        return Purified(model)


@hookimpl
def harness_defenses():
    return [BTIDBF]
