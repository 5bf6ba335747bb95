"""Exporting results and accepting them into the published leaderboard.

``harness export`` writes a run's records as JSONL, one :class:`JobRecord`
per line (ASCII-escaped JSON: no line separator of any kind inside a line),
validated against the record schema (``schema_version``; the JSON Schema is
``leaderboard/schema/record-v<N>.json``, generated from :class:`JobRecord`
and checked against it by the tests).

``harness leaderboard --add FILE`` accepts a submission only when every line
passes every check below; otherwise it refuses the whole file, naming
``file:line`` and why for each problem, and writes nothing.

Before parsing
    the file is at most :data:`MAX_FILE_BYTES`, each line at most
    :data:`MAX_LINE_BYTES`, UTF-8; lines are split on ``\\n`` only.
Each line
    one JSON object of the current schema version (NaN, Infinity and numbers
    that overflow a float are refused, nesting is bounded), a valid
    :class:`JobRecord`, status ``done``, made by the installed harness version.
Against the job it names
    its ``key`` is the hash the harness computes from the record's own kind,
    config, upstream keys (``deps``) and plugin versions
    (:func:`backdoor_harness.jobs.job_key`), and it is the key of a job of a
    published matrix (``leaderboard/published.yaml``, expanded by the
    installed harness); the record's kind, label, cell (``attrs``: data set,
    model, attack, poison rate, defense, evaluator, seed), config, versions,
    deps, plugin facts and metric metadata are that job's, and so are its
    upstream jobs by role (``upstream``) when it names them (records written
    before the field existed leave it empty: their ``deps`` carry the keys).
Its results
    an evaluation's metrics are the ones its evaluator declares
    (:attr:`EvaluateJob.metrics`), each a finite number (a curve: a list of
    them; never a string, a bool or null) inside the metric's declared
    ``range``; ``artifact`` is null or ``artifacts/<key>.safetensors`` (never
    a path elsewhere), ``artifact_sha256`` null or 64 hex digits; an
    evaluation's ``predictions`` map ``role:split`` names to
    ``predictions/<id>.safetensors`` (never a path elsewhere), and other
    jobs have none; ``started``, ``finished`` and ``wall_s`` (the cost the
    board shows) are finite and not negative, ``finished`` not before ``started``.
Across records
    no key twice in the file; a key already published only with an identical
    record (then it is not added again); every upstream job (``deps``) is in
    the submission or already published, and done.

Accepted records are appended to ``records/submissions.jsonl`` in one atomic
replace, under a lock (two ``--add`` at once never lose one another's records);
a folder that cannot be written (read-only, full) is one message, nothing written.
:mod:`backdoor_harness.verify` re-runs sampled cells (``harness verify``,
``--add --verify N``).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import yaml
from pydantic import ValidationError

from .errors import HarnessError
from .jobs import Job, job_key
from .store import SCHEMA_VERSION, JobRecord, Metric, atomic_file, jsonl_line, no_space, write_atomic

if TYPE_CHECKING:
    from .verify import Verification

#: the published leaderboard's definition, relative to the repository root
PUBLISHED = Path("leaderboard/published.yaml")
#: at most this many problems are listed in one refusal
MAX_PROBLEMS = 20
#: size limits of a submission, checked before anything is parsed
MAX_LINE_BYTES = 1 << 20
MAX_FILE_BYTES = 64 << 20
#: deepest nesting of JSON arrays and objects in a submitted line
MAX_DEPTH = 32
#: the file accepted records are appended to, in the published records folder
SUBMISSIONS = "submissions.jsonl"
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: what an evaluate record's ``predictions`` map: ``role:split`` -> ``predictions/<id>.safetensors``
_PREDICTION_NAME = re.compile(r"[a-z][a-z0-9_]*:[a-z][a-z0-9_]*")
_PREDICTION_PATH = re.compile(r"predictions/[0-9a-f]{24}\.safetensors")


def record_schema() -> dict:
    """The JSON Schema of one exported record (this schema version)."""
    schema = JobRecord.model_json_schema()
    schema["$id"] = f"backdoor-harness/record-v{SCHEMA_VERSION}.json"
    schema["title"] = f"backdoor-harness job record, schema version {SCHEMA_VERSION}"
    return schema


def record_line(record: JobRecord) -> str:
    """One record as a JSONL line ending in ``\\n``: :func:`backdoor_harness.store.jsonl_line` (ASCII-escaped
    JSON, so no character that some reader takes for a line break can split it)."""
    return jsonl_line(record) + "\n"


#: the oldest record schema :func:`read_records` reads (older records are upgraded, see
#: :func:`backdoor_harness.results.upgrade`)
OLDEST_SCHEMA = 1


def split_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` of every non-blank line, split on ``\\n`` only: never on U+2028,
    U+2029, U+0085, \\v, \\f or \\x1c-\\x1e, which ``str.splitlines`` takes for line breaks but JSON
    allows raw inside a string."""
    for n, line in enumerate(data.split(b"\n"), 1):
        if line.strip():
            yield n, line


