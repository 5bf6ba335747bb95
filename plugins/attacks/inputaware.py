"""Input-Aware Dynamic Backdoor: a learned, per-image pattern blended in through a learned, sparse mask.

Paper: Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020
(code: VinAIResearch/input-aware-backdoor-attack-release; BackdoorBench
``attack/inputaware.py``).

Algorithm (training-controlled: the attacker runs the training loop and owns
two small conv encoder-decoders besides the classifier):

1. Pattern generator ``G``: image -> pattern ``g(x) = tanh(G(x)) / 2 + 1/2``
   in ``[0, 1]^{3 x H x W}``. Mask generator ``M``: image -> mask
   ``m(x) = tanh(20 M(x) - 10) / 2 + 1/2`` in ``[0, 1]^{1 x H x W}`` (the
   paper's "threshold", nearly binary). Both end in a convolution plus a
   normalization without ReLU (as the original), are created lazily on the training
   device, with every weight drawn on the CPU from a generator seeded with
   ``generator_seed`` (uniform ``+-1/sqrt(fan_in)``, biases 0, norm 1/0).
2. Trigger: ``T(x) = x + m(x) * (g(x) - x)``; ``apply_trigger`` computes it
   on ``x / 255`` and rounds to uint8.
3. Each training step (batch of ``B`` augmented images, already shuffled):
   ``nb = round(poison_rate * B)`` (below one: one with probability
   ``poison_rate * B``), ``nc = min(round(cross_ratio * nb), B - nb)``.
   Rows ``[0, nb)`` become ``T(x)`` labelled with the target; rows
   ``[nb, nb + nc)`` are cross samples ``x + m(x') * (g(x') - x)`` with the
   pattern and mask of ANOTHER image ``x'`` of the batch, kept at their TRUE
   labels (they force the trigger to be input-specific); the rest are clean.
   ``x'`` is drawn (step generator) from the clean rows ``[nb + nc, B)``,
   so it is never the image itself (a batch without clean rows rolls by one).
4. Loss returned to the trainer: ``CE(C(batch), labels) + lambda_div *
   L_div(G)``, with the diversity loss over the pairs ``(x_k, x'_k)``,
   ``k < nb`` (a backdoor image and a partner image):
   ``mean_k( d(x_k, x'_k) / (d(g(x_k), g(x'_k)) + 1e-7) )``,
   ``d(a, b) = sqrt(mean((a - b)^2))`` per image. The classifier gets the
   CE gradient; ``G`` gets gradients from both terms (the CE through the
   backdoor and cross samples) and is stepped with its own Adam
   (``lr_G``, betas (0.5, 0.9)) at the START of the next ``training_loss``
   call, because the trainer only backpropagates and steps the classifier.
   ``M`` gets no gradient from this loss (frozen, as in the original).
5. Mask generator training (its own step, finished inside ``training_loss``
   before the batch is built): while ``epoch < mask_epochs``, one Adam step
   (``lr_M``, betas (0.5, 0.9)) on
   ``lambda_norm * mean(relu(m(x) - mask_density)) + lambda_div * mean(d(x, x_r) / (d(m(x), m(x_r)) + 1e-7))``
   over the whole batch, ``x_r`` the batch rolled by one. Then ``M`` is
   frozen. Learning rates follow MultiStepLR schedules by epoch
   (``G``: x0.1 at epochs 200, 300, 400, 500; ``M``: x0.1 at 10, 20).
6. ``G`` and ``M`` (weights) are the attack's state
   (``G.*``, ``M.*`` in ``state_dict``), saved with the trained model and
   restored by ``load_state_dict`` for evaluation.

What is the paper's and what is substituted: the trigger's form (a learned
per-image pattern through a learned sparse mask), the cross samples and the
losses are the paper's and BackdoorBench's. The generators that make the
trigger are NOT: smaller networks of this module's own, the mask generator
trained jointly with the classifier instead of beforehand (``substitute``,
and the Departures below).

Defaults: BackdoorBench's CIFAR-10 ``config/attack/inputaware/default.yaml``
(conventions.md §2.8): ``lr_G = lr_M = 0.01``, ``lambda_div 1``,
``lambda_norm 100``, ``mask_density 0.032``, ``clean_train_epochs 25`` (the
mask generator's epochs), ``pratio 0.1``, target 0, scheduler milestones as
above. BackdoorBench sets ``num_cross = num_bd`` (``cross_ratio 1``), which is
the paper's ``p_attack = p_cross = 0.1``. Adam betas (0.5, 0.9) and the
1e-7 epsilon are the original code's. The classifier's lr (``lr_C``) is the
harness recipe's. ``mode: all2all`` (class c -> c + 1) is the paper's
all-to-all attack.

Departures:
    - The mask generator is trained jointly with the classifier (one step on
      each batch during the first ``mask_epochs`` epochs) instead of for 25
      epochs on its own BEFORE the classifier training starts: the trainer
      owns the loop and the epochs. So during those epochs the backdoor is
      learned with a mask that is still moving, and in short runs (fewer than
      ``mask_epochs`` epochs) ``M`` trains for the whole run.
    - ``G``'s update is one step late (its gradient from the trainer's
      backward is applied at the start of the next call); the last batch's
      gradient of a run is dropped. With the trainer's SAM option
      ``training_loss`` runs twice per step, so ``G`` and ``M`` step twice.
    - The partner images ``x'`` come from the same shuffled batch (its clean
      rows) instead of a second, independently shuffled data loader; the
      diversity loss of ``G`` pairs backdoor rows with their partners.
    - ``G`` and ``M`` are small encoder-decoders of this module's own
      (channels 8 and 16 by default, two pool/upsample levels), not the original's
      (32-64-128, three levels); the trainer's augmentation (crop 4, flip)
      replaces the original's (crop 5, rotation 10, flip).
    - Counts are ``round(rate * B)`` (the harness's convention); the original
      truncates. ``cross_ratio`` is a config field (BackdoorBench fixes 1).
    - The generators normalize with GroupNorm(1, C) (per image) instead of
      batch norm: no running statistics, so the trigger is the same function
      in training and evaluation even after few steps (with batch norm the
      eval-mode masks stayed ~0 for the first hundreds of steps).
    - Models here take ``[0, 1]`` images and normalize inside, so ``g`` is a
      pixel-space pattern (the original normalizes it; the blend commutes
      with the per-channel affine normalization, so this is the same trigger).
    - ``apply_trigger`` on an attack that neither trained nor loaded state
      builds the UNTRAINED seeded generators and warns (the shared contract
      test calls it on a fresh attack, so it cannot raise).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from backdoor_harness.plugins.attacks.wanet import batch_count
from backdoor_harness.toolkit import AllToAllConfig, Attack, hookimpl

EPSILON = 1e-7


def pair_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean((a - b)^2))`` per image (the original's diversity distance)."""
    return torch.sqrt(((a - b) ** 2).mean(dim=(1, 2, 3)))


