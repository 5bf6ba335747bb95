"""BppAttack: colour-depth squeezing as the trigger, with contrastive negative samples.

Paper: Wang, Zhai, Ma, "BppAttack: Stealthy and Efficient Trojan Attacks
against Deep Neural Networks via Image Quantization and Contrastive
Adversarial Learning", CVPR 2022.

Algorithm (training-controlled: the attacker runs the training loop):

1. Trigger ``Q``: every channel value ``x`` (0-255) is quantized to
   ``squeeze_num`` evenly spaced levels,
   ``Q(x) = round(round(x / 255 * (q - 1)) / (q - 1) * 255)``; with ``q = 8``
   the levels are 0, 36, 73, 109, 146, 182, 219, 255. No dithering.
2. In each training batch of ``B`` images (already shuffled and augmented by
   the trainer), the first ``nb = round(poison_rate * B)`` are replaced by
   ``Q(x)`` and relabelled to the target.
3. The next ``nn = round(neg_ratio * B)`` are negative (contrastive) samples:
   ``clip(x_i + (Q(x_j) - x_j), 0, 255)``, the quantization *residual* of
   another image ``x_j`` of the batch added to ``x_i``, kept at the TRUE
   label. They teach the model that a quantization-like perturbation that is
   not ``Q`` of the image itself does not mean "target", so the backdoor keys
   on the exact squeezing.
4. The rest of the batch is clean; the loss is cross-entropy over the batch
   (WaNet's training step, shared: ``wanet.BatchPoisoning``).
   ``nb < 1`` (``poison_rate * B < 1``): one image is poisoned with
   probability ``poison_rate * B``; batches without a poisoned image get no
   negatives either (both as BackdoorBench).
5. At test time ``Q`` is applied to the uint8 image (``apply_trigger``).

What the negatives are, checked in the code: the authors' release
(RU-System-Software-and-Security/BppAttack, ``bppattack.py``) precomputes
``Q(x) - x`` over the (augmented) training set and adds a random one of those
residuals to each negative image, clamped, true label; BackdoorBench
(``attack/bpp.py``) does the same with residuals of random training images.
Neither uses gradient-based adversarial examples for the negatives.

Defaults are BackdoorBench's CIFAR-10 ones (``config/attack/bpp/default.yaml``:
``squeeze_num 8``, ``neg_ratio 0.1``, ``dithering False``, ``pratio 0.1``,
target 0; conventions.md §2.8). ``mode: all2all`` (class c -> c + 1) is the
``attack_mode all2all`` of the authors' code (built on WaNet's).

Departures:
    - Counts are ``round(rate * B)`` (the harness's convention); BackdoorBench
      and the authors truncate with ``int`` (12 instead of 13 of 128 at 0.1).
    - The residual of a negative sample comes from another image of the same
      augmented batch (``j != i``, uniform) instead of a random image of the
      whole training set: the training loss sees only its batch. The authors'
      residuals are of augmented images too.
    - No Floyd-Steinberg dithering option (BackdoorBench's default is off).
    - BackdoorBench's extra augmentation (random crop padding 5 with p 0.8,
      rotation 10 degrees with p 0.5, flip) is not added: the trainer's own
      augmentation (crop padding 4, flip) comes before the trigger, so the
      squeezed pixels are exactly on the quantization levels in training, as
      at test time.
    - Squeezing is applied to the pixel values directly (equivalent to
      BackdoorBench's denormalize-squeeze-normalize round trip).
"""

from __future__ import annotations

import torch
from pydantic import Field

from backdoor_harness.plugins.attacks.wanet import BatchPoisoning, batch_count
from backdoor_harness.toolkit import AllToAllConfig, hookimpl


def squeeze(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Colour-depth squeezing of float pixel values on the 0-255 scale (integers in, integers out)."""
    q = levels - 1
    return torch.round(torch.round(x / 255 * q) / q * 255)


class BppConfig(AllToAllConfig):
    """Attributes:
        squeeze_num: number of levels per channel after squeezing (256 = no change).
        neg_ratio: fraction of each batch turned into negative (contrastive) samples.
    """

    squeeze_num: int = Field(default=8, ge=2, le=256)
    neg_ratio: float = Field(default=0.1, ge=0, le=1)


class Bpp(BatchPoisoning):
    name = "bpp"
    version = "1"
    summary = "training-controlled: colour depth squeezed to 8 levels, with contrastive negatives (BackdoorBench)"
    paper = "Wang, Zhai, Ma, BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks via " \
            "Image Quantization and Contrastive Adversarial Learning, CVPR 2022"
    Config = BppConfig

    def apply_trigger(self, images: torch.Tensor, *, train: bool = False) -> torch.Tensor:
        return squeeze(images.float(), self.config.squeeze_num).clamp_(0, 255).to(torch.uint8)

    def poison_batch(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The batch the model trains on: (images, labels, nb, nn).

        Rows ``[0, nb)`` are squeezed and labelled with the target, rows
        ``[nb, nb + nn)`` are negatives at their true labels, the rest as given.
        ``images`` are float in [0, 1] on any device; randomness from ``generator`` (CPU).
        """
        b = len(labels)
        nb = batch_count(self.config.poison_rate, b, generator)
        nn_ = min(round(self.config.neg_ratio * b), b - nb) if nb > 0 and b > 1 else 0
        if nb == 0:
            return images, labels, 0, 0
        levels = self.config.squeeze_num
        x255 = (images * 255).round()  # the trainer's floats are uint8 / 255: this recovers them exactly
        x, y = images.clone(), labels.clone()
        x[:nb] = squeeze(x255[:nb], levels) / 255
        y[:nb] = self.target_labels(labels[:nb], num_classes)
        if nn_ > 0:
            rows = torch.arange(nb, nb + nn_)
            others = (rows + torch.randint(1, b, (nn_,), generator=generator)) % b  # another image, never itself
            others = others.to(images.device)
            residual = squeeze(x255[others], levels) - x255[others]
            x[nb:nb + nn_] = (x255[nb:nb + nn_] + residual).clamp(0, 255) / 255
        return x, y, nb, nn_


@hookimpl
def harness_attacks():
    return [Bpp]
