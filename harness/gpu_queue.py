"""The GPU queue: what still needs a GPU, in order (``benchmarks/gpu-queue.yaml``).

GPU time is lent now and then, a few minutes at a time, so the work that needs
it waits in one file, and ``scripts/device-run`` spends a lent GPU on it: it
runs the queued items in order, never starting one whose expected minutes (for
the device's kind) exceed the time left. An item is either a matrix (a config
under ``configs/``, optionally cut down to some of its labels with ``select``,
so one paper table can be split into items that each fit a call) or shell
commands (the speed benchmarks). Once run, its ``results`` say where the records
and tables went, with the date and the device.

    python -m backdoor_harness.gpu_queue check [--queue FILE]      # validate the file and every config it names
    python -m backdoor_harness.gpu_queue plan --kind h200 ...       # the items as JSON (used by scripts/device-run)
    python -m backdoor_harness.gpu_queue mark-done ID --summary summary.json --readme SECTION
                                                                    # after a run: the item done, with its results

A sub-matrix keeps the configs of its cells, so its job keys are those of the
same cells in the whole matrix: records of two items of one config merge.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import HarnessError

DEFAULT_QUEUE = "benchmarks/gpu-queue.yaml"
#: the axes of a matrix an item can select labels from
AXES = ("datasets", "models", "attacks", "defenses", "evaluators")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Select(_Frozen):
    """Labels to keep from a matrix, per axis (an axis left out keeps every entry).

    A label is an entry's ``label``, else its ``name`` (as in results and leaderboards)."""

    datasets: list[str] | None = None
    models: list[str] | None = None
    attacks: list[str] | None = None
    defenses: list[str] | None = None
    evaluators: list[str] | None = None


class Result(_Frozen):
    """Where one run of an item left its results."""

    records: str = Field(description="the exported record file (JSONL), e.g. leaderboard/records/X.h200.jsonl")
    readme: str | None = Field(default=None, description="the README section holding its table")
    date: datetime.date
    device: str = Field(min_length=1, description="e.g. NVIDIA H200")


class QueueItem(_Frozen):
    """One unit of GPU work, sized to fit one device call.

    Attributes:
        id: unique; letters, digits, '.', '_', '-' (it names files).
        description: one line.
        matrix: a matrix config (path from the repository root), run with ``harness run``.
        select: with ``matrix``: run only these labels of it.
        args: with ``matrix``: extra ``harness run`` arguments (e.g. ``--compile``).
        commands: shell commands, run in order from the repository root (``python3`` is the
            interpreter that runs device-run; ``$ITEM_OUT`` is a folder whose files come back).
        workdir: the work directory whose records are exported afterwards (default for a
            matrix: ``<workdir root>/<config name>``, shared by the items of one config).
        expected_min: expected minutes per device kind (``h200``, ``cpu``, ...), everything
            included (start-up, data, export).
        estimate: how ``expected_min`` was estimated.
        status: ``queued`` (runs when it fits), ``blocked`` (cannot fit any call yet; see
            ``blocked_by``) or ``done`` (see ``results``).
    """

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = Field(min_length=1)
    matrix: str | None = None
    select: Select | None = None
    args: list[str] = Field(default_factory=list)
    commands: list[str] = Field(default_factory=list)
    workdir: str | None = None
    expected_min: dict[str, float] = Field(min_length=1)
    estimate: str = Field(min_length=1)
    status: Literal["queued", "blocked", "done"] = "queued"
    blocked_by: str | None = None
    results: list[Result] = Field(default_factory=list)

    @field_validator("description")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if "\n" in value.strip():
            raise ValueError("a description is one line; put details in `estimate` or the config's header")
        return value.strip()

    @field_validator("expected_min")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not v > 0}
        if bad:
            raise ValueError(f"expected minutes must be > 0 (got {bad})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "QueueItem":
        if (self.matrix is None) == (not self.commands):
            raise ValueError("give either `matrix` (a config) or `commands` (shell commands), not both or neither")
        if self.commands and (self.select is not None or self.args):
            raise ValueError("`select` and `args` go with `matrix`, not with `commands`")
        if (self.status == "blocked") != bool(self.blocked_by):
            raise ValueError("`blocked_by` (what it waits for) is given exactly when status is `blocked`")
        if self.status == "done" and not self.results:
            raise ValueError("a `done` item lists its `results` (records, readme, date, device)")
        return self


class GpuQueue(_Frozen):
    """The queue file: ``items``, in the order they run."""

    items: list[QueueItem]

    @model_validator(mode="after")
    def _unique(self) -> "GpuQueue":
        ids = [i.id for i in self.items]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"item ids appear twice: {dup}; give each item its own id")
        return self

    def get(self, item_id: str) -> QueueItem:
        for item in self.items:
            if item.id == item_id:
                return item
        raise HarnessError(f"no item {item_id!r} in the queue (its ids: {', '.join(i.id for i in self.items)})")


