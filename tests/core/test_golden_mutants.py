"""The regression suite is itself tested: known-weakened built-ins must fail the golden checks.

Each variant below is a subclass of a built-in plugin that does its job worse on purpose (EP stamping
far fewer reserve images, PAM without its path-aware step, a defense that returns the model unchanged,
an attack that stamps only half of its poisoned samples, ...). It is registered ONLY here, for one test,
under the SAME name as the built-in it weakens (:func:`swapped` takes the built-in out of the plugin
manager and puts the variant in, then restores the normal registry), with a different ``version``:
job keys hold plugin versions, so in a copy of a finished run of the golden matrix only the jobs
downstream of the variant run again, and everything upstream is reused.

Mechanism. A variant is compared with the golden files its entry names, else with every golden file
whose matrix runs the built-in it weakens (:func:`covering`; ``pytest -m golden`` runs them all, so a
variant is caught when any of them fails; the table names the cheapest files that show what every
file shows, and its ``why`` gives the numbers of each):

1. each file's matrix, cut to the cells the variant runs in (:func:`sub_spec`: e.g. a defense's rows
   and the undefended rows, the reference of its paired checks), runs at seed 0 with the built-ins in
   one work directory shared by the module (:func:`base_run`; matrices share jobs, each runs once);
2. the variant: a copy of that work directory, the variant swapped in, the same matrices again (only
   the variant's downstream jobs run), the cells of each matrix's own jobs compared with the file's
   checks of those cells (:func:`golden_checks`);
3. the variant must be flagged: at least one failure line naming a cell the variant runs in.

The control (:func:`test_the_unmodified_original_passes_the_same_mechanism`) runs each swapped
original through the same steps under a control version: the checks must all hold and the metrics must
equal the first run's, so a variant "caught" is the variant's doing, not a broken harness.

A variant the current golden numbers do NOT catch stays in :data:`VARIANTS` with ``caught=False``, the
reason and the numbers, and its test is ``xfail(strict=True)``: the suite stays honest (a variant that
becomes caught fails until the table says so) and :func:`caught_count` gives the README's
"Weakened variants caught by the golden checks: N of M".
"""

from __future__ import annotations

import contextlib
import copy
import re
import shutil
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import backdoor_harness as bh
from backdoor_harness import registry
from backdoor_harness.golden import CELL, compare, golden_spec, load_golden
from backdoor_harness.matrix import MatrixSpec, expand
from backdoor_harness.plugins.attacks.badnets import BadNets
from backdoor_harness.plugins.defenses.ep import ExactPurification
from backdoor_harness.plugins.defenses.fst import FeatureShiftTuning
from backdoor_harness.plugins.defenses.ft import FineTune
from backdoor_harness.plugins.defenses.pam import PAM
from backdoor_harness.plugins.evaluators.asr import AttackSuccessRate
from backdoor_harness.results import ResultCell, collect
from backdoor_harness.scheduler import run_matrix
from backdoor_harness.store import Store
from backdoor_harness.toolkit import attack_success_rate

from helpers import ROOT

GOLDEN_DIR = ROOT / "tests" / "golden"
README = ROOT / "README.md"
README_LINE = re.compile(r"Weakened variants caught by the golden checks: (\d+) of (\d+)")


# --------------------------------------------------------------------------------------------------
# The weakened variants (test-only: never registered by the package)
# --------------------------------------------------------------------------------------------------


class EPFewStamps(ExactPurification):
    """EP stamping the real trigger on 1% of the reserve instead of its 10% (2 of the tiny matrix's
    250 reserve images instead of 25): the only change is the share EP's ``purify`` draws
    (``poison_fraction``), set here whatever the config says."""

    version = ExactPurification.version + "+weakened-fewstamps"
    FRACTION = 0.01

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.config = self.config.model_copy(update={"poison_fraction": self.FRACTION})


def unchanged(defense: type) -> type:
    """``defense`` returning the attacked model unchanged (a copy): the backdoor stays. Not a baseline
    (it still says it defends), so the checks of the defense it replaces apply to it."""

    def purify(self, model, ctx):
        return bh.Purified(copy.deepcopy(model))

    return type(f"{defense.__name__}Unchanged", (defense,), {
        "version": defense.version + "+weakened-identity", "purify": purify, "__module__": __name__,
        "__doc__": f"{defense.__name__} returning the attacked model unchanged."})


