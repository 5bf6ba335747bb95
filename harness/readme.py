"""What the README's generated blocks read from the core: record files with their verified
keys, the jobs a matrix expands to, the quickstart clock, the GPU queue.

The README generator itself (its markers, its kinds, the rendering, ``--check``) is
:mod:`backdoor_harness.leaderboard.readme`. It reads every file through a sources object, and
:class:`FileSources` is the core's: so the core imports no leaderboard module and the
leaderboard no core module beyond the record types. ``scripts/readme-tables`` (``make
readme-tables``) joins the two::

    from backdoor_harness.leaderboard.readme import main
    from backdoor_harness.readme import FileSources

    main(["--check", "README.md"], FileSources())

Every reader raises HarnessError naming the file and what is wrong with it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import HarnessError

#: how far (seconds) a clock file's phases may sum beyond its total (rounding) before it is refused, and
#: how far below it before the rest shows as time outside the phases
CLOCK_SLACK_S = 0.5


class ClockMeasurement(BaseModel):
    """The fresh-clone quickstart measurement (one JSON object; the lead's timing script writes it).

    Attributes:
        command: what was timed, e.g. ``git clone ... && make quickstart``.
        date: the day it ran (ISO date, ``2026-11-29``).
        machine: the machine it ran on, e.g. ``2-core x86_64 VM, no GPU``.
        commit: the commit it ran at.
        phases: phase name -> seconds, in the order they ran (``venv and install``, ``data
            decoding``, ``training``, ``purification``, ``evaluation``, ``leaderboard``).
        total_s: the whole command's wall seconds (at least the phases' sum, give or take
            :data:`CLOCK_SLACK_S` of rounding; more than that beyond it shows as time outside the phases).
        budget_s: the target, e.g. 300 s.
        notes: anything a reader needs to weigh the number (optional).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str = Field(min_length=1)
    date: dt.date
    machine: str = Field(min_length=1)
    commit: str = Field(min_length=1)
    phases: dict[str, float] = Field(min_length=1)
    total_s: float = Field(gt=0)
    budget_s: float = Field(gt=0)
    notes: str | None = None

    @field_validator("phases")
    @classmethod
    def _seconds(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [name for name, s in value.items() if not math.isfinite(s) or s < 0]
        if bad:
            raise ValueError(f"phases {bad}: seconds must be finite and not negative")
        return value

    @field_validator("total_s", "budget_s")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        return value

    @model_validator(mode="after")
    def _total(self) -> "ClockMeasurement":
        spent = sum(self.phases.values())
        if spent > self.total_s + CLOCK_SLACK_S:
            raise ValueError(f"the phases sum to {spent:.1f} s, more than total_s {self.total_s:.1f} s; "
                             f"total_s is the whole command's wall time")
        return self

    @property
    def outside_s(self) -> float:
        """The seconds of the total outside every phase (0 when within the phases' rounding)."""
        outside = self.total_s - sum(self.phases.values())
        return outside if outside > CLOCK_SLACK_S else 0.0


def load_clock(path: Path) -> ClockMeasurement:
    """A clock file, or one HarnessError saying what is wrong with it."""
    from .registry import format_validation_error

    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise HarnessError(f"{path}: no such file (the quickstart clock's JSON measurement)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HarnessError(f"{path}: not a JSON file ({err})") from None
    try:
        return ClockMeasurement.model_validate(raw)
    except ValidationError as err:
        if all(e["loc"] for e in err.errors()):
            raise HarnessError(format_validation_error(err, str(path))) from None
        # a problem of the whole object (the phases against the total): its message, not the whole input
        raise HarnessError("; ".join(f"{path}: {e['msg'].removeprefix('Value error, ')}" for e in err.errors())
                           ) from None


class MatrixJobs(NamedTuple):
    """A matrix's name and the jobs it expands to (each with its ``key`` and ``label``)."""

    name: str
    jobs: list[Any]


class FileSources:
    """The core's readers of the files a README block cites (the sources object
    :mod:`backdoor_harness.leaderboard.readme` takes). Paths come resolved (the README's folder
    joined with the block's argument)."""

    def records(self, path: Path) -> tuple[list[Any], set[str]]:
        """The records of an exported file and its verified evaluate keys, read as ``harness
        leaderboard --records FILE`` reads them."""
        from .submission import read_records
        from .verify import load_verified

        return read_records(path), set(load_verified(path))

    def matrix_jobs(self, path: Path) -> MatrixJobs:
        """The jobs ``path`` expands to, as ``harness validate`` expands it (without looking for
        its data: a job key does not depend on it)."""
        from .matrix import expand, load_matrix

        spec = load_matrix(path, check_data=False)
        return MatrixJobs(spec.name, expand(spec))

    def clock(self, path: Path) -> ClockMeasurement:
        """The quickstart clock's measurement (:class:`ClockMeasurement`)."""
        return load_clock(path)

    def queue(self, path: Path) -> Any:
        """The GPU queue (:class:`backdoor_harness.gpu_queue.GpuQueue`), validated."""
        from .gpu_queue import load_queue

        return load_queue(path)