def load_queue(path: str | Path) -> GpuQueue:
    """Read and validate a queue file (HarnessError naming the file and the key otherwise)."""
    from .matrix import read_yaml_mapping

    path = Path(path)
    raw = read_yaml_mapping(path, f"no such queue file (the GPU queue is {DEFAULT_QUEUE})",
                            "a queue file is a mapping with one key, `items` (a list)")
    return _validated(raw, str(path))


def _validated(raw: Any, where: str) -> GpuQueue:
    """``raw`` (a queue file's YAML) as a queue, or one HarnessError naming ``where`` and the key."""
    from .registry import format_validation_error

    try:
        return GpuQueue.model_validate(raw)
    except ValidationError as err:
        raise HarnessError(format_validation_error(err, where)) from None


def _label(entry: Any) -> str:
    if isinstance(entry, str):
        return entry
    return entry.get("label") or entry["name"]


def sub_matrix(item: QueueItem, root: str | Path = ".") -> dict[str, Any]:
    """The raw matrix an item runs: its config, cut to ``select``'s labels.

    ``per_attack`` entries of attacks left out are dropped; every other value is
    kept, so each cell runs with the config (and job key) it has in the whole matrix.
    """
    if item.matrix is None:
        raise HarnessError(f"queue item {item.id!r} runs commands, not a matrix")
    path = Path(root) / item.matrix
    if not path.exists():
        raise HarnessError(f"queue item {item.id!r}: matrix {item.matrix} does not exist (paths are from the "
                           f"repository root)")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise HarnessError(f"queue item {item.id!r}: {item.matrix} is not a matrix file")
    if item.select is None:
        return raw
    out = dict(raw)
    for axis in AXES:
        keep = getattr(item.select, axis)
        if keep is None:
            continue
        entries = raw.get(axis) or []
        labels = [_label(e) for e in entries]
        unknown = sorted(set(keep) - set(labels))
        if unknown:
            raise HarnessError(f"queue item {item.id!r}: select.{axis} names {unknown}, not in {item.matrix} "
                               f"(its {axis}: {', '.join(labels)})")
        out[axis] = [e for e, lab in zip(entries, labels) if lab in keep]
    attacks = {_label(a) for a in out.get("attacks") or []}
    for axis in ("defenses", "evaluators"):
        cut = []
        for entry in out.get(axis) or []:
            if isinstance(entry, dict) and entry.get("per_attack"):
                entry = {**entry, "per_attack": {k: v for k, v in entry["per_attack"].items() if k in attacks}}
                if not entry["per_attack"]:
                    del entry["per_attack"]
            cut.append(entry)
        out[axis] = cut
    return out


def item_workdir(item: QueueItem, workdir_root: str | Path = "runs/device") -> str | None:
    """Where an item's records land: ``workdir``, else for a matrix ``<root>/<config stem>``."""
    if item.workdir:
        return item.workdir
    if item.matrix:
        return str(Path(workdir_root) / Path(item.matrix).stem)
    return None


def check_queue(queue: GpuQueue, root: str | Path = ".") -> list[str]:
    """Validate every matrix the queue names (as each item runs it); one line per item."""
    import tempfile

    from .matrix import expand, load_matrix

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for item in queue.items:
            if item.matrix is None:
                lines.append(f"{item.id}: {len(item.commands)} command(s)")
                continue
            full = load_matrix(Path(root) / item.matrix)  # the config itself validates
            path = Path(tmp) / f"{item.id}.yaml"
            path.write_text(yaml.safe_dump(sub_matrix(item, root), sort_keys=False))
            try:
                jobs = expand(load_matrix(path))
            except HarnessError as err:
                raise HarnessError(f"queue item {item.id!r} ({item.matrix} with its select): {err}") from None
            lines.append(f"{item.id}: {item.matrix} ({full.name}), {len(jobs)} jobs")
    return lines


