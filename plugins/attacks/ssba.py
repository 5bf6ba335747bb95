"""SSBA: sample-specific invisible triggers from a StegaStamp-style encoder.

Paper: Li, Li, Wu, Li, He, Lyu, "Invisible Backdoor Attack with Sample-Specific
Triggers", ICCV 2021. The encoder/decoder is StegaStamp: Tancik, Mildenhall,
Ng, "StegaStamp: Invisible Hyperlinks in Physical Photographs", CVPR 2020.

Algorithm:

1. ``prepare``: a small encoder ``E(x, c)`` (a U-Net: the image plus the bit
   string ``c`` projected by a 1x1 convolution and broadcast as extra channels)
   outputs a residual ``r = residual_scale * tanh(E(x, c))``; a small CNN
   decoder ``D`` reads ``c`` back from ``clip(x + r, 0, 1)``. Both are trained
   jointly on ``num_images`` clean training images (drawn with the generator)
   for ``epochs`` epochs of Adam, each batch with fresh random bit strings
   (as StegaStamp trains), on the loss
   ``BCE(D(clip(x + r)), c) + l2_weight * mean(r ** 2)`` ([0, 1] scale).
   Every weight is initialised from ``ctx.generator`` (He-uniform,
   ``+-sqrt(6/fan_in)``, biases 0) and every batch and bit string is drawn
   from it, so prepare is deterministic for a seed (on CPU).
2. The backdoor's code is one fixed bit string of ``code_bits`` bits drawn
   from ``code_seed``. The trigger is
   ``x' = clip(round(x + 255 * r(x, code)), 0, 255)`` in uint8: invisible
   (``|x' - x| <= round(255 * residual_scale)``) and sample-specific (the
   residual depends on the image).
3. Poisoning (all-to-one): ``round(poison_rate * N)`` training images drawn
   uniformly get the trigger and the target label; at test time the trigger
   goes on the images of the other classes.

What is the paper's and what is substituted: the idea (a fixed code hidden
by a steganographic encoder as an invisible, sample-specific residual) and
the all-to-one poisoning are the paper's and BackdoorBench's. The triggered
images are NOT: BackdoorBench (and paper 000, which runs it unmodified)
poisons with images pre-encoded by a full StegaStamp model; here ``prepare``
trains its own small StegaStamp-style encoder (``substitute``, and the
Departures below).

The attack state (``state_dict``) is the bit string (``code``), the encoder
(``encoder.<param>``) and the decoder (``decoder.<param>``, kept for
diagnostics: it is not needed to stamp).

Defaults: rate 0.1, target 0 (conventions.md §2.8 / BackdoorBench);
100-bit code (StegaStamp's secret size); residual bound 8/255, 5 epochs on
10,000 images, width 16, Adam lr 1e-3, batch 128, l2_weight 0.1 — chosen here so
that prepare costs a few GPU seconds.

Departures (from StegaStamp as SSBA uses it):
    - No LPIPS perceptual loss and no adversarial (WGAN) critic: only the bit
      loss and an L2 penalty on the residual, which is moreover hard-bounded
      by ``residual_scale * tanh`` (StegaStamp's residual is unbounded and
      kept small only by its losses).
    - No spatial transformer in the decoder and no noise/distortion layers
      (blur, JPEG, colour, perspective) between encoder and decoder: the
      trigger only has to survive the digital poisoning pipeline.
    - A much smaller network (U-Net with 3 scales of ``width``, ``2 width``,
      ``4 width`` channels; StegaStamp's has 5 scales up to 256 channels and a
      dense layer from the secret to a 50x50x3 map) and far fewer steps
      (``epochs`` x ``num_images``; StegaStamp trains ~140k steps); the bits are
      not BCH-coded.
    - The encoder is trained on the target data set itself (a subset of its
      clean training set). SSBA's code (BackdoorBench's ``resource/ssba``)
      trains StegaStamp on the data set to poison and then encodes it;
      StegaStamp's original was trained on MIRFLICKR at 400x400. Training rounds
      nothing (the decoder sees the float ``clip(x + r)``); the trigger is
      rounded to uint8.
    - The poisoned images are encoded on the fly (``apply_trigger``) instead of
      being read from pre-encoded ``.npy`` files.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from backdoor_harness.toolkit import Attack, AttackConfig, HarnessError, hookimpl


class SSBAConfig(AttackConfig):
    """Attributes:
        code_bits: length of the hidden bit string.
        code_seed: seed of the fixed bit string (the backdoor's code).
        residual_scale: L_inf bound of the residual on the [0, 1] scale (``r = scale * tanh(.)``).
        width: channels of the first encoder/decoder stage (then 2x, 4x).
        code_channels: channels the bit string is projected to before broadcasting.
        epochs: training epochs of the encoder/decoder in ``prepare``.
        num_images: clean training images used by ``prepare`` (at most the whole set).
        batch_size: images per step in ``prepare`` and per batch in ``apply_trigger``.
        lr: Adam learning rate.
        l2_weight: weight of ``mean(r ** 2)`` in the loss.
    """

    code_bits: int = Field(default=100, gt=0)
    code_seed: int = 0
    residual_scale: float = Field(default=8 / 255, gt=0, le=1)
    width: int = Field(default=16, gt=0)
    code_channels: int = Field(default=16, gt=0)
    epochs: int = Field(default=5, ge=0)
    num_images: int = Field(default=10_000, gt=0)
    batch_size: int = Field(default=128, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    l2_weight: float = Field(default=0.1, ge=0)


def _conv(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


class Encoder(nn.Module):
    """U-Net: (image [0,1], bits) -> pre-tanh residual, 3 channels, same size."""

    def __init__(self, bits: int, width: int, code_channels: int):
        super().__init__()
        w = width
        self.code = nn.Conv2d(bits, code_channels, 1)
        self.e1a, self.e1b = _conv(3 + code_channels, w), _conv(w, w)
        self.e2a, self.e2b = _conv(w, 2 * w, 2), _conv(2 * w, 2 * w)
        self.e3 = _conv(2 * w, 4 * w, 2)
        self.u2 = _conv(6 * w, 2 * w)
        self.u1 = _conv(3 * w, w)
        self.out = _conv(w + 3, 3, k=1)

    def forward(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        c = F.relu(self.code(bits.float()[:, :, None, None]).expand(-1, -1, h, w))
        e1 = F.relu(self.e1b(F.relu(self.e1a(torch.cat([x - 0.5, c], 1)))))
        e2 = F.relu(self.e2b(F.relu(self.e2a(e1))))
        e3 = F.relu(self.e3(e2))
        u2 = F.relu(self.u2(torch.cat([F.interpolate(e3, size=e2.shape[-2:]), e2], 1)))
        u1 = F.relu(self.u1(torch.cat([F.interpolate(u2, size=e1.shape[-2:]), e1], 1)))
        return self.out(torch.cat([u1, x - 0.5], 1))


class Decoder(nn.Module):
    """CNN: image [0,1] -> bit logits."""

    def __init__(self, bits: int, width: int):
        super().__init__()
        w = width
        self.c1, self.c2, self.c3 = _conv(3, w, 2), _conv(w, 2 * w, 2), _conv(2 * w, 4 * w)
        self.fc1 = nn.Linear(4 * w * 16, 256)
        self.fc2 = nn.Linear(256, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x - 0.5))))))
        h = F.adaptive_avg_pool2d(h, 4).flatten(1)
        return self.fc2(F.relu(self.fc1(h)))


def _init_(module: nn.Module, generator: torch.Generator) -> None:
    """Weights uniform in +-sqrt(6/fan_in) (He) drawn from ``generator`` (CPU), biases 0."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            else:
                bound = math.sqrt(6.0 / p[0].numel())
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))


