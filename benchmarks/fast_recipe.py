"""Search for the shortest recipe that trains a BadNets-10% model to a target C-Acc and ASR.

    python benchmarks/fast_recipe.py --epochs 10 15 20 30 --batch 512 --lr 0.4 --compile   # on a GPU
    python benchmarks/fast_recipe.py --model tiny_cnn --per-class 100 --epochs 1 2          # a CPU smoke run

Each ``--epochs`` value is one recipe: SGD with Nesterov momentum 0.9, the
``triangle`` schedule (linear warm-up over ``--warmup`` of the steps, then
linear decay to 0), ``--lr``, ``--batch``, ``--label-smoothing``, weight decay
5e-4, random crop + flip. Each runs through ``harness run``'s own path (a
matrix of BadNets at 10% poisoning, stamped before augmentation as
BackdoorBench does, the ``none`` defense, ``clean_acc`` and ``asr``) in one
work directory, so a rerun reuses what is done. The table gives each recipe's
train-job wall time (poisoning + training, the data already decoded),
images/s, C-Acc and ASR, and marks the shortest recipe that meets ``--target``
within ``--budget`` seconds. That recipe is the candidate for a named recipe
next to ``backdoorbench`` in ``harness/train.py``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tabulate import tabulate

from backdoor_harness.matrix import MatrixSpec, expand
from backdoor_harness.scheduler import run_matrix
from backdoor_harness.store import Store


def recipe(args: argparse.Namespace, epochs: int) -> dict:
    return {"base": "backdoorbench", "epochs": epochs, "batch_size": args.batch, "lr": args.lr,
            "schedule": "triangle", "warmup": args.warmup, "nesterov": True,
            "label_smoothing": args.label_smoothing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 15, 20, 30])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--model", default="preact_resnet18")
    parser.add_argument("--per-class", type=int, help="training images per class (default: all 5,000)")
    parser.add_argument("--target", type=float, nargs=2, default=[0.93, 0.99], metavar=("C_ACC", "ASR"))
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of train-job wall time")
    parser.add_argument("--compile", action="store_true", help="train through torch.compile")
    parser.add_argument("--device", default=None)
    parser.add_argument("--workdir", default="runs/fast-recipe")
    args = parser.parse_args(argv)
    if args.compile:
        os.environ["HARNESS_COMPILE"] = "1"

    data = {"name": "cifar10", **({"train_per_class": args.per_class} if args.per_class else {})}
    rows, best = [], None
    for epochs in sorted(args.epochs):
        spec = MatrixSpec.model_validate({
            "name": f"fast-recipe-e{epochs}", "datasets": [data], "models": [args.model],
            "attacks": [{"name": "badnets", "config": {"poison_rate": 0.1}}], "defenses": ["none"],
            "evaluators": ["clean_acc", "asr"], "seeds": [0], "recipe": recipe(args, epochs)})
        counts = run_matrix(spec, Path(args.workdir), device=args.device, progress=False)
        if counts["failed"] or counts["blocked"]:
            print(f"epochs {epochs}: some jobs failed; see `harness status --workdir {args.workdir}`")
            return 1
        store = Store(Path(args.workdir))
        recs = [store.get(job.key) for job in expand(spec)]
        store.close()
        train = next(r for r in recs if r.kind == "train" and r.status == "done")
        evals = {k: v for r in recs if r.kind == "evaluate" for k, v in r.metrics.items()}
        ok = (evals["clean_acc"] >= args.target[0] and evals["asr"] >= args.target[1]
              and train.wall_s <= args.budget)
        best = best or (epochs if ok else None)
        rows.append([epochs, f"{train.wall_s:.1f}", f"{train.metrics['images_per_s']:,.0f}",
                     f"{100 * evals['clean_acc']:.2f}", f"{100 * evals['asr']:.2f}", "yes" if ok else "",
                     train.device])
    print(tabulate(rows, headers=["epochs", "train wall s", "images/s", "C-Acc %", "ASR %", "meets target",
                                  "device"], tablefmt="github", disable_numparse=True))
    print(f"\nrecipe: batch {args.batch}, lr {args.lr}, triangle warm-up {args.warmup}, Nesterov, label smoothing "
          f"{args.label_smoothing}, wd 5e-4; target C-Acc >= {args.target[0]}, ASR >= {args.target[1]} "
          f"in <= {args.budget:.0f} s: " + (f"met first at {best} epochs" if best else "not met"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
