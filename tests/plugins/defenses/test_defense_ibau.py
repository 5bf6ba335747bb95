"""i-BAU's mechanism, tested directly: the hypergradient against explicit matrices, the perturbation's
bound, the outer step, and the contract on the tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from backdoor_harness.plugins.defenses.ibau import (IBAU, hypergradient, inner_loss, maximize_perturbation,
                                                    outer_loss, project_l2)

from helpers import CPU, check_contract, context, noise_set, same, state, tiny

QUICK = dict(rounds=1, fixed_point_iters=2, batch_size=16, patch_fraction=0.25)


def floats(data):
    return data.images.float() / 255, data.labels


@pytest.mark.parametrize("k", [1, 5])
def test_hypergradient_equals_the_truncated_neumann_series_with_explicit_matrices(k):
    """On a linear softmax model (3x4x4 images, 3 classes, float64) build the inner Hessian H and the mixed
    derivative M = d(grad_delta L_in)/d theta as matrices; the fixed-point hypergradient after K iterations is
    g_theta + (-beta M)^T sum_{j<K} (I - beta H)^j g_delta."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x, y = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    x0, y0 = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64), torch.tensor([2, 2, 0, 1, 0])
    delta = 0.3 * torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    patched = torch.tensor([True, False, True, False, False, True])
    cfg = IBAU.Config(fixed_point_iters=k, fixed_point_step=0.1, inner_reg=1e-3)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    shapes = [p.shape for p in params]

    def unflat(theta):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = theta[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    theta = torch.cat([p.detach().flatten() for p in params])
    d = delta.flatten().clone()

    def l_out(dd, th):
        m = patched.double()[:, None, None, None]
        return F.cross_entropy(functional_call(model, unflat(th), (x + m * dd.view(1, 3, 4, 4),)), y)

    def grad_in(dd, th):  # grad_delta L_in, as a function of (delta, theta)
        dd = dd.detach().requires_grad_(True) if not dd.requires_grad else dd
        loss = -F.cross_entropy(functional_call(model, unflat(th), (x0 + dd.view(1, 3, 4, 4),)), y0) \
            + 1e-3 * dd.pow(2).sum()
        return torch.autograd.grad(loss, dd, create_graph=True)[0]

    g_d, g_t = torch.autograd.grad(l_out(d.requires_grad_(True), theta.requires_grad_(True)), [d, theta])
    h = hessian(lambda dd: -F.cross_entropy(functional_call(model, unflat(theta.detach()),
                                                            (x0 + dd.view(1, 3, 4, 4),)), y0)
                + 1e-3 * dd.pow(2).sum(), d.detach())  # 48 x 48
    mixed = jacobian(lambda th: grad_in(d.detach().requires_grad_(True), th), theta.detach())  # 48 x 51
    j = torch.eye(48, dtype=torch.float64) - 0.1 * h  # d Phi / d delta
    b = -0.1 * mixed  # d Phi / d theta
    v = torch.zeros(48, dtype=torch.float64)
    for _ in range(k):
        v = j.T @ v + g_d
    expected = g_t + b.T @ v

    grads, loss = hypergradient(model, params, delta, (x, y, patched), (x0, y0), cfg)
    got = torch.cat([gr.flatten() for gr in grads])
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-10)
    assert loss == pytest.approx(float(l_out(d.detach(), theta.detach())))
    assert (got - g_t).abs().max() > 1e-4  # the implicit term is there (the test can fail)


def test_no_perturbed_image_gives_the_plain_gradient():
    model = tiny()
    x, y = floats(noise_set(8))
    params = list(model.parameters())
    delta = torch.rand(1, 3, 32, 32)
    grads, _ = hypergradient(model, params, delta, (x, y, torch.zeros(8, dtype=torch.bool)), (x, y),
                             IBAU.Config())
    plain = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    assert all(torch.allclose(a, b) for a, b in zip(grads, plain))


