"""Blended: a fixed pattern blended into the whole image.

Paper: Chen, Liu, Li, Lu, Song, "Targeted Backdoor Attacks on Deep Learning
Systems Using Data Poisoning", 2017.

x' = (1 - alpha) * x + alpha * t, rounded to uint8. ``alpha`` is used for
training and ``test_alpha`` (default: the same) for the test-time trigger, so
paper 000's 0.1 / 0.2 setting is ``{pattern: gaussian, alpha: 0.1, test_alpha: 0.2}``.

The pattern ``t`` (uint8 ``[3, H, W]``, ``pattern``):

- ``uniform`` (the default): every pixel and channel drawn independently and
  uniformly from 0-255 with a generator seeded by ``pattern_seed``. Neither
  BackdoorBench's nor paper 000's trigger (see ``substitute``); kept as the
  default so that existing results stay valid.
- ``gaussian``: paper 000's trigger (Appendix B: "we adopt the Gaussian Noise
  as the backdoor trigger"). Neither the paper nor the authors' code
  (AISafety-HKUST/Backdoor_Safety_Tuning, whose ``config/attack/blended``
  still points at BackdoorBench's Hello Kitty image, and which has no noise
  resource or generator) gives its mean, spread or clipping. The rule here,
  our choice: every pixel and channel drawn independently from
  N(``noise_mean``, ``noise_std``^2) with a generator seeded by
  ``pattern_seed``, rounded to the nearest grey level and clipped to 0-255;
  by default mean 127.5 and std 63.75 grey levels, i.e. N(0.5, 0.25^2) on the
  [0, 1] scale, so that +-2 std spans the pixel range and about 4.6% of the
  draws are clipped.
- ``file``: an image the user provides (``pattern_file``, e.g. BackdoorBench's
  ``resource/blended/hello_kitty.jpeg``, its CIFAR-10 default), read with
  Pillow, converted to RGB and resized to the data's H x W with bilinear
  interpolation (what BackdoorBench's ``transforms.Resize`` does to a PIL
  image). Nothing is downloaded. ``pattern_sha256`` (required) must be the
  file's SHA-256: that is how the file's content enters every job key (a job
  key hashes the config as written), and a file that changed since is an
  error rather than a silent rerun with another trigger. The path is as
  written (relative to the working directory of the harness process), so
  moving the file changes the keys too.

Departures:
    - The blend is rounded to the nearest grey level; BackdoorBench casts the
      clipped float blend with ``astype(uint8)``, which truncates.
    - ``uniform`` and ``gaussian`` are generated per image size from the seed
      (the same seed gives unrelated patterns at 32x32 and 64x64); a ``file``
      is resized, as in BackdoorBench.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from backdoor_harness.toolkit import Attack, AttackConfig, HarnessError, hookimpl


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_pattern_file(path: str | Path, expected_sha256: str | None = None):
    """The pattern file as an RGB Pillow image; HarnessError (or ValueError inside a
    config validator, see ``_pattern``) if it is missing, unreadable or not the expected one."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"blended: pattern_file {str(path)!r} does not exist (resolved: {path.resolve()}); "
                           "give the path of an image file (relative to the directory the harness runs in, "
                           "or absolute)")
    digest = sha256_of(path)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise HarnessError(f"blended: pattern_file {str(path)!r} has SHA-256 {digest}, not the configured "
                           f"pattern_sha256 {expected_sha256}: the file changed. If the new image is the one you "
                           f"mean, set pattern_sha256: {digest} (this makes new job keys)")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB"), digest
    except (UnidentifiedImageError, OSError) as err:
        raise HarnessError(f"blended: pattern_file {str(path)!r} is not an image Pillow can read ({err}); "
                           "give a PNG, JPEG or other common image file") from None