class SSBA(Attack):
    name = "ssba"
    version = "1"
    summary = "sample-specific invisible trigger: a small StegaStamp encoder hides a fixed 100-bit code (L_inf 8/255)"
    paper = "Li et al., Invisible Backdoor Attack with Sample-Specific Triggers, ICCV 2021"
    Config = SSBAConfig
    substitute = ("own small StegaStamp-style encoder trained in prepare (no LPIPS, critic or distortions), not "
                  "BackdoorBench's images pre-encoded by StegaStamp")

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.encoder: Encoder | None = None
        self.decoder: Decoder | None = None

    # -- pieces -------------------------------------------------------------------------

    def code(self) -> torch.Tensor:
        """The fixed bit string, float ``[code_bits]`` of 0/1 from ``code_seed``."""
        g = torch.Generator().manual_seed(self.config.code_seed)
        return torch.randint(0, 2, (self.config.code_bits,), generator=g).float()

    def _nets(self) -> tuple[Encoder, Decoder]:
        c = self.config
        with torch.random.fork_rng(devices=[]):  # construction's default init must not touch the global RNG
            return Encoder(c.code_bits, c.width, c.code_channels), Decoder(c.code_bits, c.width)

    def residual(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """The bounded residual on the [0, 1] scale for float images ``x`` in [0, 1]."""
        return self.config.residual_scale * torch.tanh(self.encoder(x, bits))

    # -- prepare -------------------------------------------------------------------------

    def prepare(self, ctx) -> None:
        c, g, dev = self.config, ctx.generator, ctx.device
        encoder, decoder = self._nets()
        _init_(encoder, g)
        _init_(decoder, g)
        self.encoder, self.decoder = encoder.to(dev), decoder.to(dev)
        images = ctx.train.images
        if len(images) > c.num_images:
            images = images[torch.randperm(len(images), generator=g)[:c.num_images]]
        images = images.to(dev)
        opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=c.lr)
        encoder.train()
        decoder.train()
        for _ in range(c.epochs):
            order = torch.randperm(len(images), generator=g)
            for i in range(0, len(order), c.batch_size):
                idx = order[i:i + c.batch_size]
                x = images[idx.to(dev)].float() / 255
                bits = torch.randint(0, 2, (len(idx), c.code_bits), generator=g).float().to(dev)
                r = self.residual(x, bits)
                loss = (F.binary_cross_entropy_with_logits(decoder((x + r).clamp(0, 1)), bits)
                        + c.l2_weight * r.pow(2).mean())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        encoder.eval()
        decoder.eval()

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.encoder is None:
            return {}
        state = {"code": self.code()}
        state.update({f"encoder.{k}": v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()})
        if self.decoder is not None:
            state.update({f"decoder.{k}": v.detach().cpu().clone() for k, v in self.decoder.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "code" in state and not torch.equal(state["code"].float().cpu(), self.code()):
            raise HarnessError("ssba: the stored code differs from this config's code_seed/code_bits")
        encoder, decoder = self._nets()
        enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        dec = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
        try:
            encoder.load_state_dict(enc)
            if dec:
                decoder.load_state_dict(dec)
        except RuntimeError as e:
            raise HarnessError(f"ssba: the stored encoder does not fit this config: {e}") from e
        self.encoder = encoder.eval()
        self.decoder = decoder.eval() if dec else None

    # -- the trigger -----------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, images: torch.Tensor) -> torch.Tensor:
        """Bits (0/1 float ``[N, code_bits]``) the decoder reads from uint8 images."""
        if self.decoder is None:
            raise HarnessError("ssba: no decoder; run prepare() or load a state that has one")
        dec = self.decoder.to(images.device).eval()
        out = [(dec(images[i:i + self.config.batch_size].float() / 255) > 0).float()
               for i in range(0, len(images), self.config.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.config.code_bits, device=images.device)

    @torch.no_grad()
    def apply_trigger(self, images: torch.Tensor, *, train: bool = False) -> torch.Tensor:
        if self.encoder is None:
            raise HarnessError("ssba: the encoder is missing; run prepare() or load_state_dict() first")
        self.encoder = self.encoder.to(images.device).eval()
        code = self.code().to(images.device)
        out = torch.empty_like(images)
        for i in range(0, len(images), self.config.batch_size):
            x = images[i:i + self.config.batch_size]
            r = self.residual(x.float() / 255, code.expand(len(x), -1))
            out[i:i + len(x)] = (x.float() + 255 * r).round_().clamp_(0, 255).to(torch.uint8)
        return out


@hookimpl
def harness_attacks():
    return [SSBA]
