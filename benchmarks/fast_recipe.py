"""Search for the shortest recipe that trains a BadNets-10% model to a target C-Acc and ASR.

    python benchmarks/fast_recipe.py --epochs 10 15 20 30 --batch 512 --lr 0.1 --compile     # on a GPU
    python benchmarks/fast_recipe.py --model resnet18 --epochs 15 --batch 512 1024 --compile default reduce-overhead
    python benchmarks/fast_recipe.py --model tiny_cnn --per-class 100 --epochs 1 2            # a CPU smoke run

Each ``--epochs`` value and ``--batch`` size is one recipe: SGD with Nesterov
momentum 0.9, the ``triangle`` schedule (linear warm-up over ``--warmup`` of the
steps, then linear decay to 0), ``--label-smoothing``, weight decay 5e-4, random
crop + flip, and a peak learning rate of ``--lr`` at ``--lr-ref-batch`` images
per step, scaled to the batch size (``--lr-scale``, default ``linear``: lr 0.1
at batch 128 is 0.4 at batch 512; the recipe's ``lr_scale``, so it is in the
job keys). Each runs through ``harness run``'s own path (a matrix of BadNets at
10% poisoning, stamped before augmentation as BackdoorBench does, the ``none``
defense, ``clean_acc`` and ``asr``) in one work directory, so a rerun reuses
what is done. ``--compile [MODE ...]`` trains through ``torch.compile``
(``harness run --compile MODE``); with several modes each gets its own work
directory, ``WORKDIR/<mode>``, and its own rows (a compile mode is not part of a
job's key: one work directory holds the runs of one setting).

The table gives each recipe's learning rate, train-job wall time (poisoning +
training, the data already decoded), images/s, peak GPU memory (the train
record's ``peak_mem_mib``; ``-`` on the CPU), C-Acc and ASR, and the summary
names the fastest recipe that meets ``--target`` within ``--budget`` seconds.
That recipe is the candidate for a named ``fast`` recipe next to
``backdoorbench`` in ``harness/train.py`` (configs/fast-recipe-check.yaml then
checks the papers' phenomena with it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tabulate import tabulate

import machine
from backdoor_harness.errors import HarnessError
from backdoor_harness.matrix import MatrixSpec, expand
from backdoor_harness.scheduler import run_matrix
from backdoor_harness.store import Store
from backdoor_harness.train import COMPILE_MODES, compile_mode


def recipe(args: argparse.Namespace, epochs: int, batch: int) -> dict:
    scale = {} if args.lr_scale == "none" else {"lr_scale": args.lr_scale, "lr_ref_batch": args.lr_ref_batch}
    return {"base": "backdoorbench", "epochs": epochs, "batch_size": batch, "lr": args.lr, **scale,
            "schedule": "triangle", "warmup": args.warmup, "nesterov": True,
            "label_smoothing": args.label_smoothing}


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/core/test_queue.py parses the GPU queue's commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 15, 20, 30])
    parser.add_argument("--batch", type=int, nargs="+", default=[512])
    parser.add_argument("--lr", type=float, default=0.1, help="peak lr at --lr-ref-batch (default 0.1)")
    parser.add_argument("--lr-scale", choices=["linear", "sqrt", "none"], default="linear",
                        help="scale --lr to each batch size: linearly (default), by the square root, or not")
    parser.add_argument("--lr-ref-batch", type=int, default=128, help="the batch size --lr is for (default 128)")
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--model", default="preact_resnet18")
    parser.add_argument("--per-class", type=int, help="training images per class (default: all 5,000)")
    parser.add_argument("--target", type=float, nargs=2, default=[0.93, 0.99], metavar=("C_ACC", "ASR"))
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of train-job wall time")
    parser.add_argument("--compile", nargs="*", metavar="MODE",
                        help=f"train through torch.compile in each MODE ({', '.join(COMPILE_MODES)}; "
                             "none given: default), rows per mode")
    parser.add_argument("--device", default=None)
    parser.add_argument("--workdir", default="runs/fast-recipe")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        modes = ([None] if args.compile is None
                 else list(dict.fromkeys(compile_mode(v) for v in args.compile or ["default"])))
        for mode in modes:
            machine.use_compile(mode)  # validated before anything runs
        machine.use_compile(None)
    except HarnessError as err:
        parser.error(str(err))

    data = {"name": "cifar10", **({"train_per_class": args.per_class} if args.per_class else {})}
    rows, best = [], None
    for mode in modes:
        machine.use_compile(mode)
        workdir = Path(args.workdir) / (mode or "eager") if len(modes) > 1 else Path(args.workdir)
        for batch in args.batch:
            for epochs in sorted(args.epochs):
                spec = MatrixSpec.model_validate({
                    "name": f"fast-recipe-e{epochs}-b{batch}", "datasets": [data], "models": [args.model],
                    "attacks": [{"name": "badnets", "config": {"poison_rate": 0.1}}], "defenses": ["none"],
                    "evaluators": ["clean_acc", "asr"], "seeds": [0], "recipe": recipe(args, epochs, batch)})
                counts = run_matrix(spec, workdir, device=args.device, progress=False)
                if counts["failed"] or counts["blocked"]:
                    print(f"epochs {epochs}, batch {batch}: some jobs failed; see "
                          f"`harness status --workdir {workdir}`")
                    return 1
                store = Store(workdir)
                recs = [store.get(job.key) for job in expand(spec)]
                store.close()
                train = next(r for r in recs if r.kind == "train" and r.status == "done")
                evals = {k: v for r in recs if r.kind == "evaluate" for k, v in r.metrics.items()}
                ok = (evals["clean_acc"] >= args.target[0] and evals["asr"] >= args.target[1]
                      and train.wall_s <= args.budget)
                what = f"{epochs} epochs, batch {batch}" + (f", compile {mode}" if mode else "")
                if ok and (best is None or train.wall_s < best[1]):
                    best = (what, train.wall_s)
                mem = train.metrics.get("peak_mem_mib")
                rows.append([epochs, batch, f"{spec.recipe.effective_lr:g}", mode or "-",
                             f"{train.wall_s:.1f}", f"{train.metrics['images_per_s']:,.0f}",
                             f"{mem:,.0f}" if mem is not None else "-", f"{100 * evals['clean_acc']:.2f}",
                             f"{100 * evals['asr']:.2f}", "yes" if ok else "", train.device])
    machine.use_compile(None)
    print(tabulate(rows, headers=["epochs", "batch", "lr", "compile", "train wall s", "images/s", "peak MiB",
                                  "C-Acc %", "ASR %", "meets target", "device"],
                   tablefmt="github", disable_numparse=True))
    scale = (f"{args.lr}, not scaled" if args.lr_scale == "none" else
             f"{args.lr} at batch {args.lr_ref_batch}, scaled to the batch size ({args.lr_scale})")
    print(f"\nrecipe: {args.model}, lr {scale}, triangle warm-up {args.warmup}, Nesterov, label smoothing "
          f"{args.label_smoothing}, wd 5e-4; target C-Acc >= {args.target[0]}, ASR >= {args.target[1]} "
          f"in <= {args.budget:.0f} s: " + (f"met, fastest by {best[0]} ({best[1]:.1f} s)" if best else "not met"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