EPUnchanged = unchanged(ExactPurification)
PAMUnchanged = unchanged(PAM)
FSTUnchanged = unchanged(FeatureShiftTuning)
FTUnchanged = unchanged(FineTune)


class PAMNoPathAware(PAM):
    """PAM with its path-aware step off: rho = 0, so the shift e = rho * (W0 - W) / ||W0 - W|| is zero
    and every gradient is taken at W itself. What is left is BTI-DBF(U)'s unlearning with plain SGD on
    the reserve mixed with inverted-trigger images (true labels): the same data, the same schedule, no
    step along the path back to the backdoored model, which is what the paper adds (Algorithm 1)."""

    version = PAM.version + "+weakened-nopath"

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.config = self.config.model_copy(update={"rho": 0.0})


class BadNetsHalfStamped(BadNets):
    """BadNets whose trigger is stamped on half of the poisoned samples only: every chosen sample still
    gets the target label, but only the first half of them (in the drawn order) carries the patch; the
    rest are clean images relabelled to the target (label noise, no trigger)."""

    version = BadNets.version + "+weakened-halfstamped"

    def poison(self, train, generator):
        idx = self.select_poison(train.labels, generator)
        labels = train.labels.clone()
        labels[idx] = self.target_labels(train.labels[idx], train.num_classes)
        return self.stamped(train.images, labels, idx[: len(idx) // 2])


class ASRWithTargetClass(AttackSuccessRate):
    """ASR that also counts the target-class test images (triggered): they are classified as the
    target whatever the backdoor does, so the rate is inflated (BackdoorBench's ``test_asr`` leaves
    them out, as the built-in does)."""

    version = AttackSuccessRate.version + "+weakened-withtarget"

    def evaluate(self, ctx):
        test, attack = ctx.clean_test, ctx.attack
        own = ~attack.test_mask(test.labels, test.num_classes)
        with torch.no_grad():
            x = attack.apply_trigger(test.images[own], train=False).to(ctx.device).float() / 255
            pred = ctx.purified(x).argmax(1).cpu() if len(x) else torch.zeros(0, dtype=torch.int64)
        preds = torch.cat([ctx.predict("purified", "poisoned"), pred])
        labels = torch.cat([ctx.poisoned_test.labels, attack.target_labels(test.labels[own], test.num_classes)])
        return {"asr": attack_success_rate(preds, labels)}


@dataclass(frozen=True)
class Variant:
    """A weakened built-in.

    Attributes:
        id: the test id.
        kind: ``attack``, ``defense`` or ``evaluator``.
        name: the built-in it weakens (and the name it is registered under).
        cls: the variant class.
        caught: whether the current golden numbers flag it (measured; see ``why``).
        why: what the measurement showed (the failing check lines, or why none fails).
        golden: the golden files (stems in tests/golden/) it is compared with; None: every one whose
            matrix runs the built-in in the variant's rows (:func:`covering`).
        attack: a defense or evaluator variant runs in the rows of this attack only (None: all of
            the golden matrix's attacks); the cost of the test is one attacked model per attack.
        defenses: an evaluator variant runs in the rows of these defenses (and the baseline's) only
            (None: every defense of the golden matrix); the cost is each defense's purification.
        evaluators: an attack or defense variant is evaluated by these only (None: all of the
            golden matrix's); for a caught variant, enough to show a failing check at less cost.
    """

    id: str
    kind: str
    name: str
    cls: type
    caught: bool
    why: str
    golden: tuple[str, ...] | None = None
    attack: str | None = "badnets"
    defenses: tuple[str, ...] | None = None
    evaluators: tuple[str, ...] | None = None


#: Every variant, whether the golden numbers catch it and what its seed-0 run showed, measured with
#: this file's mechanism against every golden file that runs the built-in (tiny, defenses, post;
#: attacks.yaml has no badnets row); ``golden`` keeps the cheapest that show it in ``make test``.
#: A bound is ref -+ delta of the check named.
VARIANTS: list[Variant] = [
    Variant("ep-stamps-1pct", "defense", "ep", EPFewStamps, True,
            "defenses.yaml (ep lr 0.02): ep asr paired -0.6444 (= 0.2822 - 0.9267) > -0.6867, der 0.8132 < 0.8327, "
            "robust_acc paired 0.2178 < 0.2289; post.yaml (ep lr 0.01): qra_p_asr paired -0.0800 outside "
            "[-0.7773, -0.0929]; tiny.yaml alone misses it (ep lr 0.01: asr paired -0.4000 (= 0.5267 - 0.9267) "
            "<= -0.3773)", golden=("defenses",)),
    Variant("ep-unchanged", "defense", "ep", EPUnchanged, True,
            "defenses.yaml: ep asr paired 0.0000 > -0.6867, der 0.5000 < 0.8327, robust_acc paired 0.0000 < "
            "0.2289; tiny.yaml: asr paired 0.0000 > -0.3773; post.yaml: the same, and lmc_asr_mid, qra_p_asr",
            golden=("defenses",)),
    Variant("pam-no-path-aware", "defense", "pam", PAMNoPathAware, True,
            "defenses.yaml: pam asr paired +0.0200 (= 0.9467 - 0.9267) > -0.1849 (at this scale PAM's drop of the "
            "ASR is all the path-aware step's), robust_acc 0.0156 < 0.0196, paired -0.0089 < 0.0000",
            golden=("defenses",)),
    Variant("pam-unchanged", "defense", "pam", PAMUnchanged, True,
            "defenses.yaml: pam asr paired 0.0000 > -0.1849", golden=("defenses",)),
    Variant("fst-unchanged", "defense", "fst", FSTUnchanged, True,
            "defenses.yaml: fst asr 0.9267 > 0.1769, asr paired 0.0000 > -0.7573, der 0.5000 < 0.8450, "
            "robust_acc paired 0.0000 < 0.1227", golden=("defenses",)),
    Variant("ft-unchanged", "defense", "ft", FTUnchanged, False,
            "FT at this scale leaves the backdoor (seed 0: asr 0.7244 against the undefended 0.9267), so its "
            "defenses.yaml checks (the only golden file with ft) cannot tell it from a no-op: asr paired 0.0000 "
            "<= 0.1280, clean_acc 0.3200 >= 0.3060, der paired 0.0000 in [-0.0683, 0.1499], robust_acc paired "
            "0.0000 in [-0.0431, 0.1169]", golden=("defenses",)),
    Variant("badnets-half-stamped", "attack", "badnets", BadNetsHalfStamped, True,
            "tiny.yaml and defenses.yaml: none asr 0.2956 < 0.8676; defenses.yaml: none robust_acc 0.2844 "
            "outside [-0.0115, 0.0507]; post.yaml: the same, and lmc_asr_mid, qra_p_asr, retune_asr",
            golden=("tiny", "defenses")),
    Variant("asr-counts-target-class", "evaluator", "asr", ASRWithTargetClass, False,
            "the 50 target-class test images add at most 0.1 to a 500-image ASR and the defended tiny models call "
            "few of them (triggered) the target: none 0.9300 (built-in 0.9267), fst 0.0020 (0.0000; <= 0.1769), "
            "ep 0.1600 (defenses.yaml) and 0.3140 (tiny.yaml: 0.2756; paired -0.6160 <= -0.3773), anp 0.0480 "
            "(0.0422; <= 0.0551), clp 0.1880 (0.1844; <= 0.3356)", golden=("defenses",), defenses=("ep", "fst")),
]


def caught_count() -> tuple[int, int]:
    """(variants the golden checks catch, variants), as the README states them."""
    return sum(v.caught for v in VARIANTS), len(VARIANTS)


# --------------------------------------------------------------------------------------------------
# Swapping a built-in for a variant, for one test
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def swapped(kind: str, name: str, cls: type) -> Iterator[None]:
    """Within the block, the installed ``kind`` plugin ``name`` is ``cls`` (this process only).

    The plugin (module) that provides the built-in is unregistered from the plugin manager and a
    stand-in registered that provides everything it did, with ``cls`` in place of ``name``; on exit
    the registry is reset, so the next lookup loads the installed plugins again (and only them: a
    plugin a test registered by hand is gone too)."""
    assert cls.name == name, f"{cls.__name__} must keep the built-in's name {name!r}"
    pm = registry.get_plugin_manager()
    hook = registry.KINDS[kind]
    providers = [impl.plugin for impl in getattr(pm.hook, hook).get_hookimpls()
                 if any(c.name == name for c in impl.function() or [])]
    assert len(providers) == 1, f"{len(providers)} plugins provide the {kind} {name!r}"
    provider = providers[0]
    stand_in = {}
    for other in registry.KINDS.values():  # the provider's other hooks, unchanged
        impl = getattr(provider, other, None)
        if impl is not None:
            classes = [c for c in impl() or [] if other != hook or c.name != name]
            stand_in[other] = bh.hookimpl(lambda classes=classes: list(classes))
    stand_in[hook] = bh.hookimpl(lambda: [c for c in getattr(provider, hook)() or [] if c.name != name] + [cls])
    pm.unregister(provider)
    try:
        registry.register(types.SimpleNamespace(**stand_in), name=f"test-weakened-{kind}-{name}")
        assert registry.get_class(kind, name) is cls
        yield
    finally:
        registry.reset()


def control(original: type) -> type:
    """The built-in itself under a different version: its jobs run again, unchanged."""
    return type(f"{original.__name__}Control", (original,), {"version": original.version + "+control",
                                                             "__module__": __name__})


# --------------------------------------------------------------------------------------------------
# Golden files, their cut-down matrices and runs
# --------------------------------------------------------------------------------------------------


def golden_files() -> list[Path]:
    return sorted(GOLDEN_DIR.glob("*.yaml"))


def _entries(spec: MatrixSpec, kind: str) -> list:
    return {"attack": spec.attacks, "defense": spec.defenses, "evaluator": spec.evaluators}[kind]


def covering(v: Variant) -> list[Path]:
    """The golden files a variant is compared with: those it names, else every one whose matrix runs
    the built-in it weakens in the variant's rows (``pytest -m golden`` runs them all: the variant is
    caught when any of them fails)."""
    if v.golden is not None:
        return [GOLDEN_DIR / f"{stem}.yaml" for stem in v.golden]
    return [path for path in golden_files() if sub_spec(load_golden(path), v) is not None]


def _is_baseline(defense: str) -> bool:
    return bool(getattr(registry.get_class("defense", defense), "baseline", False))


def _cut(spec: MatrixSpec, **keep) -> MatrixSpec | None:
    """``spec`` with the entries of each named list (``attacks=pred``, ...) that ``pred`` keeps (None:
    one left empty)."""
    raw = spec.model_dump(mode="json")
    for field, pred in keep.items():
        raw[field] = [e.model_dump(mode="json") for e in getattr(spec, field) if pred(e)]
        if not raw[field]:
            return None
    return MatrixSpec.model_validate(raw)


def sub_spec(doc: dict[str, Any], v: Variant) -> MatrixSpec | None:
    """The golden matrix (seed 0) cut to the cells the variant runs in (None: it runs in none): a
    defense's own rows and the baseline rows (the reference of its paired checks), of the variant's
    ``attack``; an attack's rows with the baseline defense only (where the attack is measured); an
    evaluator's metrics in the rows of the variant's ``attack`` and ``defenses``. The evaluators are
    cut to the variant's ``evaluators`` when it names them."""
    spec = golden_spec(doc, 0)
    of_attack = lambda e: v.attack is None or e.name == v.attack  # noqa: E731
    evaluators = lambda e: v.evaluators is None or e.name in v.evaluators  # noqa: E731
    if v.kind == "defense":
        if not any(e.name == v.name for e in spec.defenses):
            return None
        return _cut(spec, attacks=of_attack, evaluators=evaluators,
                    defenses=lambda e: e.name == v.name or _is_baseline(e.name))
    if v.kind == "attack":
        return _cut(spec, attacks=lambda e: e.name == v.name, evaluators=evaluators,
                    defenses=lambda e: _is_baseline(e.name))
    return _cut(spec, attacks=of_attack, evaluators=lambda e: e.name == v.name,
                defenses=lambda e: v.defenses is None or e.name in v.defenses or _is_baseline(e.name))


def golden_checks(doc: dict[str, Any], spec: MatrixSpec) -> dict[str, Any]:
    """``doc`` with only the checks of cells and metrics that ``spec`` runs."""
    cells = {(d.display, m.display, a.display, f.display)
             for d in spec.datasets for m in spec.models for a in spec.attacks for f in spec.defenses}
    metrics = {m for e in spec.evaluators for m in registry.get_class("evaluator", e.name).metrics}
    return {**doc, "checks": [c for c in doc["checks"]
                              if tuple(c[k] for k in CELL) in cells and c["metric"] in metrics]}


def run_cells(spec: MatrixSpec, workdir: Path) -> tuple[list[ResultCell], dict[str, int]]:
    """Run ``spec`` in ``workdir`` (in this process) and collect the cells of its own jobs only (the
    work directory also holds the records of other matrices and of the runs before)."""
    counts = run_matrix(spec, workdir, progress=False, log=lambda *a, **k: None)
    keys = {job.key for job in expand(spec)}
    store = Store(workdir)
    try:
        return collect(r for r in store.records() if r.key in keys), counts
    finally:
        store.close()


@dataclass
class Part:
    """One golden file's side of a variant's setup: its checks of the variant's cells, the cut-down
    matrix, and the cells of that matrix as the built-ins give them."""

    path: Path
    doc: dict[str, Any]
    spec: MatrixSpec
    cells: list[ResultCell]


@dataclass
class Setup:
    """A variant's work directory (the module's base run) and one :class:`Part` per golden file."""

    workdir: Path
    parts: list[Part]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """``setup(variant) -> Setup``: the variant's cut-down matrices (:func:`sub_spec`) of each golden
    file it is compared with, run with the built-ins in one work directory for the module (the golden
    matrices share jobs, e.g. the attacked model's training: each runs once)."""
    workdir = tmp_path_factory.mktemp("golden-base")

    def setup(v: Variant) -> Setup:
        paths = covering(v)
        if not paths:
            pytest.fail(f"{v.id}: no golden file in {GOLDEN_DIR} runs the {v.kind} {v.name!r}")
        parts = []
        for path in paths:
            doc = load_golden(path)
            spec = sub_spec(doc, v)
            if spec is None:
                pytest.fail(f"{v.id}: {path.name} does not run the {v.kind} {v.name!r} in its rows")
            cells, _ = run_cells(spec, workdir)
            parts.append(Part(path, golden_checks(doc, spec), spec, cells))
        return Setup(workdir, parts)

    return setup


def rerun(base: Setup, v: Variant, cls: type, workdir: Path) -> tuple[list[list[ResultCell]], dict[str, int]]:
    """Each of ``base``'s matrices again, in one copy of its work directory, with ``cls`` as the
    built-in ``v`` weakens: the cells per part, and the job counts summed."""
    shutil.copytree(base.workdir, workdir)
    out, total = [], {}
    with swapped(v.kind, v.name, cls):
        for part in base.parts:
            cells, counts = run_cells(part.spec, workdir)
            out.append(cells)
            total = {k: total.get(k, 0) + n for k, n in counts.items()}
    return out, total


def variant_cells(part: Part, v: Variant) -> list[str]:
    """The cell paths (as compare() names them) that a variant runs in."""
    out = []
    for check in part.doc["checks"]:
        if v.kind == "evaluator" or check[v.kind] in {e.display for e in _entries(part.spec, v.kind)
                                                         if e.name == v.name}:
            out.append("/".join(str(check[k]) for k in CELL))
    return sorted(set(out))


def _metrics(cells: list[ResultCell]) -> dict[tuple, dict[str, float]]:
    return {tuple(getattr(c, k) for k in CELL): dict(c.metrics) for c in cells}


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def original(v: Variant) -> type:
    """The built-in class a variant weakens (its direct base)."""
    return v.cls.__mro__[1]


#: one variant per (built-in, golden file): the control runs the original in its setup
CONTROLS = list({(v.kind, v.name, v.golden, v.attack, v.defenses, v.evaluators): v for v in VARIANTS}.values())


@pytest.mark.parametrize("v", CONTROLS, ids=[f"{v.name}-as-set-up-for-{v.id}" for v in CONTROLS])
def test_the_unmodified_original_passes_the_same_mechanism(base_run, tmp_path, v):
    base = base_run(v)
    for part in base.parts:
        assert part.doc["checks"], f"{part.path.name} has no checks of the cells of the {v.kind} {v.name!r}"
        assert compare(part.cells, part.doc) == [], part.path.name
    cells, counts = rerun(base, v, control(original(v)), tmp_path / "control")
    assert counts["done"] > 0 and counts["failed"] == 0, counts  # the swapped plugin's jobs ran again
    assert counts["cached"] > 0 or v.kind == "attack", counts  # the rest came from the copy (an attack: none)
    for part, got in zip(base.parts, cells):
        assert compare(got, part.doc) == [], part.path.name
        assert _metrics(got) == _metrics(part.cells), part.path.name


def _variant_param(v: Variant):
    marks = [] if v.caught else [pytest.mark.xfail(strict=True, reason=f"not caught by the golden checks: {v.why}")]
    return pytest.param(v, id=v.id, marks=marks)


@pytest.mark.parametrize("v", [_variant_param(v) for v in VARIANTS])
def test_a_weakened_variant_is_flagged(base_run, tmp_path, v):
    base = base_run(v)
    cells, counts = rerun(base, v, v.cls, tmp_path / "variant")
    assert counts["done"] > 0 and counts["failed"] == 0, counts
    named, report = [], []
    for part, got in zip(base.parts, cells):
        failures = compare(got, part.doc)
        where = variant_cells(part, v)
        named += [f for f in failures if any(f.startswith(w + " ") for w in where)]
        report.append(f"{part.path.name}: {len(failures)} of {len(part.doc['checks'])} checks fail"
                      + "".join(f"\n  {f}" for f in failures)
                      + f"\n  values: { {'/'.join(map(str, k)): m for k, m in _metrics(got).items()} }")
    print(f"{v.id}:\n" + "\n".join(report))
    assert named, f"{v.id}: no golden check of its cells fails:\n" + "\n".join(report)


def test_the_variants_are_not_in_the_package():
    """Outside :func:`swapped`, every name resolves to the built-in, never to a variant; the variants
    live in this test module only."""
    registry.reset()
    for v in VARIANTS:
        assert registry.get_class(v.kind, v.name) is original(v)
        assert v.cls.__module__ == __name__ and original(v).__module__.startswith("backdoor_harness.plugins.")


class _Kept(bh.Defense):
    name = "test_kept"
    version = "1"
    summary = "returns the model"
    paper = "-"

    def purify(self, model, ctx):  # pragma: no cover - never run
        return bh.Purified(model)


class _Replaced(_Kept):
    name = "test_replaced"


class _Weakened(_Replaced):
    version = "1+weakened"


class _KeptEvaluator(AttackSuccessRate):
    name = "test_kept_asr"


def test_swapped_replaces_one_plugin_and_keeps_the_rest():
    registry.reset()
    registry.register(types.SimpleNamespace(harness_defenses=bh.hookimpl(lambda: [_Kept, _Replaced]),
                                            harness_evaluators=bh.hookimpl(lambda: [_KeptEvaluator])),
                      name="test-two-hooks")
    with swapped("defense", "test_replaced", _Weakened):
        assert registry.get_class("defense", "test_replaced") is _Weakened
        assert registry.get_class("defense", "test_kept") is _Kept  # the provider's other classes stay
        assert registry.get_class("evaluator", "test_kept_asr") is _KeptEvaluator  # and its other hooks
        assert registry.get_class("defense", "none").__module__.endswith("defenses.none")  # and the rest
    assert "test_kept" not in registry.names("defense")  # reset: the installed plugins only
    with swapped("defense", "ep", EPUnchanged):
        assert registry.get_class("defense", "ep") is EPUnchanged
    assert registry.get_class("defense", "ep") is ExactPurification
    with pytest.raises(AssertionError, match="keep the built-in's name"):
        with swapped("defense", "ep", _Weakened):
            pass


def test_the_caught_count_is_the_table():
    caught, total = caught_count()
    assert total == len(VARIANTS) >= 4 and 0 <= caught <= total
    assert len({v.id for v in VARIANTS}) == total
    for v in VARIANTS:
        assert v.why and v.why != "TBD", f"{v.id}: say what the measurement showed"
        assert v.cls.version != original(v).version and v.cls.name == original(v).name


def test_the_readme_states_the_caught_count():
    found = README_LINE.search(README.read_text())
    if found is None:
        pytest.skip('README.md has no line "Weakened variants caught by the golden checks: N of M" yet '
                    '(the lead adds it under "### Regression tests of numbers")')
    assert (int(found.group(1)), int(found.group(2))) == caught_count(), \
        f"README says {found.group(0)!r}; tests/core/test_golden_mutants.py's table says {caught_count()}"
