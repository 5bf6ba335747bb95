"""Post-purification evaluators: the Retuning Attack (retune) and the backdoor-connected path (lmc)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import backdoor_harness as bh
from backdoor_harness.contracts import EvalContext
from backdoor_harness.data import ImageSet
from backdoor_harness.metrics import score
from backdoor_harness.models import create_model
from backdoor_harness.plugins.evaluators.lmc import _at, escape_point, interpolate
from backdoor_harness.train import Recipe, fit

CPU = torch.device("cpu")
CLASSES = [str(i) for i in range(10)]


def synthetic(n, seed):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 10,
                    CLASSES)


def tiny(seed):
    torch.manual_seed(seed)
    return create_model({"name": "tiny_cnn", "kwargs": {"width": 8}}, 10, 32).eval()


@pytest.fixture(scope="module")
def ctx():
    attack = bh.create_attack("badnets", stamp="after_augment")
    train, test = synthetic(400, 0), synthetic(100, 1)
    a, b = tiny(0), tiny(1)
    fit(b, train, Recipe(epochs=1, lr=0.05), device=CPU, generator=torch.Generator().manual_seed(0), progress=False)
    return EvalContext(backdoored=a, purified=b, clean_test=test, poisoned_test=attack.poison_test(test),
                       attack=attack, device=CPU, predict=None, clean_model=tiny(2), train=train,
                       reserve=train.subset(torch.arange(50)), seed=0, generator=torch.Generator().manual_seed(0),
                       fit=lambda *a, **k: fit(*a, **{"progress": False, **k}))


def test_interpolation_endpoints_reproduce_both_models(ctx):
    probe = copy.deepcopy(ctx.purified)
    for t, model in ((0.0, ctx.backdoored), (1.0, ctx.purified)):
        interpolate(ctx.backdoored, ctx.purified, t, probe)
        for k, v in model.state_dict().items():
            assert torch.equal(probe.state_dict()[k], v), (t, k)
        assert score(probe, ctx.clean_test, ctx.poisoned_test, CPU) == score(model, ctx.clean_test,
                                                                             ctx.poisoned_test, CPU)
    out = bh.create_evaluator("lmc", points=5).evaluate(ctx)
    assert out["lmc_t"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    ends = [score(m, ctx.clean_test, ctx.poisoned_test, CPU) for m in (ctx.backdoored, ctx.purified)]
    assert (out["lmc_asr"][0], out["lmc_asr"][-1]) == (ends[0].asr, ends[1].asr)
    assert (out["lmc_clean_acc"][0], out["lmc_clean_acc"][-1]) == (ends[0].clean_acc, ends[1].clean_acc)
    assert out["lmc_asr_mid"] == out["lmc_asr"][2]
    assert out == bh.create_evaluator("lmc", points=5).evaluate(ctx)  # reproducible
    recal = bh.create_evaluator("lmc", points=3, recalibrate_bn=True).evaluate(ctx)
    assert len(recal["lmc_asr"]) == 3


def test_escape_point_and_midpoint_by_hand():
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert escape_point(ts, [0.9, 0.5, 0.1, 0.05, 0.0], 0.2) == 0.5
    assert escape_point(ts, [0.9, 0.1, 0.5, 0.05, 0.0], 0.2) == 0.75  # must STAY below
    assert escape_point(ts, [0.1, 0.1, 0.1, 0.1, 0.1], 0.2) == 0.0
    assert escape_point(ts, [0.9, 0.9, 0.9, 0.9, 0.3], 0.2) is None
    assert _at([0.0, 0.4, 0.6, 1.0], [1.0, 0.8, 0.4, 0.0], 0.5) == pytest.approx(0.6)


def test_retune_set_holds_exactly_k_poisoned_images(ctx):
    ev = bh.create_evaluator("retune", n_images=100)
    assert ev.config.poison_count == 5  # the authors' default; paper 000's per-attack counts live in matrix files
    tuning, idx = ev.retuning_set(ctx)
    assert len(tuning.labels) == 100 and idx.tolist() == [0, 1, 2, 3, 4]
    assert int(tuning.poison_mask.sum()) == 5 and (tuning.labels[idx] == 0).all()
    # BadNets (dirty-label, after_augment): its own poisoned samples, relabelled, stamped by the trainer
    assert tuning.stamp == "after_augment"
    assert torch.equal(tuning.images[idx], ctx.train.images[tuning.source[idx]])
    stamped = tuning.stamp_fn(tuning.images[idx])
    assert (stamped[..., -3:, -3:] == 255).all()
    assert torch.equal(tuning.triggered_images()[idx], stamped)
    assert int(bh.create_evaluator("retune", n_images=100, poison_count=1).retuning_set(ctx)[0].poison_mask.sum()) == 1
    # the 95 others are clean training images with their own labels
    rest = tuning.images[5:]
    assert all(any(torch.equal(img, x) for x in ctx.train.images) for img in rest[:5])
    ev0 = bh.create_evaluator("retune", n_images=100, poison_count=0)
    assert int(ev0.retuning_set(ctx)[0].poison_mask.sum()) == 0
    assert bh.create_evaluator("retune", control=False).needs_clean_model is False
    assert bh.create_evaluator("retune").needs_clean_model is True


def test_retune_is_reproducible(ctx):
    ev = bh.create_evaluator("retune", n_images=100, epochs=1)
    ctx.generator.manual_seed(0)
    first = ev.evaluate(ctx)
    ctx.generator.manual_seed(0)
    assert ev.evaluate(ctx) == first
    assert set(first) == {"retune_asr", "retune_clean_acc", "retune_asr_clean_model"}


@pytest.mark.integration
def test_retuning_revives_a_backdoor_but_not_in_a_clean_model(tmp_path):
    from backdoor_harness.leaderboard.plots import curves
    from backdoor_harness.matrix import MatrixSpec
    from backdoor_harness.scheduler import run_matrix
    from backdoor_harness.store import Store

    spec = MatrixSpec.model_validate({
        "datasets": [{"name": "cifar10", "train_per_class": 400, "test_per_class": 50}],
        "models": [{"name": "tiny_cnn", "kwargs": {"width": 16}}],
        "attacks": [{"name": "badnets", "config": {"stamp": "after_augment"}}],
        "defenses": ["none", {"name": "ep", "config": {"epochs": 10}}],
        "evaluators": [{"name": "retune", "config": {"n_images": 500}}, "asr",
                       {"name": "lmc", "config": {"points": 5}},
                       {"name": "qra", "config": {"hidden": 128, "epochs": 5, "retune": {"n_images": 500}}}],
        "recipe": {"base": "cpu-quick", "epochs": 8}})
    counts = run_matrix(spec, tmp_path, progress=False, log=lambda *a: None)
    assert counts["failed"] == 0 and counts["blocked"] == 0
    m = {(r.attrs.defense, r.attrs.evaluator): r.metrics for r in Store(tmp_path).records("evaluate")}
    assert m[("none", "asr")]["asr"] >= 0.8
    assert m[("none", "retune")]["retune_asr"] >= 0.8
    assert m[("none", "retune")]["retune_asr_clean_model"] <= 0.3
    assert m[("none", "lmc")]["lmc_asr"][0] == m[("none", "lmc")]["lmc_asr"][-1] == m[("none", "asr")]["asr"]
    # the records carry whole curves, one line per defense (`harness run` draws them)
    lines = curves(Store(tmp_path).records("evaluate"))[("cifar10", "tiny_cnn", "badnets", "lmc_asr")]
    assert sorted(lines) == ["ep", "none"] and lines["none"][0] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # one clean reference model serves retune's control and QRA
    assert sum(r.attrs.role == "clean" for r in Store(tmp_path).records("train")) == 1
    assert set(m[("ep", "qra")]) == {"qra_c_asr", "qra_p_asr", "qra_c_asr_clean_model", "qra_p_asr_clean_model"}


def test_qra_perturbation_stays_within_eps_and_pixels(ctx):
    from backdoor_harness.plugins.evaluators.qra import Perturbation

    eps = 16 / 255
    gen = Perturbation((3, 32, 32), 32, eps, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in gen.parameters():
            p.mul_(50)  # saturate tanh: the budget must still hold
        x = torch.rand(8, 3, 32, 32)
        x[0] = 0.0
        x[1] = 1.0
        out = gen(x)
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().max() <= eps + 1e-6
    assert (out - x).abs().max() > eps / 2  # it does perturb
    ev = bh.create_evaluator("qra", hidden=32)
    pert = ev.perturb(gen, ctx.clean_test.images, CPU)
    assert pert.dtype == torch.uint8
    assert (pert.int() - ctx.clean_test.images.int()).abs().max() <= 16


def test_qra_runs_and_is_reproducible(ctx):
    cfg = {"hidden": 64, "epochs": 2, "n_clean": 40, "n_poison": 40, "retune": {"n_images": 60, "epochs": 1}}
    ev = bh.create_evaluator("qra", **cfg)
    ctx.generator.manual_seed(0)
    first = ev.evaluate(ctx)
    ctx.generator.manual_seed(0)
    assert ev.evaluate(ctx) == first
    assert set(first) == {"qra_c_asr", "qra_p_asr", "qra_c_asr_clean_model", "qra_p_asr_clean_model"}
    assert all(0 <= v <= 1 for v in first.values())
    code_form = bh.create_evaluator("qra", alpha_on="kl", **cfg)
    ctx.generator.manual_seed(0)
    assert set(code_form.evaluate(ctx)) == set(first)


def test_retune_fine_tunes_with_its_config_at_a_constant_rate(ctx):
    ev = bh.create_evaluator("retune", n_images=40, epochs=2, lr=0.02, momentum=0.5, weight_decay=1e-4,
                             batch_size=16)
    seen = []
    tuning, _ = ev.retuning_set(ctx)
    ev.retuned(ctx.purified, tuning, dataclasses.replace(ctx, fit=lambda model, data, recipe, **k: seen.append(recipe)))
    assert seen == [Recipe(epochs=2, lr=0.02, momentum=0.5, weight_decay=1e-4, batch_size=16, schedule="constant")]


def test_clean_to_purified_line_runs_from_the_clean_model_to_the_purified_one(ctx):
    from backdoor_harness.plugins.evaluators.lmc import barrier

    out = bh.create_evaluator("lmc", points=3).evaluate(ctx)
    ends = [score(m, ctx.clean_test, ctx.poisoned_test, CPU) for m in (ctx.clean_model, ctx.purified)]
    assert out["lmc_clean_to_purified_t"] == [0.0, 0.5, 1.0]
    assert out["lmc_clean_to_purified_clean_acc"][0] == ends[0].clean_acc
    assert out["lmc_clean_to_purified_asr"][-1] == ends[1].asr
    # the summary is the barrier of that clean-accuracy line (checked by hand in test_barrier_by_hand)
    assert out["lmc_clean_to_purified_barrier"] == barrier(out["lmc_clean_to_purified_t"],
                                                           out["lmc_clean_to_purified_clean_acc"])
    off = bh.create_evaluator("lmc", points=3, clean_to_purified=False)
    assert off.needs_clean_model is False and "lmc_clean_to_purified_barrier" not in off.evaluate(ctx)


def test_barrier_by_hand():
    from backdoor_harness.plugins.evaluators.lmc import barrier

    # the line between 0.9 and 0.7 is 0.8 at t = 0.5; the path dips to 0.3 there
    assert barrier([0.0, 0.5, 1.0], [0.9, 0.3, 0.7]) == pytest.approx(0.5)
    assert barrier([0.0, 0.5, 1.0], [0.9, 0.85, 0.7]) == 0.0  # above the line: no barrier


def test_curves_belong_to_the_grid_with_the_longest_prefix():
    from backdoor_harness.leaderboard.plots import curves

    rec = {"key": "k", "label": "evaluate d/m/a/ft/lmc/s0", "kind": "evaluate", "status": "done",
           "attrs": {"dataset": "d", "seed": 0, "model": "m", "attack": "a", "defense": "ft"},
           "metrics": {"lmc_t": [0, 1], "lmc_asr": [1, 0], "lmc_clean_to_purified_t": [0, 0.5, 1],
                       "lmc_clean_to_purified_asr": [0, 0, 0], "lmc_asr_mid": 0.5}}
    got = curves([rec])
    assert got[("d", "m", "a", "lmc_asr")]["ft"] == ([0, 1], [1.0, 0.0])
    assert got[("d", "m", "a", "lmc_clean_to_purified_asr")]["ft"][0] == [0, 0.5, 1]
    assert len(got) == 2


def test_qra_reference_defense_is_one_shared_purify_job():
    from backdoor_harness.matrix import MatrixSpec, expand

    def spec(reference, ep_config):
        return MatrixSpec.model_validate({
            "datasets": [{"name": "cifar10", "train_per_class": 10, "test_per_class": 5}],
            "models": ["tiny_cnn"], "attacks": ["badnets"],
            "defenses": ["none", {"name": "ep", "config": ep_config}],
            "evaluators": [{"name": "qra", "config": {"reference": reference}}]})

    jobs = expand(spec({"name": "ep", "config": {"epochs": 3}}, {"epochs": 3}))
    purify = [j for j in jobs if j.kind == "purify"]
    assert sorted(j.cell.defense for j in purify) == ["ep", "none"]  # shared with the matrix's ep row
    ep_key = next(j.key for j in purify if j.cell.defense == "ep")
    for job in (j for j in jobs if j.kind == "evaluate"):
        assert job.deps[-1] == ep_key and len(job.deps) == 4
    order = [j.key for j in jobs]
    assert all(order.index(d) < order.index(j.key) for j in jobs for d in j.deps)
    # a different config is a job of its own
    assert sum(j.kind == "purify" for j in expand(spec("ep", {"epochs": 3}))) == 3
    assert bh.create_evaluator("qra").needs_defenses == ()
    with pytest.raises(bh.HarnessError, match="reference"):
        bh.create_evaluator("qra", reference="nosuchdefense")
    with pytest.raises(bh.HarnessError, match="reference"):
        bh.create_evaluator("qra", reference={"name": "ep", "config": {"epochz": 1}})


@pytest.fixture(scope="module")
def lc_ctx(ctx):
    """The same cell attacked by LC (clean-label), its adversarial images prepared against a tiny model."""
    from backdoor_harness.contracts import PrepareContext

    lc = bh.create_attack("lc", pgd_steps=2)
    lc.prepare(PrepareContext(train=ctx.train, device=CPU, generator=torch.Generator().manual_seed(0), seed=0,
                              fit=None, clean_model=tiny(3)))
    return dataclasses.replace(ctx, attack=lc, poisoned_test=lc.poison_test(ctx.clean_test))


def test_retune_set_of_a_clean_label_attack_is_clean_label(lc_ctx):
    """LC retunes with LC's own poisoned samples (as the authors' ft_poison.py): target-class images,
    adversarially perturbed and stamped, at the target label; never relabelled non-target images."""
    ctx = lc_ctx
    tuning, idx = bh.create_evaluator("retune", n_images=100, poison_count=2).retuning_set(ctx)
    assert idx.tolist() == [0, 1] and int(tuning.poison_mask.sum()) == 2
    src = tuning.source[idx]
    assert (ctx.train.labels[src] == 0).all() and (tuning.labels[idx] == 0).all()
    for clean, poisoned in zip(ctx.train.images[src], tuning.images[idx]):
        assert not torch.equal(clean, poisoned)
    corners = tuning.images[idx][..., :3, :3]
    assert (corners[..., 0, 0] == 255).all() and (corners[..., 0, 1] == 0).all()  # the trigger is in the pixels
    # the other 98 rows are clean training images with their own labels
    assert torch.equal(tuning.images[2:], ctx.train.images[tuning.source[2:]])
    assert torch.equal(tuning.labels[2:], ctx.train.labels[tuning.source[2:]])


def test_qra_poisoned_images_follow_the_attack(ctx, lc_ctx):
    ev = bh.create_evaluator("qra", n_poison=7)
    assert ev.config.alpha == 0.2
    ctx.generator.manual_seed(0)
    x, y = ev.poisoned_images(ctx)  # BadNets: its own poisoned training samples whose class is not the target
    assert len(y) == 7 and (y != 0).all() and (x[..., -3:, -3:] == 255).all()
    lc_ctx.generator.manual_seed(0)
    x, y = ev.poisoned_images(lc_ctx)  # LC: non-target images with the test-time trigger (as its poisoned test set)
    assert len(y) == 7 and (y != 0).all()
    assert (x[..., :3, :3][..., 0, 0] == 255).all() and (x[..., -3:, -3:][..., 2, 2] == 255).all()
    assert all(any(torch.equal(lc_ctx.attack.apply_trigger(t[None])[0], img) for t in lc_ctx.train.images)
               for img in x[:2])
