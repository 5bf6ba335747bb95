"""The harness's pytest plugin (registered through the ``pytest11`` entry point).

Any project with backdoor-harness installed, the harness itself and
third-party plugin packages alike, gets:

- the ``golden`` marker: tiny deterministic CPU runs checked against golden
  numbers (run by default; deselect with ``-m "not golden"``);
- the fixture ``harness_matrix``: ``harness_matrix(spec)`` runs a matrix (a
  :class:`~backdoor_harness.matrix.MatrixSpec`, a mapping, or a YAML path) in
  a temporary work directory and returns its cells
  (:func:`backdoor_harness.results.collect`); the same spec runs
  once per test session;
- the fixture ``harness_golden``: ``harness_golden(path)`` runs a golden
  file's matrix for seed 0 and fails with one line per check that does not
  hold, saying which kind failed (see :mod:`backdoor_harness.golden`): a
  defended cell is checked ``paired`` (its value minus the undefended row's
  of the same seed, so the matrix must keep its baseline defense, e.g.
  ``none``), and ``absolute`` where that bound is the tighter one.

Write a golden file with ``harness golden SPEC --seeds 0 1 2 3 4 --out PATH``
(``--workers N`` runs the seeds' jobs side by side); it records the command
that regenerates it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:
    from .results import ResultCell


def pytest_configure(config):
    config.addinivalue_line("markers", "golden: a tiny deterministic run checked against golden numbers "
                                       "(backdoor-harness)")


def _spec(spec: Any):
    from .matrix import MatrixSpec, load_matrix

    if isinstance(spec, MatrixSpec):
        return spec
    if isinstance(spec, (str, Path)):
        return load_matrix(spec)
    return MatrixSpec.model_validate(spec)


@pytest.fixture(scope="session")
def harness_matrix(tmp_path_factory) -> Callable[[Any], list[ResultCell]]:
    """``run(spec) -> cells``: run a matrix once per session and return its result cells.

    Every matrix of a session runs in one work directory, so a job two matrices share (the same
    key: e.g. the attacked model of several golden matrices at one scale) runs once; each call
    returns the cells of its own matrix's jobs only."""
    from .matrix import expand
    from .results import collect
    from .scheduler import run_matrix
    from .store import Store

    done: dict[str, list[ResultCell]] = {}
    workdir: list[Path] = []

    def run(spec: Any) -> list[ResultCell]:
        spec = _spec(spec)
        digest = hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
        if digest not in done:
            if not workdir:
                workdir.append(tmp_path_factory.mktemp("harness-matrices"))
            run_matrix(spec, workdir[0], progress=False, log=lambda *a, **k: None)
            keys = {job.key for job in expand(spec)}
            store = Store(workdir[0])
            try:
                done[digest] = collect(r for r in store.records() if r.key in keys)
            finally:
                store.close()
        return done[digest]

    return run


@pytest.fixture(scope="session")
def harness_golden(harness_matrix) -> Callable[..., list[ResultCell]]:
    """``check(path, seed=0) -> cells``: run a golden file's matrix and fail on every check that does not hold."""
    from .golden import compare, golden_spec, load_golden

    def check(path: str | Path, seed: int = 0) -> list[ResultCell]:
        doc = load_golden(path)
        cells = harness_matrix(golden_spec(doc, seed))
        failures = compare(cells, doc)
        if failures:
            pytest.fail(f"{path}: {len(failures)} of {len(doc['checks'])} golden checks failed "
                        f"(regenerate with: {doc.get('command', 'harness golden')}, if the change is intended):\n"
                        + "\n".join(f"  {f}" for f in failures), pytrace=False)
        return cells

    return check