def read_records(path: str | Path, current_only: bool = False) -> list[JobRecord]:
    """Parse a JSONL file of records; every bad line is named (file:line: what, how to fix).
    Records of an older schema (the published leaderboard's) are upgraded with the facts the
    installed plugins give (:func:`backdoor_harness.results.upgrade_all`); ``current_only`` refuses
    them instead (a submission carries the facts of its own run)."""
    from .results import upgrade_all

    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: no such file (write one with `harness export --workdir W --out {path}`)")
    records, problems = [], []
    for n, line in split_lines(path.read_bytes()):
        try:
            records.append(_parse(line, current_only))
        except _LineError as err:
            problems.append(f"{path}:{n}: {err}")
    _raise(problems, f"{path} is not a valid export")
    return upgrade_all(records)


class _LineError(Exception):
    """What is wrong with one line (the caller adds file:line)."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number (NaN and Infinity are refused)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:30]} overflows a float")
    return value


def _depth(value: Any) -> int:
    """The nesting depth of a parsed JSON value (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:
                stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _parse(line: bytes, current_only: bool, strict: bool = False) -> JobRecord:
    """One line as a record, or a :class:`_LineError` saying why not. ``strict`` (submissions):
    no NaN/Infinity/overflowing numbers, bounded nesting."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _LineError(f"not UTF-8 (byte {err.start})") from None
    try:
        raw = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float) if strict else json.loads(text)
    except json.JSONDecodeError as err:
        raise _LineError(f"not JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise _LineError("not a record: JSON nested too deeply") from None
    except ValueError as err:  # the hooks above, or an integer too long to convert
        raise _LineError(f"not a valid number: {err}") from None
    if not isinstance(raw, dict):
        raise _LineError(f"a record is a JSON object, not {type(raw).__name__}")
    if strict and _depth(raw) > MAX_DEPTH:
        raise _LineError(f"JSON nested more than {MAX_DEPTH} levels deep")
    version = raw.get("schema_version", SCHEMA_VERSION)
    if (type(version) is not int  # noqa: E721 (a bool is no schema version)
            or version not in range(SCHEMA_VERSION if current_only else OLDEST_SCHEMA, SCHEMA_VERSION + 1)):
        reads = (f"{SCHEMA_VERSION}" if current_only or OLDEST_SCHEMA == SCHEMA_VERSION
                 else f"{OLDEST_SCHEMA} to {SCHEMA_VERSION}")
        raise _LineError(f"schema_version {text_of(version, 40)}, this harness reads {reads}"
                         f"{' here' if current_only else ''}; export it again with this harness version")
    try:
        return JobRecord.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"])) or "record"
        raise _LineError(f"{text_of(where, 120)}: {first['msg'][:200]} (see leaderboard/schema/"
                         f"record-v{SCHEMA_VERSION}.json)") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as err:
        raise _LineError(f"not a valid record ({type(err).__name__})") from None


def _raise(problems: list[str], headline: str) -> None:
    if problems:
        shown = problems[:MAX_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise HarnessError(f"{headline}: {len(problems)} problem(s):\n  " + "\n  ".join(shown) + more)


def published_jobs(published: str | Path = PUBLISHED) -> tuple[dict[str, Job], Path]:
    """The jobs of every published matrix (by key, in dependency order) and the published records folder."""
    from .matrix import expand, load_matrix, read_yaml_mapping

    published = Path(published)
    doc = read_yaml_mapping(published, "no such file; run from the repository root or pass --published PATH",
                            "needs `matrices` (a list of matrix files) and `records` (a folder)")
    if not isinstance(doc.get("matrices"), list) or not doc["matrices"] or not isinstance(doc.get("records"), str):
        raise HarnessError(f"{published}: needs `matrices` (a list of matrix files) and `records` (a folder)")
    root = published.resolve().parent.parent
    jobs: dict[str, Job] = {}
    for spec in doc["matrices"]:
        for job in expand(load_matrix(root / str(spec), check_data=False)):
            jobs.setdefault(job.key, job)
    return jobs, root / doc["records"]


# ---------------------------------------------------------------- submissions


@dataclass
class Line:
    """A parsed line of a submission: where it is, and its record."""

    where: str
    record: JobRecord


def load_submission(path: str | Path) -> list[Line]:
    """A submission's records, after the size, encoding and schema checks (one HarnessError naming
    every bad line otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: no such file (write one with `harness export --workdir W --out {path}`)")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise HarnessError(f"{path} refused: {size} bytes, a submission is at most {MAX_FILE_BYTES} bytes; "
                           f"split it into several files")
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise HarnessError(f"{path} refused: more than {MAX_FILE_BYTES} bytes; split it into several files")
    lines, problems = [], []
    for n, line in split_lines(data):
        if len(line) > MAX_LINE_BYTES:
            problems.append(f"{path}:{n}: {len(line)} bytes, a record is at most {MAX_LINE_BYTES} bytes")
            continue
        try:
            lines.append(Line(f"{path}:{n}", _parse(line, current_only=True, strict=True)))
        except _LineError as err:
            problems.append(f"{path}:{n}: {err}")
    _raise(problems, f"{path} is not a valid export")
    if not lines:
        raise HarnessError(f"{path} refused: no records in it (write one with `harness export`)")
    return lines


