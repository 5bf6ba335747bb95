"""The ``harness`` command: list, validate, run, golden, preflight, verify, status, show, export, leaderboard."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from .errors import HarnessError

KIND_OF = {"attacks": "attack", "defenses": "defense", "evaluators": "evaluator", "datasets": "dataset"}


def _workdir(args, spec=None) -> Path:
    if args.workdir:
        return Path(args.workdir)
    return Path("runs") / (spec.name if spec is not None else "default")


def cmd_list(args) -> int:
    from tabulate import tabulate

    from .registry import plugin_table

    kinds = [KIND_OF[args.kind]] if args.kind else list(KIND_OF.values())
    for kind in kinds:
        table = plugin_table(kind)
        rows = []
        for name in sorted(table):
            cls, package = table[name]
            row = [name, cls.version, cls.summary, package]
            if kind == "defense":  # what a defense requires, and the model families it runs on
                needs = cls().needs if isinstance(cls.needs, property) else cls.needs  # config-dependent: defaults
                families = "all" if "*" in cls.families else ",".join(sorted(cls.families))
                row += [",".join(sorted(needs)) or "-", families]
            if kind == "attack":  # the default config's trigger: the reference one, or what replaces it
                row += [cls().substitute or "-"]
            rows.append(row)
        headers = ["name", "version", "summary", "package"] + (["needs", "model families"] if kind == "defense" else [])
        headers += ["substitute (default config)"] if kind == "attack" else []
        print(f"{kind}s ({len(rows)})")
        print(tabulate(rows, headers=headers, tablefmt="simple"))
        print()
    return 0


def cmd_validate(args) -> int:
    from .matrix import expand, load_matrix

    spec = load_matrix(args.spec)
    jobs = expand(spec)
    kinds = {k: sum(j.kind == k for j in jobs) for k in ("prepare", "train", "purify", "evaluate")}
    print(f"{args.spec}: valid; {len(jobs)} jobs ({', '.join(f'{v} {k}' for k, v in kinds.items())})")
    return 0


def cmd_run(args) -> int:
    from .matrix import load_matrix
    from .scheduler import run_matrix
    from .train import compile_mode, export_compile_mode

    spec = load_matrix(args.spec)
    if args.workers < 1 or args.retries < 0:
        raise HarnessError(f"--workers {args.workers} --retries {args.retries}: workers must be at least 1 and "
                           f"retries at least 0")
    devices = args.devices.split(",") if args.devices else None
    if args.compile is not None:
        export_compile_mode(args.compile)  # a bad mode stops here, before any job
    else:
        compile_mode(os.environ.get("HARNESS_COMPILE"))  # a bad HARNESS_COMPILE: the same message, at once
    workdir = _workdir(args, spec)
    counts = run_matrix(spec, workdir, device=args.device, progress=not args.no_progress,
                        workers=args.workers, devices=devices, retries=args.retries, executor=args.executor,
                        address=args.address)
    plots = write_plots(workdir)
    if plots:
        print(f"curve plots: {len(plots) // 2} in {plots[0].parent}")
    if counts["failed"] or counts["blocked"]:
        print(f"some cells did not finish (see `harness status --workdir {_workdir(args, spec)}`)", file=sys.stderr)
        return 1
    return 0


def write_plots(workdir: Path) -> list[Path]:
    """The curve plots of a work directory's evaluations (``artifacts/plots/``, see
    :func:`backdoor_harness.leaderboard.plots.write_curve_plots`; axis labels from the records'
    metric metadata); returns the files written."""
    from .leaderboard.plots import write_curve_plots
    from .results import upgrade_all
    from .store import Store

    store = Store(workdir)
    try:
        return write_curve_plots(upgrade_all(store.records("evaluate")), store.artifacts / "plots")
    finally:
        store.close()


def _store(args):
    from .store import Store

    wd = _workdir(args)
    if not (wd / "results.sqlite").exists():
        raise HarnessError(f"{wd} holds no results; run `harness run SPEC --workdir {wd}` first")
    return Store(wd)


def cmd_status(args) -> int:
    from tabulate import tabulate

    from .status import load_jobs, summarize
    from .store import active_runs

    store = _store(args)
    recs = list(store.records())
    jobs = load_jobs(store.workdir)
    info = summarize(recs, jobs)
    rows = [[k, s, n] for (k, s), n in sorted(info["counts"].items())]
    print(tabulate(rows, headers=["kind", "status", "jobs"], tablefmt="simple"))
    runs = active_runs(store.workdir)
    active = f"{len(runs)} run(s) active ({'; '.join(runs.values())})" if runs else "no run is active"
    print(f"\n{active} in {store.workdir}")
    claims = store.claims()
    from .leaderboard.render import plain  # a record's text reaches the terminal without escape sequences

    for r in info["running"]:  # a running record without a live run's claim was interrupted
        where = f"on {plain(r.device or '?')}, for {info['now'] - (r.started or info['now']):.0f} s"
        print(f"{'running' if r.key in claims else 'interrupted':11} {r.key[:12]} {plain(r.label)} ({where})")
    for r in recs:
        if r.status in ("failed", "blocked", "skipped"):
            reason = (r.error or "").strip().split("\n")[-1]
            print(f"{r.status:11} {r.key[:12]} {plain(r.label)}: {plain(reason)}")
    if info["seconds_left"] is not None:
        extra = f" (+ {info['unestimated']} jobs of a kind none has finished yet)" if info["unestimated"] else ""
        print(f"estimated time left: {info['seconds_left'] / 60:.1f} min on one worker{extra}")
    return 0


def cmd_show(args) -> int:
    """One record as JSON: config, versions, timings, metrics and, for an evaluation, ``predictions``
    (``role:split`` -> its predictions file in the work directory)."""
    store = _store(args)
    found = store.find(args.key)
    if not found:
        raise HarnessError(f"no job with a key starting {args.key!r} in {store.workdir}; see `harness status`")
    if len(found) > 1:
        raise HarnessError(f"{args.key!r} matches {len(found)} jobs; give more characters of the key")
    print(json.dumps(found[0].model_dump(), indent=2))
    return 0


def golden_command(args) -> str:
    """The command line that regenerates a golden file as ``args`` wrote it: its arguments as given
    (from the same folder), the options that choose where and how the runs go, and the CPU thread
    count when ``OMP_NUM_THREADS`` set it (CPU numbers depend on it)."""
    words = ["harness", "golden", args.spec, "--seeds", *map(str, args.seeds), "--out", args.out]
    for flag, value in (("--workdir", args.workdir), ("--device", args.device)):
        if value is not None:
            words += [flag, value]
    if args.workers != 1:
        words += ["--workers", str(args.workers)]
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={shlex.quote(threads)} " if threads else "") + shlex.join(words)


def cmd_golden(args) -> int:
    from .golden import make_golden, write_golden
    from .matrix import load_matrix
    from .results import collect
    from .scheduler import run_matrix
    from .store import Store

    if args.workers < 1:
        raise HarnessError(f"--workers {args.workers}: workers must be at least 1")
    spec = load_matrix(args.spec).model_copy(update={"seeds": args.seeds})
    workdir = _workdir(args, spec)
    counts = run_matrix(spec, workdir, device=args.device, progress=not args.no_progress, workers=args.workers)
    if counts["failed"] or counts["blocked"]:
        raise HarnessError(f"some cells did not finish (see `harness status --workdir {workdir}`); "
                           f"golden values need every seed's run; fix and rerun the same command")
    store = Store(workdir)
    try:
        records = list(store.records())
    finally:
        store.close()
    runs = {seed: collect(r for r in records if r.attrs.seed == seed) for seed in args.seeds}
    write_golden(make_golden(runs, spec, golden_command(args)), args.out)
    print(f"wrote {args.out} ({len(args.seeds)} seeds)")
    return 0


def cmd_export(args) -> int:
    n = _store(args).export_jsonl(args.out)
    print(f"wrote {n} records to {args.out}")
    return 0


def cmd_leaderboard(args) -> int:
    from .leaderboard.render import load_reported, render
    from .submission import add_submission, read_records

    if args.add:
        added, known, target = add_submission(args.add, args.published, verify=args.verify, seed=args.seed,
                                               device=args.device)
        checked = f", {args.verify} evaluation(s) re-run and verified" if args.verify else ""
        print(f"{args.add}: accepted{checked}; {added} record(s) added to {target}, {known} already published")
        return 0
    if args.verify:
        raise HarnessError("--verify N goes with --add FILE (to re-run a file without adding it: harness verify FILE)")
    if args.wide and args.long:
        raise HarnessError("--wide and --long are two forms of the board (a row per defense, or per attack and "
                           "defense): give one of them")
    if args.width is not None and args.width < 0:
        raise HarnessError(f"--width {args.width}: a number of columns, 0 or more (0: never split a board)")
    if args.explain and args.format not in ("text", "markdown"):
        raise HarnessError(f"--explain goes with --format text or markdown (not {args.format}): it reads the "
                           f"board aloud under it")
    sources, verified = None, set()
    if args.records:  # one set of boards per file (e.g. one per published run)
        from .verify import load_verified

        files = [(Path(path).name.split(".")[0], read_records(path)) for path in args.records]
        verified = {key for path in args.records for key in load_verified(path)}
        records = [r for _, recs in files for r in recs]
        sources = [name for name, recs in files for _ in recs] if len(files) > 1 else None
    else:
        records = list(_store(args).records())
    reported = None
    if args.reported:
        if not Path(args.reported).exists():
            raise HarnessError(f"--reported {args.reported}: no such file (a YAML list of published numbers; "
                               f"see leaderboard/reported.yaml)")
        reported = load_reported(args.reported)
    width = 0 if args.wide else args.width  # None: the format's own (100 columns for text, unsplit markdown)
    text = render(records, args.format, reported, long=args.long, sources=sources, verified=verified,
                  width=width, explain=args.explain)
    if args.out:
        _write_out(Path(args.out), text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def _write_out(path: Path, text: str) -> None:
    """``leaderboard --out``: all or nothing (:func:`~backdoor_harness.store.write_atomic`), a failure one message."""
    from .store import no_space, write_atomic

    try:
        write_atomic(path, text)
    except OSError as err:
        fix = ("the disk is full: free some space, or give --out a path on another disk"
               if no_space(err)
               else "give --out a path in an existing folder you can write to (or no --out: print the board)")
        raise HarnessError(f"--out {path}: cannot write it ({err.strerror or err}); nothing was written: "
                           f"{fix}") from None


def cmd_verify(args) -> int:
    from .submission import verify_submission as verify

    result = verify(args.file, args.sample, seed=args.seed, device=args.device, published=args.published,
                    workdir=args.workdir)
    print(result.table())
    bad = result.mismatches()
    if bad:
        print(f"{args.file}: {len(bad)} mismatch(es) in {len(result.cells)} re-run evaluation(s) "
              f"(--seed {result.seed}, {result.device}):\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    print(f"{args.file}: {len(result.cells)} re-run evaluation(s) match the claims (--seed {result.seed}, "
          f"{result.device})")
    return 0


def cmd_preflight(args) -> int:
    from .preflight import main

    return main(args.args, prog="harness preflight")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description="Benchmark backdoor attacks and purification defenses.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("list", help="installed attacks, defenses, evaluators, data sets")
    s.add_argument("kind", nargs="?", choices=sorted(KIND_OF))
    s.set_defaults(func=cmd_list)
    s = sub.add_parser("validate", help="check a matrix file and count its jobs")
    s.add_argument("spec")
    s.set_defaults(func=cmd_validate)
    s = sub.add_parser("run", help="run (or resume) a matrix")
    s.add_argument("spec")
    s.add_argument("--workdir", help="results and artifacts (default runs/<matrix name>)")
    s.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    s.add_argument("--no-progress", action="store_true", help="no progress meter")
    s.add_argument("--workers", type=int, default=1,
                   help="worker processes per device (default 1: jobs run in this process)")
    s.add_argument("--devices", help="GPUs for the workers, e.g. 0,1 (default: every visible GPU, else the CPU)")
    s.add_argument("--retries", type=int, default=2, help="runs of a job whose worker died (default 2)")
    s.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local (this process, or --workers processes) or ray (pip install backdoor-harness[ray])")
    s.add_argument("--address", help="with --executor ray: the cluster to join (auto: the running one)")
    s.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                   help="train through torch.compile in MODE: default (without MODE), reduce-overhead, "
                        "max-autotune or max-autotune-no-cudagraphs (sets HARNESS_COMPILE=MODE, which workers "
                        "and Ray actors inherit; worth it on GPUs, see benchmarks/); after SPEC, or as --compile=MODE")
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("golden", help="measure a matrix over several seeds and write golden numbers")
    s.add_argument("spec")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="default 0 1 2 3 4")
    s.add_argument("--out", required=True, help="the golden file to write (YAML)")
    s.add_argument("--workdir", help="where the runs go (default runs/<matrix name>)")
    s.add_argument("--workers", type=int, default=1,
                   help="worker processes (default 1: jobs run in this process); the seeds' jobs run side by side")
    s.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    s.add_argument("--no-progress", action="store_true", help="no progress meter")
    s.set_defaults(func=cmd_golden)
    s = sub.add_parser("verify", help="re-run sampled evaluations of an exported run here and compare with its "
                                      "numbers (exit 1 on a mismatch)")
    s.add_argument("file", help="an exported run (harness export), as for `harness leaderboard --add`")
    s.add_argument("--sample", type=int, default=1, help="how many of its evaluations to re-run (default 1)")
    s.add_argument("--seed", type=int, help="the draw of evaluations (default: a random one, printed)")
    s.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    s.add_argument("--published", default="leaderboard/published.yaml",
                   help="the published leaderboard's definition (default leaderboard/published.yaml)")
    s.add_argument("--workdir", help="keep the re-run here (default: a temporary folder, removed)")
    s.set_defaults(func=cmd_verify)
    # its arguments are the preflight module's own (parsed there, so building this parser imports no torch)
    s = sub.add_parser("preflight", add_help=False, help="every plugin in one tiny job on a device, within a time "
                                                         "budget (harness preflight --help)")
    s.add_argument("args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_preflight)
    for name, func, helptext in (("status", cmd_status, "what is done, failed, skipped"),
                                 ("show", cmd_show, "one job's record (an evaluation's names the prediction files it "
                                                            "read: backdoor_harness.predictions.load)"),
                                 ("export", cmd_export, "write a run's records as JSONL (for --add)"),
                                 ("leaderboard", cmd_leaderboard, "render the results, or add a submission")):
        s = sub.add_parser(name, help=helptext)
        if name == "show":
            s.add_argument("key", help="a job key or its prefix")
        if name == "leaderboard":
            s.add_argument("--format", choices=["text", "markdown", "html", "json"], default="text")
            s.add_argument("--out", help="write to this file instead of stdout")
            s.add_argument("--reported", help="published numbers to show beside the measured ones "
                                              "(default: the leaderboard's reported.yaml)")
            s.add_argument("--long", action="store_true", help="text/markdown: a row per (attack, defense) cell")
            s.add_argument("--width", type=int, metavar="N",
                           help="text/markdown: fit each board in N columns: a board whose wide table is wider "
                                "shows one block per attack, then one of averages (the device said once under "
                                "it when every row ran on the same); text lines wrap at spaces; a number is never "
                                "cut (0: never split or wrap; default 100 for text, 0 for markdown)")
            s.add_argument("--wide", action="store_true",
                           help="text/markdown: each board as one wide table (a row per defense, a column per "
                                "attack and metric), however wide; the same as --width 0")
            s.add_argument("--explain", action="store_true",
                           help="text/markdown: after the boards, what to look at first: per attack, the "
                                "undefended attack success rate and what each defense leaves of it")
            s.add_argument("--records", nargs="+",
                           help="render these exported JSONL files instead of a workdir (each file its own boards)")
            s.add_argument("--add", metavar="FILE", help="validate an exported run and add it to the published "
                                                         "records (refused with the reasons otherwise)")
            s.add_argument("--published", default="leaderboard/published.yaml",
                           help="the published leaderboard's definition (default leaderboard/published.yaml)")
            s.add_argument("--verify", type=int, default=0, metavar="N",
                           help="with --add: first re-run N of its evaluations here (harness verify); a mismatch "
                                "refuses it, matches are recorded as verified beside the records")
            s.add_argument("--seed", type=int, help="with --verify: the draw of evaluations (default: random)")
            s.add_argument("--device", help="with --verify: torch device (default: cuda if available, else cpu)")
        if name == "export":
            s.add_argument("--out", required=True, help="the JSONL file to write")
        s.add_argument("--workdir", default=None, help="default runs/default")
        s.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] == ["preflight"]:  # everything after it is the preflight's own arguments
        args = parser.parse_args(["preflight"])
        args.args = argv[1:]
    else:
        args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`harness leaderboard | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141


if __name__ == "__main__":
    sys.exit(main())