class BlendedConfig(AttackConfig):
    """Attributes:
        alpha: blend ratio of the training trigger.
        test_alpha: blend ratio at test time (default: ``alpha``).
        pattern: ``uniform``, ``gaussian`` or ``file`` (see the module docstring).
        pattern_seed: seed of the ``uniform`` / ``gaussian`` noise.
        noise_mean, noise_std: the ``gaussian`` noise, in grey levels (0-255 scale).
        pattern_file: the image of ``pattern: file``.
        pattern_sha256: that file's SHA-256 (hex), required with ``pattern_file``.
    """

    alpha: float = Field(default=0.2, gt=0, le=1)
    test_alpha: float | None = Field(default=None, gt=0, le=1)
    pattern: Literal["uniform", "gaussian", "file"] = "uniform"
    pattern_seed: int = 0
    noise_mean: float = Field(default=127.5, ge=0, le=255)
    noise_std: float = Field(default=63.75, gt=0)
    pattern_file: str | None = None
    pattern_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")

    @model_validator(mode="after")
    def _pattern(self) -> "BlendedConfig":
        belongs = {"pattern_seed": ("uniform", "gaussian"), "noise_mean": ("gaussian",),
                   "noise_std": ("gaussian",), "pattern_file": ("file",), "pattern_sha256": ("file",)}
        for name, patterns in belongs.items():  # a value other than the default for another pattern is a mistake
            if getattr(self, name) != type(self).model_fields[name].default and self.pattern not in patterns:
                raise ValueError(f"{name} belongs to pattern {' / '.join(patterns)}, but pattern is "
                                 f"{self.pattern!r}; remove {name} or change pattern")
        if self.pattern == "file":
            if self.pattern_file is None:
                raise ValueError("pattern: file needs pattern_file (the path of the image to blend)")
            try:
                _, digest = read_pattern_file(self.pattern_file, self.pattern_sha256)
            except HarnessError as err:
                raise ValueError(str(err)) from None
            if self.pattern_sha256 is None:
                raise ValueError(f"pattern_file needs pattern_sha256, the file's SHA-256, so that its content "
                                 f"is part of the job keys; for {self.pattern_file!r} add "
                                 f"pattern_sha256: {digest}")
        return self


class Blended(Attack):
    name = "blended"
    version = "1"
    summary = "pattern blended at alpha 0.2: seeded uniform noise (default), gaussian noise, or an image file"
    paper = "Chen et al., Targeted Backdoor Attacks ... Using Data Poisoning, 2017"
    Config = BlendedConfig
    @property
    def substitute(self) -> str | None:  # type: ignore[override]  # the config decides
        if self.config.pattern == "uniform":
            return ("seeded uniform-noise pattern, neither BackdoorBench's Hello Kitty image (pattern: file) nor "
                    "paper 000's Gaussian noise (pattern: gaussian)")
        return None  # gaussian: paper 000's kind of trigger; file: the image the user gives (BackdoorBench's)

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self._patterns: dict[tuple[int, ...], torch.Tensor] = {}

    def pattern(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The trigger image, uint8 ``[C, H, W]``: the same for a config and shape."""
        shape = tuple(shape)
        if shape not in self._patterns:
            self._patterns[shape] = self._make_pattern(shape)
        return self._patterns[shape]

    def _make_pattern(self, shape: tuple[int, ...]) -> torch.Tensor:
        c = self.config
        g = torch.Generator().manual_seed(c.pattern_seed)
        if c.pattern == "uniform":
            return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        if c.pattern == "gaussian":
            noise = torch.randn(shape, generator=g, dtype=torch.float64) * c.noise_std + c.noise_mean
            return noise.round_().clamp_(0, 255).to(torch.uint8)
        from PIL import Image

        channels, h, w = shape
        if channels != 3:
            raise HarnessError(f"blended: pattern: file blends an RGB image, but the images have {channels} channels")
        img, _ = read_pattern_file(c.pattern_file, c.pattern_sha256)
        img = img.resize((w, h), Image.BILINEAR)
        return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1).clone()

    def apply_trigger(self, images: torch.Tensor, *, train: bool = False) -> torch.Tensor:
        alpha = self.config.alpha if train or self.config.test_alpha is None else self.config.test_alpha
        t = self.pattern(tuple(images.shape[-3:])).to(images.device, torch.float32)
        out = (1 - alpha) * images.float() + alpha * t
        return out.round_().clamp_(0, 255).to(torch.uint8)


@hookimpl
def harness_attacks():
    return [Blended]
