"""BTI-DBF(U) and PAM with the code's U-Net generator (soft bound, pre-trained) vs our small one
(hard bound, no pre-training), on one BadNets-backdoored tiny_cnn, on the CPU.

A synthetic, learnable 10-class data set (a coarse colour pattern per class plus noise, as
tests/helpers.py ``learnable_set``), BadNets (10%, the harness's plugin) stamped after augmentation,
tiny_cnn trained 15 epochs; the defenses run at reduced budgets (below) on a 250-image clean reserve,
with nothing else changed between the two generator forms. Prints clean accuracy, ASR (test images
whose label is not the target) and wall time per defense and form.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/btidbf_generator.py [--defenses btidbf pam]

Not a test: no assertion; the numbers depend on the machine (time) and on the reduced budgets.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import backdoor_harness as bh
from backdoor_harness.data import ImageSet
from backdoor_harness.models import create_model
from backdoor_harness.plugins.defenses.btidbf import BTIDBF
from backdoor_harness.plugins.defenses.pam import PAM
from backdoor_harness.contracts import DefenseContext
from backdoor_harness.models import model_family
from backdoor_harness.train import Recipe, fit, predict

CPU = torch.device("cpu")
CLASSES = [str(i) for i in range(10)]
#: the two generator forms compared
FORMS = {"small": dict(generator="small", bound="hard", pretrain_epochs=0),
         "unet": dict(generator="unet", bound="soft", pretrain_epochs=10)}
#: reduced budgets, the same for both forms
BUDGET = {"btidbf": dict(rounds=2, epochs=5, mask_epochs=5, generator_epochs=5, batch_size=64),
          "pam": dict(rounds=2, epochs=5, mask_epochs=5, generator_epochs=5, batch_size=64)}
DEFENSES = {"btidbf": BTIDBF, "pam": PAM}


def learnable(n: int, seed: int) -> ImageSet:
    protos = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.6 * F.interpolate(protos[y], size=32, mode="nearest") + 0.4 * torch.rand(n, 3, 32, 32, generator=g)
    return ImageSet((x * 255).round().to(torch.uint8), y, CLASSES)


def evaluate(model, attack, test: ImageSet) -> tuple[float, float]:
    acc = (predict(model, test.images, CPU) == test.labels).float().mean().item()
    keep = test.labels != attack.config.target
    triggered = attack.apply_trigger(test.images[keep], train=False)
    asr = (predict(model, triggered, CPU) == attack.config.target).float().mean().item()
    return acc, asr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defenses", nargs="+", default=["btidbf", "pam"], choices=sorted(DEFENSES))
    args = parser.parse_args()

    train, reserve, test = learnable(2000, 1), learnable(250, 2), learnable(1000, 3)
    attack = bh.create_attack("badnets", stamp="after_augment")
    poisoned = attack.poison(train, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 10, 32).eval()
    t0 = time.perf_counter()
    fit(model, poisoned, Recipe(epochs=15, lr=0.05), device=CPU, generator=torch.Generator().manual_seed(0),
        progress=False)
    acc, asr = evaluate(model, attack, test)
    print(f"backdoored tiny_cnn: clean acc {100 * acc:.1f}%, ASR {100 * asr:.1f}% "
          f"(trained in {time.perf_counter() - t0:.0f} s)")
    print(f"{'defense':8} {'generator':9} {'clean acc':>9} {'ASR':>6} {'wall s':>7}")
    for name in args.defenses:
        for form, options in FORMS.items():
            defense = DEFENSES[name](**BUDGET[name], **options)
            ctx = DefenseContext(reserve=reserve, num_classes=10, device=CPU,
                                 generator=torch.Generator().manual_seed(0), seed=0, family=model_family(model),
                                 fit=lambda *a, **k: fit(*a, **{"progress": False, **k}), attack=None)
            torch.manual_seed(0)
            t0 = time.perf_counter()
            out = defense.purify(model, ctx)
            wall = time.perf_counter() - t0
            acc, asr = evaluate(out, attack, test)
            print(f"{name:8} {form:9} {100 * acc:8.1f}% {100 * asr:5.1f}% {wall:7.1f}", flush=True)


if __name__ == "__main__":
    main()