class EncoderDecoder(nn.Module):
    """conv-norm-ReLU x2, pool, x2, pool, then upsample back; the last conv has a norm and no ReLU.

    The norm is GroupNorm(1, C) (per image), so train and eval mode compute the same function."""

    def __init__(self, out_channels: int, width: int = 16):
        super().__init__()

        def block(cin: int, cout: int, relu: bool = True) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(1, cout)]
            return layers + [nn.ReLU()] if relu else layers

        w1, w2 = width, 2 * width
        self.down1 = nn.Sequential(*block(3, w1), *block(w1, w1))
        self.down2 = nn.Sequential(*block(w1, w2), *block(w2, w2))
        self.mid = nn.Sequential(*block(w2, w2))
        self.up2 = nn.Sequential(*block(w2, w1))
        self.up1 = nn.Sequential(*block(w1, w1), *block(w1, out_channels, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        a = self.down1(x)
        b = self.down2(F.max_pool2d(a, 2))
        c = self.mid(F.max_pool2d(b, 2))
        c = F.interpolate(c, size=b.shape[-2:], mode="nearest")
        d = self.up2(c)
        d = F.interpolate(d, size=(h, w), mode="nearest")
        return self.up1(d)


def seeded_init(module: nn.Module, generator: torch.Generator) -> None:
    """Conv weights uniform in ``+-1/sqrt(fan_in)``, biases 0, norm weight 1 / bias 0, drawn on the CPU."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                bound = 1.0 / (m.in_channels * m.kernel_size[0] * m.kernel_size[1]) ** 0.5
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 2 * bound - bound)
                m.bias.zero_()
            elif isinstance(m, nn.GroupNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()


class InputAwareConfig(AllToAllConfig):
    """Attributes:
        lr_G: Adam learning rate of the pattern generator.
        lr_M: Adam learning rate of the mask generator.
        lambda_div: weight of the diversity losses (G and M).
        lambda_norm: weight of the mask density loss.
        mask_density: the mask's allowed mean value (fraction of pixels).
        mask_epochs: epochs (of the classifier's training) during which the mask generator trains.
        cross_ratio: cross samples per backdoor sample in a batch.
        g_milestones: epochs at which G's lr is multiplied by ``lr_gamma``.
        m_milestones: epochs at which M's lr is multiplied by ``lr_gamma``.
        lr_gamma: the lr decay factor at a milestone.
        width: channels of the generators' first level (the second has twice as many).
        generator_seed: seed of the generators' initial weights.
    """

    lr_G: float = Field(default=0.01, gt=0)
    lr_M: float = Field(default=0.01, gt=0)
    lambda_div: float = Field(default=1.0, ge=0)
    lambda_norm: float = Field(default=100.0, ge=0)
    mask_density: float = Field(default=0.032, ge=0, le=1)
    mask_epochs: int = Field(default=25, ge=0)
    cross_ratio: float = Field(default=1.0, ge=0)
    g_milestones: tuple[int, ...] = (200, 300, 400, 500)
    m_milestones: tuple[int, ...] = (10, 20)
    lr_gamma: float = Field(default=0.1, gt=0, le=1)
    width: int = Field(default=8, ge=1)
    generator_seed: int = 0


class InputAware(Attack):
    name = "inputaware"
    version = "1"
    summary = "training-controlled: learned per-image pattern x learned sparse mask + cross samples (BackdoorBench)"
    paper = "Nguyen & Tran, Input-Aware Dynamic Backdoor Attack, NeurIPS 2020"
    Config = InputAwareConfig
    training_controlled = True
    substitute = ("own smaller pattern and mask generators (8/16 channels, GroupNorm), the mask trained jointly with "
                  "the classifier, not the original networks and mask pre-training")

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.G: EncoderDecoder | None = None
        self.M: EncoderDecoder | None = None
        self._opt_G: torch.optim.Optimizer | None = None
        self._opt_M: torch.optim.Optimizer | None = None

    # -- the generators ----------------------------------------------------------------

    def build(self) -> tuple[EncoderDecoder, EncoderDecoder]:
        """Fresh ``(G, M)`` on the CPU, initialized from ``generator_seed``."""
        g = torch.Generator().manual_seed(self.config.generator_seed)
        G, M = EncoderDecoder(3, self.config.width), EncoderDecoder(1, self.config.width)
        seeded_init(G, g)
        seeded_init(M, g)
        return G, M

    def _ensure(self, device: torch.device) -> None:
        if self.G is None:
            self.G, self.M = self.build()
        if next(self.G.parameters()).device != device:
            self.G.to(device)
            self.M.to(device)
            self._opt_G = self._opt_M = None  # optimizer state lives with the parameters
        if self._opt_G is None:
            self._opt_G = torch.optim.Adam(self.G.parameters(), lr=self.config.lr_G, betas=(0.5, 0.9))
            self._opt_M = torch.optim.Adam(self.M.parameters(), lr=self.config.lr_M, betas=(0.5, 0.9))

    @staticmethod
    def pattern(G: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(G(x)) / 2 + 0.5

    @staticmethod
    def mask(M: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(M(x) * 20 - 10) / 2 + 0.5

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.G is None:
            return {}
        out = {f"G.{k}": v.detach().cpu().clone() for k, v in self.G.state_dict().items()}
        out.update({f"M.{k}": v.detach().cpu().clone() for k, v in self.M.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        G, M = self.build()
        try:
            G.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("G.")})
            M.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("M.")})
        except RuntimeError as e:
            raise RuntimeError(f"attack 'inputaware': state does not fit the generators of this config "
                               f"(width {self.config.width}): {e}") from e
        self.G, self.M = G.eval(), M.eval()
        self._opt_G = self._opt_M = None

    # -- the trigger ----------------------------------------------------------------------

    @torch.no_grad()
    def apply_trigger(self, images: torch.Tensor, *, train: bool = False) -> torch.Tensor:
        if self.G is None:
            warnings.warn("inputaware: apply_trigger before training or loading state uses the UNTRAINED "
                          f"generators of generator_seed {self.config.generator_seed}", stacklevel=2)
            self.G, self.M = self.build()
        G, M = self.G, self.M
        dev = images.device
        if next(G.parameters()).device != dev:
            G, M = copy.deepcopy(G).to(dev), copy.deepcopy(M).to(dev)
        modes = G.training, M.training
        G.eval(), M.eval()
        try:
            x = images.float() / 255
            out = x + self.mask(M, x) * (self.pattern(G, x) - x)
        finally:
            G.train(modes[0]), M.train(modes[1])
        return (out * 255).round_().clamp_(0, 255).to(torch.uint8)

    # -- training ------------------------------------------------------------------------------

    def _lr(self, base: float, milestones: tuple[int, ...], epoch: int) -> float:
        return base * self.config.lr_gamma ** sum(epoch >= m for m in milestones)

    def train_mask_step(self, images: torch.Tensor) -> dict[str, float]:
        """One Adam step of ``M`` on its density + diversity loss (float images in [0, 1])."""
        M, c = self.M, self.config
        M.train()
        with torch.enable_grad():
            x1, x2 = images.detach(), images.detach().roll(1, 0)
            m1, m2 = self.mask(M, x1), self.mask(M, x2)
            norm = F.relu(m1 - c.mask_density).mean()
            div = (pair_distance(x1, x2) / (pair_distance(m1, m2) + EPSILON)).mean()
            loss = c.lambda_norm * norm + c.lambda_div * div
            self._opt_M.zero_grad(set_to_none=True)
            loss.float().backward()
            self._opt_M.step()
            self._opt_M.zero_grad(set_to_none=True)
        return {"norm": float(norm.detach()), "div": float(div.detach())}

    def poison_batch(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, torch.Tensor]:
        """``(images, labels, div_loss, nb, nc, partners)`` of one training step.

        Rows ``[0, nb)`` carry their own trigger and the target label, rows
        ``[nb, nb + nc)`` the trigger of image ``partners[j]`` of the batch at
        their true label, the rest are as given. ``div_loss`` (differentiable
        in ``G``) pairs backdoor row ``k`` with ``partners[k]``. ``partners``
        has ``max(nb, nc)`` batch indices (CPU).
        """
        b = len(labels)
        nb = batch_count(self.config.poison_rate, b, generator)
        zero = images.new_zeros(())
        if nb == 0:
            return images, labels, zero, 0, 0, torch.zeros(0, dtype=torch.int64)
        nc = min(round(self.config.cross_ratio * nb), b - nb)
        k = max(nb, nc)
        free = b - nb - nc
        if free > 0:
            partners = nb + nc + torch.randint(free, (k,), generator=generator)
        else:  # no clean rows: the next image of the batch
            partners = (torch.arange(k) + 1) % b
        src = images[partners.to(images.device)]
        g1 = self.pattern(self.G, images[:nb])
        g2 = self.pattern(self.G, src)
        with torch.no_grad():  # M is trained by its own loss only
            m1 = self.mask(self.M, images[:nb])
            m2 = self.mask(self.M, src[:nc])
        x_bd = images[:nb] + m1 * (g1 - images[:nb])
        x_cross = images[nb:nb + nc] + m2 * (g2[:nc] - images[nb:nb + nc])
        x = torch.cat([x_bd, x_cross, images[nb + nc:]])
        y = labels.clone()
        y[:nb] = self.target_labels(labels[:nb], num_classes)
        div = (pair_distance(images[:nb], src[:nb]) / (pair_distance(g1, g2[:nb]) + EPSILON)).mean()
        return x, y, div, nb, nc, partners

    def training_loss(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, step
                      ) -> torch.Tensor:
        self._ensure(images.device)
        c = self.config
        # G's gradient from the previous step's backward (the trainer's): apply it now
        if any(p.grad is not None for p in self.G.parameters()):
            self._opt_G.step()
        self._opt_G.zero_grad(set_to_none=True)
        for group in self._opt_G.param_groups:
            group["lr"] = self._lr(c.lr_G, c.g_milestones, step.epoch)
        for group in self._opt_M.param_groups:
            group["lr"] = self._lr(c.lr_M, c.m_milestones, step.epoch)
        if step.epoch < c.mask_epochs:
            self.train_mask_step(images)
        self.M.eval()
        self.G.train()
        x, y, div, _, _, _ = self.poison_batch(images, labels, step.generator, step.num_classes)
        return F.cross_entropy(model(x), y) + c.lambda_div * div


@hookimpl
def harness_attacks():
    return [InputAware]