def _json(value: Any) -> Any:
    """``value`` as JSON holds it (tuples as lists, models as mappings), for comparisons."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    elif isinstance(value, dict):
        value = {k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v) for k, v in value.items()}
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def text_of(value: str, limit: int = 200) -> str:
    """A submitted string as messages show it: at most ``limit`` characters, control characters
    (ANSI escapes, line breaks of any kind) and other non-ASCII ones escaped."""
    value = str(value)
    cut = value[:limit]
    return json.dumps(cut, ensure_ascii=True)[1:-1] + ("..." if len(value) > limit else "")


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(_json(value), sort_keys=True, ensure_ascii=True)
    return text if len(text) <= limit else text[:limit] + "..."


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not a finite number (a bool, a string, null...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def metric_problems(name: str, value: Any, info: Metric | None, declared: Iterable[str]) -> list[str]:
    """Why ``value`` is not an acceptable value of metric ``name`` (its declaration ``info``)."""
    if info is None:
        return [f"metric '{text_of(name, 80)}' is not one its evaluator declares ({', '.join(sorted(declared))})"]
    values = value if info.curve and isinstance(value, list) else None if info.curve else [value]
    if values is None:
        return [f"metric {name!r} is a curve: a list of numbers, not {_short(value, 60)}"]
    if info.curve and not values:
        return [f"metric {name!r} is an empty curve"]
    for v in values:
        x = _number(v)
        if x is None:
            return [f"metric {name!r}: {_short(v, 60)} is not a finite number"]
        if info.range is not None and not info.range[0] <= x <= info.range[1]:
            return [f"metric {name!r}: {x:g} is outside its declared range "
                    f"[{info.range[0]:g}, {info.range[1]:g}]"]
    return []


def record_problems(r: JobRecord, jobs: dict[str, Job]) -> list[str]:
    """Why one submitted record is not an honest record of the published job it names (empty: it is)."""
    from . import __version__

    problems = []
    computed = job_key(r.kind, r.config, r.deps, r.versions)
    job = jobs.get(r.key)
    if job is None:
        same = next((j for j in jobs.values() if j.label == r.label), None)
        if same is None:
            return [f"{text_of(r.label)}: not a cell of the published matrices; add it to a matrix listed in "
                    f"{PUBLISHED} first"]
        if computed != r.key:
            return [f"key {text_of(r.key, 40)} is not the hash of the record's own kind, config, deps and versions "
                    f"({computed}); the record was edited after export: export the run again"]
        diff = ("plugin versions " + _short(r.versions) + " vs installed " + _short(same.versions)
                if r.versions != same.versions else "its config or upstream jobs differ from the matrix's")
        return [f"{r.label}: key {r.key} is not the published cell's {same.key}: {diff}; run the published "
                f"matrix with the installed plugins"]
    if computed != r.key:
        edited = [f for f, mine, theirs in (("kind", r.kind, job.kind), ("config", r.config, job.payload),
                                            ("deps", r.deps, job.deps), ("versions", r.versions, job.versions))
                  if _json(mine) != _json(theirs)]
        problems.append(f"key {r.key} is not the hash of the record's own kind, config, deps and versions "
                        f"({computed}): {', '.join(edited) or 'its fields'} differ from the published job "
                        f"{job.label!r}; export the run again, unedited")
    for field, mine, theirs in (("label", r.label, job.label), ("attrs", r.attrs, job.cell),
                                ("plugin", r.plugin, job.plugin), ("metric_info", r.metric_info, job.metric_info),
                                ("upstream", r.upstream, job.upstream)):
        if field == "upstream" and not mine:
            continue  # not named (a record written before the field existed): its deps are checked above
        if _json(mine) != _json(theirs):
            problems.append(f"{field} {_short(mine)} is not the published job's {_short(theirs)} "
                            f"({job.label}); export the run again with the installed harness")
    if r.harness_version != __version__:
        problems.append(f"harness_version '{text_of(r.harness_version, 40)}': the published jobs are this harness's "
                        f"({__version__}); run and export with it")
    if r.status != "done":
        problems.append(f"status {r.status}: submit finished jobs only (drop the line, or rerun the cell until "
                        f"it is done)")
    problems += timing_problems(r)
    if r.artifact is not None and r.artifact != f"artifacts/{r.key}.safetensors":
        problems.append(f"artifact '{text_of(r.artifact)}': a record's artifact is null or "
                        f"artifacts/{r.key}.safetensors (the path `harness export` writes)")
    if r.artifact_sha256 is not None and not _SHA256.fullmatch(r.artifact_sha256):
        problems.append(f"artifact_sha256 '{text_of(r.artifact_sha256, 80)}' is not 64 lowercase hex digits")
    if r.predictions and job.kind != "evaluate":
        problems.append(f"predictions {_short(r.predictions)}: only an evaluation reads predictions")
    for name, rel in r.predictions.items():
        if not _PREDICTION_NAME.fullmatch(name) or not _PREDICTION_PATH.fullmatch(rel):
            problems.append(f"predictions '{text_of(name, 40)}': '{text_of(rel)}': an evaluation's predictions map "
                            f"role:split to predictions/<24 hex digits>.safetensors (the paths `harness run` "
                            f"records)")
    if job.kind == "evaluate":
        if r.status == "done" and not r.metrics:
            problems.append("a finished evaluation with no metrics")
        for name, value in r.metrics.items():
            problems += metric_problems(name, value, job.metric_info.get(name), job.metric_info)
    return problems


def timing_problems(r: JobRecord) -> list[str]:
    """Why a record's times are not a run's: ``started`` and ``finished`` (seconds since 1970) and
    ``wall_s`` (the cost the board shows) finite and not negative, ``finished`` not before ``started``."""
    problems = []
    for field, what in (("started", "a time (seconds since 1970)"), ("finished", "a time (seconds since 1970)"),
                        ("wall_s", "the job's wall-clock seconds")):
        value = getattr(r, field)
        if value is not None and not (math.isfinite(value) and value >= 0):
            problems.append(f"{field} {value:g}: {what}, a finite number, 0 or more; export the run again, "
                            f"unedited")
    if r.started is not None and r.finished is not None and r.finished < r.started:
        problems.append(f"finished {r.finished:.6g} is before started {r.started:.6g}; export the run again, "
                        f"unedited")
    return problems


def check_submission(lines: list[Line], jobs: dict[str, Job], published: dict[str, JobRecord]) -> list[str]:
    """Every reason to refuse a submission (its parsed ``lines``) against the published ``jobs`` and
    the records already ``published`` (by key); empty: acceptable."""
    problems: list[str] = []
    first: dict[str, str] = {}
    for line in lines:
        r = line.record
        problems += [f"{line.where}: {p}" for p in record_problems(r, jobs)]
        if r.key in first:
            problems.append(f"{line.where}: key {r.key} is already at {first[r.key]}; a job is submitted once")
        first.setdefault(r.key, line.where)
        old = published.get(r.key)
        if old is not None and _json(old) != _json(r):
            problems.append(f"{line.where}: {text_of(r.label)}: already published with other results; a published "
                            f"record is never replaced (drop this line)")
    submitted = {line.record.key: line.record for line in lines}
    for line in lines:
        for dep in line.record.deps:
            up = submitted.get(dep) or published.get(dep)
            if up is None:
                name = jobs[dep].label if dep in jobs else text_of(dep, 40)
                problems.append(f"{line.where}: its upstream job {name} is neither in the submission nor "
                                f"published; export the whole run")
            elif up.status != "done":
                problems.append(f"{line.where}: its upstream job {text_of(up.label)} is {up.status}, not done; "
                                f"rerun the cell until it is done")
    return problems


def published_records(folder: Path) -> dict[str, JobRecord]:
    """Every record already published (by key; the first one of a key wins)."""
    out: dict[str, JobRecord] = {}
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for r in read_records(path):
            out.setdefault(r.key, r)
    return out


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the published records folder's lock (one ``--add`` at a time)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".lock", "a")
    except OSError as err:
        raise _cannot_add(folder, err) from None
    with lock as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _cannot_add(folder: Path, err: OSError) -> HarnessError:
    """The message of an ``--add`` that could not write the published records ``folder``."""
    if no_space(err):
        return HarnessError(f"cannot add to the published records in {folder}: the disk is full "
                            f"({err.strerror or err}); nothing was added, the records there are as they were: "
                            f"free some space and run --add again")
    return HarnessError(f"cannot write the published records folder {folder} ({err.strerror or err}); nothing was "
                        f"added, the records there are as they were: make it a folder you can write to (it is "
                        f"`records` in the --published file) and run --add again")


def _write_together(files: list[tuple[Path, str]]) -> None:
    """Write every ``(path, text)`` all or nothing (:func:`~backdoor_harness.store.atomic_file`), and
    all of them before any: each temporary file is written and flushed to disk before the first one
    is renamed into place, in the order given."""
    with ExitStack() as stack:
        temps = [stack.enter_context(atomic_file(path)) for path, _ in reversed(files)][::-1]  # first out first
        for tmp, (_, text) in zip(temps, files):
            tmp.write_text(text, encoding="ascii" if text.isascii() else "utf-8")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())


@dataclass
class Checked:
    """A submission that passed every check: its records, the published jobs and records folder,
    and which of its records are new (not published yet)."""

    path: Path
    records: list[JobRecord]
    jobs: dict[str, Job]
    folder: Path
    new: list[JobRecord]


def check_file(path: str | Path, published: str | Path = PUBLISHED,
               site: tuple[dict[str, Job], Path] | None = None, lines: list[Line] | None = None) -> Checked:
    """Every check of ``--add`` on the file ``path`` (see the module's doc); one HarnessError naming
    every problem otherwise. ``site``: :func:`published_jobs` of ``published``, and ``lines``:
    :func:`load_submission` of ``path``, when already known."""
    lines = load_submission(path) if lines is None else lines
    jobs, folder = site or published_jobs(published)
    known = published_records(folder)
    _raise(check_submission(lines, jobs, known), f"{path} refused")
    records = [line.record for line in lines]
    return Checked(Path(path), records, jobs, folder, [r for r in records if r.key not in known])


def verify_submission(path: str | Path, sample: int, seed: int | None = None, device: str | None = None,
                      published: str | Path | None = None, workdir: str | Path | None = None,
                      log=print):
    """``harness verify``: check the submission as ``--add`` does (without adding it), then re-run
    ``sample`` of its evaluations here and compare (:mod:`backdoor_harness.verify`)."""
    from .verify import verify_checked

    return verify_checked(check_file(path, published or PUBLISHED), sample, seed, device, workdir, log=log)


def add_submission(path: str | Path, published: str | Path = PUBLISHED, verify: int = 0, seed: int | None = None,
                   device: str | None = None, log=print) -> tuple[int, int, Path]:
    """Check a submission and append it to the published records (nothing is written when anything
    is refused). ``verify``: first re-run that many of its evaluations here
    (:func:`backdoor_harness.verify.verify`); a mismatch refuses it, a match is recorded beside the
    records (:func:`record_verified`).
    Returns (added, already published, the file written)."""
    if verify < 0:
        raise HarnessError(f"--verify {verify}: how many of its evaluations to re-run before adding it, 1 or more "
                           f"(0, or no --verify: none)")
    lines = load_submission(path)  # the size limits first, before anything else is read
    site = published_jobs(published)
    with _locked(site[1]):
        checked = check_file(path, published, site, lines)
        result = None
        if verify:
            from .verify import verify_checked

            result = verify_checked(checked, verify, seed=seed, device=device, log=log)
            if not result.ok:
                raise HarnessError(f"{path} refused: re-running {len(result.cells)} of its evaluations here gave "
                                   f"other numbers:\n  " + "\n  ".join(result.mismatches()))
        target = checked.folder / SUBMISSIONS
        files = []  # the records first: a verification is never recorded for records that were not added
        try:
            if checked.new:
                before = target.read_bytes().decode("utf-8") if target.exists() else ""
                if before and not before.endswith("\n"):
                    before += "\n"
                files.append((target, before + "".join(record_line(r) for r in checked.new)))
            if result is not None:
                files.append(verified_file(result, target))
            _write_together(files)
        except OSError as err:
            raise _cannot_add(checked.folder, err) from None
    return len(checked.new), len(checked.records) - len(checked.new), target


def record_verified(result: Verification, records_file: str | Path) -> Path:
    """Add the cells of ``result`` that held to the verification file beside ``records_file``."""
    path, text = verified_file(result, records_file)
    write_atomic(path, text)
    return path


def verified_file(result: Verification, records_file: str | Path) -> tuple[Path, str]:
    """The verification file beside ``records_file`` with the cells of ``result`` that held added:
    its path and its new text."""
    from . import __version__
    from .verify import load_verified, verified_path

    doc = load_verified(records_file)
    for c in result.cells:
        if c.ok:
            doc[c.key] = {"label": c.label, "claimed": {m.name: m.claimed for m in c.metrics},
                          "rerun": {m.name: m.rerun for m in c.metrics},
                          "tolerance": {m.name: m.tolerance for m in c.metrics},
                          "device": result.device, "date": result.date, "harness_version": __version__,
                          "seed": result.seed}
    return verified_path(records_file), json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=True,
                                                   allow_nan=False) + "\n"