def test_the_perturbation_ascends_and_respects_its_norm_bound():
    model = tiny()
    x, _ = floats(noise_set(32))
    batches = [x[:16], x[16:]]
    free = maximize_perturbation(model, iter(batches), IBAU.Config(norm_bound=None), (3, 32, 32), CPU)
    assert free.shape == (1, 3, 32, 32)
    bound = 0.5 * float(free.norm())  # so the projection must act
    bounded = maximize_perturbation(model, iter(batches), IBAU.Config(norm_bound=bound), (3, 32, 32), CPU)
    assert float(bounded.norm()) <= bound * (1 + 1e-6)
    assert torch.allclose(bounded, free * bound / free.norm(), atol=1e-7)  # projected once, after the pass
    assert torch.equal(project_l2(free, 2 * float(free.norm())), free)  # inside the ball: unchanged
    # the universal perturbation raises the loss against the model's own labels
    with torch.no_grad():
        own = model(x).argmax(1)
        assert F.cross_entropy(model(x + bounded), own) > F.cross_entropy(model(x), own)
    # and its SGD step is the hand-computed one: from 0, delta = -lr * grad of -CE(f(x + 0), y') + 0
    one = maximize_perturbation(model, iter([x[:16]]), IBAU.Config(norm_bound=None, inner_lr=10.0),
                                (3, 32, 32), CPU)
    z = torch.zeros(1, 3, 32, 32, requires_grad=True)
    (gz,) = torch.autograd.grad(inner_loss(model, z, x[:16], model(x[:16]).argmax(1).detach(), 1e-3), z)
    assert torch.allclose(one, -10.0 * gz, atol=1e-7)


def test_one_outer_step_reduces_the_loss_on_the_perturbed_batch():
    model = tiny()
    x, y = floats(noise_set(32))
    delta = maximize_perturbation(model, iter([x[:16], x[16:]]), IBAU.Config(), (3, 32, 32), CPU)
    patched = torch.ones(16, dtype=torch.bool)
    params = list(model.parameters())
    with torch.no_grad():
        before = float(outer_loss(model, delta, x[:16], y[:16], patched))
    grads, loss = hypergradient(model, params, delta, (x[:16], y[:16], patched), (x[16:], y[16:]),
                                IBAU.Config(fixed_point_iters=5))
    assert loss == pytest.approx(before, rel=1e-5)
    opt = torch.optim.Adam(params, lr=1e-3, amsgrad=True)
    for p, gr in zip(params, grads):
        p.grad = gr
    opt.step()
    with torch.no_grad():
        after = float(outer_loss(model, delta, x[:16], y[:16], patched))
    assert after < before


def test_contract_on_the_tiny_model():
    model = tiny()
    given = state(model)
    defense = IBAU(**QUICK)
    out = check_contract(model, defense, lambda seed: defense.purify(model, context(model, n=32, seed=seed)).model,
                         seeds_differ=True)
    assert not same(out, model)  # it did train
    # BN running statistics: the model stays in eval mode, so they are the attacked model's
    assert all(torch.equal(given[k], v) for k, v in out.state_dict().items() if "running" in k)
    assert IBAU.Config.model_validate_json(IBAU.Config(norm_bound=None).model_dump_json()).norm_bound is None
    for bad in (dict(norm_bound=0.0), dict(patch_fraction=1.5), dict(inner_batch="last"), dict(lr=0),
                dict(fixed_point_iters=0), dict(adam_beta2=1.0)):
        with pytest.raises(ValueError):
            IBAU.Config(**bad)


def test_defaults_follow_paper_000_backdoorbench_and_the_authors():
    cfg = IBAU.Config()
    assert (cfg.rounds, cfg.fixed_point_iters, cfg.fixed_point_step) == (20, 5, 0.1)
    assert (cfg.lr, cfg.adam_beta1, cfg.adam_beta2, cfg.amsgrad, cfg.weight_decay) == (1e-4, 0.9, 0.999, True, 0.0)
    assert (cfg.batch_size, cfg.inner_lr, cfg.inner_reg, cfg.norm_bound, cfg.patch_fraction) == (256, 10.0, 1e-3,
                                                                                                  10.0, 0.01)
    assert (cfg.inner_batch, cfg.augment) == ("first", True)
