"""Golden tests of this package, with the fixtures backdoor-harness ships as a pytest plugin.

Nothing to import or register: installing backdoor-harness brings the
``golden`` marker and the ``harness_golden`` / ``harness_matrix`` fixtures
(and this package must be installed too, so the harness finds head_reinit
through its entry point). Run ``pytest`` in this folder.

The golden file's checks are paired by default: head_reinit's metrics are
checked as differences to the undefended row (``none``) of the same seed,
with the seed-to-seed spread of that difference as tolerance, and
absolutely only where that bound is at least as tight; this is why the
matrix keeps ``none`` next to head_reinit.
"""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MATRIX = HERE / "golden-matrix.yaml"
GOLDEN = HERE / "golden" / "head_reinit.yaml"


@pytest.mark.golden
def test_golden_numbers_hold(harness_golden):
    # runs the golden file's matrix (seed 0) and fails with one line per check that does not hold;
    # the file holds paired checks of head_reinit (its value minus the undefended one of the same seed)
    assert harness_golden(GOLDEN)


def test_head_reinit_runs_in_a_matrix(harness_matrix):
    cells = {c.defense: c for c in harness_matrix(MATRIX)}  # result cells (backdoor_harness.results)
    assert set(cells) == {"none", "head_reinit"}
    cell = cells["head_reinit"]
    assert cell.status == {}, cell.status  # every evaluation finished
    assert set(cell.metrics) == {"clean_acc", "asr"}
    assert all(0.0 <= v <= 1.0 for v in cell.metrics.values()), cell.metrics
    assert cells["none"].baseline and not cell.baseline
