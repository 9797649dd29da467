"""iMAML: CG against the explicit (I + H/lambda)^-1 g, the proximal inner problem, the meta-update (the Adam
step on the mean implicit gradient, by hand), transductive adapt, the defaults and search space, the n_way check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.imaml import implicit_meta_gradient, proximal_inner_loop
from episode_checks import assert_other_way_refused
from torch import nn

from dg_meta import registry
from dg_meta.functional import conjugate_gradient, flat, functional_forward, parameters_of, unflat
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.samplers import Episode

SHAPE = (1, 16, 16)


def episode(seed: int, way: int = 5, query: int = 2) -> Episode:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(way)
    return Episode(torch.randn(way, *SHAPE, generator=g, dtype=torch.float64), labels,
                   torch.randn(way * query, *SHAPE, generator=g, dtype=torch.float64),
                   labels.repeat_interleave(query), labels, torch.zeros(way, dtype=torch.long))


def make(**overrides):
    torch.manual_seed(0)
    cls = registry.get_algorithm("iMAML")
    return cls(SHAPE, 10, 3, resolve(declared_hparams(cls), 0, overrides)).double()


def toy_task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3, dtype=torch.float64), nn.Tanh(), nn.Linear(3, 3, dtype=torch.float64))
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.arange(3).repeat(4)
    qx = torch.randn(9, 4, generator=g, dtype=torch.float64)
    qy = torch.arange(3).repeat(3)
    return model, x, y, qx, qy


def forward_of(model: nn.Module):
    """The per-task loop's forward: ``model`` with the given parameters."""
    return lambda params, x: functional_forward(model, params, x)


def test_conjugate_gradient_solves_a_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.t() + torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    assert torch.allclose(conjugate_gradient(lambda v: a @ v, b, 6), torch.linalg.solve(a, b), atol=1e-8)


def test_cg_meta_gradient_matches_the_explicit_inverse():
    model, x, y, qx, qy = toy_task()
    lam = 2.0
    phi = {k: v.detach().clone().requires_grad_() for k, v in parameters_of(model).items()}
    names, shapes = list(phi), list(phi.values())

    def support_loss(vector):
        return F.cross_entropy(functional_forward(model, dict(zip(names, unflat(vector, shapes))), x), y)

    point = flat([v.detach() for v in shapes])
    hessian = torch.autograd.functional.hessian(support_loss, point)
    g = flat(torch.autograd.grad(F.cross_entropy(functional_forward(model, phi, qx), qy), shapes))
    explicit = torch.linalg.solve(torch.eye(len(point), dtype=torch.float64) + hessian / lam, g)
    assert torch.linalg.eigvalsh(torch.eye(len(point), dtype=torch.float64) + hessian / lam).min() > 0
    solved = implicit_meta_gradient(forward_of(model), phi, x, y, qx, qy, lam, cg_steps=len(point))
    assert torch.allclose(solved, explicit, atol=1e-8)
    few = implicit_meta_gradient(forward_of(model), phi, x, y, qx, qy, lam, cg_steps=5)
    assert (few - explicit).norm() < 0.1 * explicit.norm()


def test_proximal_inner_loop_reaches_the_regularised_minimum():
    model, x, y, _, _ = toy_task(1)
    theta = parameters_of(model)
    lam = 2.0
    phi = proximal_inner_loop(forward_of(model), theta, x, y, lam, steps=500, lr=0.2)
    loss = F.cross_entropy(functional_forward(model, phi, x), y)
    grads = torch.autograd.grad(loss, list(phi.values()))
    stationarity = flat([gr + lam * (phi[k] - theta[k]).detach() for gr, k in zip(grads, phi)])
    assert stationarity.abs().max() < 1e-8
    assert all(v.grad_fn is None for v in phi.values())