def plan(queue: GpuQueue, kind: str, items: list[str] | None, matrix_dir: str | Path,
         workdir_root: str | Path = "runs/device", root: str | Path = ".") -> list[dict[str, Any]]:
    """The items to consider, in order, each with what device-run needs (JSON-able).

    Without ``items``: every item in file order; device-run runs the ``queued`` ones.
    With ``items``: those, in the order given (``requested`` true: run whatever their status).
    A matrix item's sub-matrix is written to ``matrix_dir/<id>.yaml``.
    """
    chosen = [queue.get(i) for i in items] if items else list(queue.items)
    matrix_dir = Path(matrix_dir)
    out = []
    for item in chosen:
        entry = {"id": item.id, "description": item.description, "status": item.status,
                 "blocked_by": item.blocked_by, "requested": bool(items),
                 "expected_min": item.expected_min.get(kind), "kinds": sorted(item.expected_min),
                 "workdir": item_workdir(item, workdir_root), "args": list(item.args),
                 "commands": list(item.commands), "matrix": None, "config": item.matrix}
        if item.matrix is not None:
            matrix_dir.mkdir(parents=True, exist_ok=True)
            path = matrix_dir / f"{item.id}.yaml"
            path.write_text(f"# queue item {item.id}: {item.matrix}" + (" (select)" if item.select else "") +
                            "\n" + yaml.safe_dump(sub_matrix(item, root), sort_keys=False))
            entry["matrix"] = str(path)
        out.append(entry)
    return out


def summary_result(summary: str | Path, item_id: str, records_dir: str = "leaderboard/records") -> dict[str, Any]:
    """An item's result from scripts/device-run's ``summary.json`` (in its packed ``.tar.gz``): the
    records file under ``records_dir`` (named as device-run exported it), the run's date and device.
    HarnessError when the summary does not say the item ran or exported records."""
    path = Path(summary)
    try:
        doc = json.loads(path.read_text())
        rows = [r for r in doc["items"] if r.get("id") == item_id]
        device, started = doc["device"], doc["started"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise HarnessError(f"{path}: not a device-run summary.json ({type(err).__name__}: {err})") from None
    if not rows:
        raise HarnessError(f"{path}: item {item_id!r} is not in this run (its items: "
                           f"{', '.join(str(r.get('id')) for r in doc['items']) or '(no items)'})")
    row = rows[-1]
    if row.get("result") != "ran":
        raise HarnessError(f"{path}: item {item_id!r} did not run to the end ({row.get('result')}: {row.get('why')}); "
                           f"mark it done by hand, with --records, --date and --device, if its records are complete")
    if not row.get("records"):
        raise HarnessError(f"{path}: item {item_id!r} exported no records; give --records")
    return {"records": f"{records_dir}/{Path(row['records']).name}", "date": str(started)[:10], "device": device}


def mark_done(text: str, item_id: str, result: Result) -> str:
    """The queue file's ``text`` with ``item_id`` marked ``done`` and ``result`` added to its
    ``results`` (``status`` and ``blocked_by`` replaced; every other line, comments included, kept).

    The edit works on the file's lines (an item is its ``- id: ID`` line and the indented lines
    under it), then the result is validated: HarnessError unless exactly that item changed, as asked.
    """
    before = _parse(text, "the queue")
    old = before.get(item_id)
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if re.fullmatch(r"-\s+id:\s*['\"]?" + re.escape(item_id) + r"['\"]?\s*", line)]
    if len(starts) != 1:
        raise HarnessError(f"item {item_id!r}: no `- id: {item_id}` line of its own at the start of a line; edit the "
                           f"queue by hand")
    start = starts[0]
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith((" ", "\t"))):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # the blank lines before the next item stay there
        end -= 1
    body, skip = [], False
    for line in lines[start + 1:end]:
        key = re.match(r"^  ([A-Za-z_]+):", line)
        if key:
            skip = key[1] in ("status", "blocked_by", "results")
        elif not line.startswith("   ") and line.strip() and not line.startswith("  - "):
            skip = False
        if not skip:
            body.append(line)
    results = [r.model_dump(mode="json", exclude_none=True) for r in (*old.results, result)]
    dumped = yaml.safe_dump(results, sort_keys=False, allow_unicode=True, width=1000).rstrip("\n").split("\n")
    body += ["  status: done", "  results:", *(f"  {line}" for line in dumped)]
    new_text = "\n".join(lines[:start + 1] + body + lines[end:])
    after = _parse(new_text, "the edited queue")
    want = old.model_copy(update={"status": "done", "blocked_by": None, "results": [*old.results, result]})
    others = [i for i in before.items if i.id != item_id]
    if after.get(item_id) != want or [i for i in after.items if i.id != item_id] != others:
        raise HarnessError(f"item {item_id!r}: the edit would change more than its status and results (the item "
                           f"spans lines {start + 1}-{end}); edit the queue by hand")
    return new_text


