"""SIG: a horizontal sinusoid added to target-class images, labels untouched (clean-label).

Paper: Barni, Kallas, Tondi, "A New Backdoor Attack in CNNs by Training Set
Corruption Without Label Poisoning", ICIP 2019.

Algorithm:

1. The signal is ``v(i, j) = delta * sin(2 * pi * j * f / W)`` for column
   ``j`` of a ``W``-wide image: the same on every row ``i`` and every channel
   (a horizontal ramp of ``f`` periods across the image).
2. The trigger is ``x' = clip(round(x + v), 0, 255)`` in pixel space.
3. Poisoning (clean-label): ``round(poison_rate * N)`` images are drawn
   uniformly from the *target class* only and get the trigger; every label
   stays as it is. If the target class is smaller than that, all of it is
   poisoned and a warning says which rate was reached.
4. At test time the trigger (amplitude ``test_delta``, default ``delta``) goes
   on images of the other classes, which should then be classified as the
   target.

Defaults are BackdoorBench's CIFAR-10 ones (``config/attack/sig/default.yaml``:
``sig_delta 40``, ``sig_f 6``, ``pratio 0.1``, target 0; conventions.md §2.8):
with 50,000 training images, rate 0.1 is 5,000 = all of class 0.

Departures:
    - The sum is rounded to the nearest integer; BackdoorBench casts the
      clipped float sum with ``np.uint8``, which truncates (so it adds
      ``floor(v)`` rather than ``round(v)``, a bias of half a grey level).
    - ``test_delta`` lets the test signal differ from the training one (the
      paper evaluates stronger test signals); by default they are equal, as in
      BackdoorBench.
    - BackdoorBench's clean-label selection gives fewer images without saying
      so when the class is too small; here that raises a ``UserWarning``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from backdoor_harness.toolkit import Attack, AttackConfig, hookimpl


class SIGConfig(AttackConfig):
    """Attributes:
        delta: amplitude of the sinusoid in grey levels (0-255 scale), training trigger.
        f: number of periods across the image width.
        test_delta: amplitude at test time (default: ``delta``).
    """

    delta: float = Field(default=40.0, gt=0, le=255)
    f: float = Field(default=6.0, gt=0)
    test_delta: float | None = Field(default=None, gt=0, le=255)


class SIG(Attack):
    name = "sig"
    version = "1"
    summary = "clean-label: horizontal sinusoid (delta 40, f 6) on target-class images (BackdoorBench default)"
    paper = "Barni, Kallas, Tondi, A New Backdoor Attack in CNNs by Training Set Corruption Without Label " \
            "Poisoning, ICIP 2019"
    Config = SIGConfig
    clean_label = True

    def signal(self, width: int, delta: float | None = None) -> torch.Tensor:
        """The row profile ``delta * sin(2 pi j f / W)``, float64 ``[W]``."""
        delta = self.config.delta if delta is None else delta
        j = torch.arange(width, dtype=torch.float64)
        return delta * torch.sin(2 * math.pi * j * self.config.f / width)

    def apply_trigger(self, images: torch.Tensor, *, train: bool = False) -> torch.Tensor:
        delta = self.config.delta if train or self.config.test_delta is None else self.config.test_delta
        v = self.signal(images.shape[-1], delta).to(images.device, torch.float32)
        return (images.float() + v).round_().clamp_(0, 255).to(torch.uint8)



@hookimpl
def harness_attacks():
    return [SIG]