def test_defaults_are_the_official_omniglot_5way_1shot_command():
    """imaml_dev examples/README.md: --lam 2.0 --inner_lr 1e-1 --n_steps 16 --cg_steps 5 --task_mb_size 32
    --outer_lr 1e-3, and measure_accuracy.py --n_steps 16 (the class docstring says so)."""
    hp = make().hparams
    assert (hp["lam"], hp["inner_lr"], hp["inner_steps"], hp["cg_steps"], hp["meta_batch_size"], hp["lr"],
            hp["inner_steps_test"]) == (2.0, 0.1, 16, 5, 32, 1e-3, 16)


def test_random_search_space():
    """What hparams seeds 1..300 draw: every option of each choice, the whole declared ranges."""
    declared = declared_hparams(registry.get_algorithm("iMAML"))

    def drawn(name):
        return [resolve({name: declared[name]}, seed)[name] for seed in range(1, 301)]

    for name, low, high in (("lam", -1, 1), ("inner_lr", -2, 0)):
        values = drawn(name)
        assert 10 ** low <= min(values) < 10 ** (low + 0.1) and 10 ** (high - 0.1) < max(values) <= 10 ** high
    assert {name: set(drawn(name)) for name in ("meta_batch_size", "inner_steps", "inner_steps_test",
                                                "cg_steps")} == {
        "meta_batch_size": {4, 8, 16, 32}, "inner_steps": {5, 10, 16, 25}, "inner_steps_test": {16, 25},
        "cg_steps": {3, 5, 10}}


def test_an_episode_of_another_way_is_refused_in_update_and_adapt():
    assert_other_way_refused(make(), episode(0, way=3), "iMAML")


def test_update_is_one_adam_step_on_the_mean_implicit_gradient():
    """float64: theta' = one step of a hand-written Adam (lr 1e-3, betas 0.9/0.999, eps 1e-8) on the mean over
    tasks of (I + H/lam)^-1 grad L_query(phi_i); the reported loss is the mean query loss at the phi_i."""
    algorithm = make(inner_steps=3, cg_steps=2)
    episodes = [episode(1), episode(2)]
    theta = parameters_of(algorithm.network)
    before = [p.detach().clone() for p in theta.values()]
    grads, losses = [], []
    for e in episodes:
        phi = proximal_inner_loop(forward_of(algorithm.network), theta, e.support_x, e.support_y, 2.0, 3, 0.1)
        grads.append(implicit_meta_gradient(forward_of(algorithm.network), phi, e.support_x, e.support_y, e.query_x,
                                            e.query_y, 2.0, 2))
        losses.append(F.cross_entropy(functional_forward(algorithm.network, phi, e.query_x), e.query_y).item())
    expected = HandAdam(before, lr=1e-3).step(unflat((grads[0] + grads[1]) / 2, before))
    reported = algorithm.update(episodes)
    for p, want in zip(parameters_of(algorithm.network).values(), expected):
        assert torch.allclose(p, want, rtol=0, atol=1e-12)
    assert float(reported["loss"]) == pytest.approx(sum(losses) / 2, abs=1e-12)


def test_adapt_takes_the_proximal_steps_with_batch_statistics_and_changes_nothing():
    """Eval mode: inner_steps_test proximal steps (lam 2, lr 0.1) from theta on the support set, then the query
    logits, all with the batch's own normalisation statistics (transductive: the layers keep no running averages)."""
    algorithm = make(inner_steps_test=4)
    assert not [k for k in algorithm.state_dict() if "running" in k]
    e = episode(3)
    theta = parameters_of(algorithm.network)
    phi = proximal_inner_loop(forward_of(algorithm.network), theta, e.support_x, e.support_y, 2.0, 4, 0.1)
    with torch.no_grad():
        expected = functional_forward(algorithm.network, phi, e.query_x)
    state = {k: v.clone() for k, v in algorithm.state_dict().items()}
    algorithm.eval()
    with torch.no_grad():
        logits = algorithm.adapt(e.support_x, e.support_y)(e.query_x)
    assert logits.shape == (10, 5) and torch.allclose(logits, expected, rtol=0, atol=1e-12)
    assert all(torch.equal(state[k], v) for k, v in algorithm.state_dict().items())