def _parse(text: str, what: str) -> GpuQueue:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise HarnessError(f"{what} is not YAML ({err})") from None
    return _validated(raw, what)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m backdoor_harness.gpu_queue", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("check", help="validate the queue and every matrix it names (as each item runs it)")
    s.add_argument("--queue", default=DEFAULT_QUEUE)
    s = sub.add_parser("plan", help="the items to consider, as JSON; writes each matrix item's sub-matrix")
    s.add_argument("--queue", default=DEFAULT_QUEUE)
    s.add_argument("--kind", required=True, help="the device kind whose expected minutes apply (h200, cpu, ...)")
    s.add_argument("--items", nargs="*", help="these ids, in this order (default: all, in file order)")
    s.add_argument("--matrix-dir", required=True, help="where to write the items' sub-matrices")
    s.add_argument("--workdir-root", default="runs/device")
    s = sub.add_parser("mark-done", help="mark an item done with its results (the other lines of the file kept)")
    s.add_argument("item")
    s.add_argument("--queue", default=DEFAULT_QUEUE)
    s.add_argument("--summary", help="device-run's summary.json: the records file, date and device of its run")
    s.add_argument("--records", help="the records file, from the repository root (default: from --summary, under "
                                     "leaderboard/records/)")
    s.add_argument("--readme", help="the title of the README section that holds its table")
    s.add_argument("--date", help="YYYY-MM-DD (default: from --summary)")
    s.add_argument("--device", help="e.g. 'NVIDIA H200' (default: from --summary)")
    args = p.parse_args(argv)
    try:
        if args.command == "mark-done":
            return _mark_done_command(args)
        queue = load_queue(args.queue)
        if args.command == "check":
            for line in check_queue(queue):
                print(line)
            print(f"{args.queue}: valid; {len(queue.items)} items "
                  f"({', '.join(f'{sum(i.status == s for i in queue.items)} {s}' for s in ('queued', 'blocked', 'done'))})")
        else:
            print(json.dumps(plan(queue, args.kind, args.items, args.matrix_dir, args.workdir_root), indent=1))
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _mark_done_command(args: argparse.Namespace) -> int:
    fields = summary_result(args.summary, args.item) if args.summary else {}
    fields.update({k: v for k in ("records", "date", "device") if (v := getattr(args, k)) is not None})
    missing = [k for k in ("records", "date", "device") if k not in fields]
    if missing:
        raise HarnessError(f"mark-done {args.item}: give --summary or --{', --'.join(missing)}")
    try:
        result = Result.model_validate({**fields, "readme": args.readme})
    except ValidationError as err:
        from .registry import format_validation_error

        raise HarnessError(format_validation_error(err, f"mark-done {args.item}")) from None
    path = Path(args.queue)
    load_queue(path).get(args.item)  # the file's own errors named as `check` names them, then an unknown id
    if not Path(result.records).is_file():
        raise HarnessError(f"mark-done {args.item}: {result.records} does not exist; copy the run's records there "
                           f"first (from the run's .tar.gz: records/{Path(result.records).name})")
    from .store import write_atomic

    write_atomic(path, mark_done(path.read_text(), args.item, result))
    print(f"{path}: {args.item} done: {result.records}" + (f" (README: {result.readme})" if result.readme else "")
          + f", {result.date}, {result.device}; now run `make readme-tables`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
