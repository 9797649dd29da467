"""dg_meta.episode_solvers: ridge regression against its primal closed form; the interior-point QP solver's start and
first step against a textbook Mehrotra step on the full KKT system, its solution against the KKT conditions, its
implicit gradients against finite differences; the Crammer-Singer dual against its matrices written out, the primal
SVM (strong duality, scipy's primal solution) and a separable episode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import Tensor

from dg_meta import episode_solvers
from dg_meta.episode_solvers import (
    crammer_singer_dual,
    crammer_singer_svm_logits,
    interior_point,
    ridge_regression,
    solve_qp,
)

DT = torch.float64


def mv(m: Tensor, v: Tensor) -> Tensor:
    return torch.einsum("...ij,...j->...i", m, v)


def random_qp(seed: int, batch: int = 3, n: int = 6, m: int = 8, k: int = 2, rank: int | None = None):
    """A feasible problem: ``Q = M M^T`` (+ 0.1 I unless ``rank`` makes it singular), constraints through a random
    point ``z0`` with positive slacks."""
    g = torch.Generator().manual_seed(seed)
    mat = torch.randn(batch, n, rank or n, generator=g, dtype=DT)
    q = mat @ mat.transpose(1, 2) + (0 if rank else 0.1) * torch.eye(n, dtype=DT)
    p = torch.randn(batch, n, generator=g, dtype=DT)
    gm = torch.randn(batch, m, n, generator=g, dtype=DT)
    z0 = torch.randn(batch, n, generator=g, dtype=DT)
    h = mv(gm, z0) + torch.rand(batch, m, generator=g, dtype=DT)
    a = torch.randn(batch, k, n, generator=g, dtype=DT)
    return q, p, gm, h, a, mv(a, z0)


# ridge regression


@pytest.mark.parametrize(("n", "d"), [(3, 7), (7, 3), (4, 4)])
def test_ridge_regression_is_the_primal_closed_form_and_the_woodbury_form(n, d):
    g = torch.Generator().manual_seed(n * 10 + d)
    x, y = torch.randn(2, n, d, generator=g, dtype=DT), torch.randn(2, n, 3, generator=g, dtype=DT)
    lam = 0.7
    primal = torch.linalg.inv(x.transpose(1, 2) @ x + lam * torch.eye(d, dtype=DT)) @ x.transpose(1, 2) @ y
    woodbury = x.transpose(1, 2) @ torch.linalg.inv(x @ x.transpose(1, 2) + lam * torch.eye(n, dtype=DT)) @ y
    assert torch.allclose(primal, woodbury, atol=1e-12)
    assert torch.allclose(ridge_regression(x, y, lam), primal, atol=1e-12)
    assert torch.allclose(ridge_regression(x[0], y[0], torch.tensor(lam, dtype=DT)), primal[0], atol=1e-12)


# the interior-point method


def kkt_violations(q, p, gm, h, a, b, it) -> dict[str, float]:
    slack = h - mv(gm, it.z)
    return {
        "stationarity": (mv(q, it.z) + p + mv(gm.transpose(1, 2), it.lam) + mv(a.transpose(1, 2), it.nu)).abs().max(),
        "primal inequality": (-slack).clamp(min=0).max(),
        "primal equality": (mv(a, it.z) - b).abs().max() if b.numel() else torch.zeros(()),
        "dual feasibility": (-it.lam).clamp(min=0).max(),
        "complementary slackness": (it.lam * slack).abs().max(),
    }


@pytest.mark.parametrize(("k", "rank"), [(2, None), (0, None), (2, 3)], ids=["equalities", "none", "singular-Q"])
def test_solution_meets_the_kkt_conditions(k, rank):
    problem = random_qp(k + (rank or 0), k=k, rank=rank)
    it = interior_point(*problem, max_iter=30)
    violations = kkt_violations(*problem, it)
    assert all(v < 1e-6 for v in violations.values()), violations
    assert (it.s > 0).all() and (it.lam > 0).all()
    assert torch.allclose(it.s, problem[3] - mv(problem[2], it.z), atol=1e-9)


def full_newton(q, gm, a, z, s, lam, nu, rhs: list[Tensor]) -> list[Tensor]:
    """The Newton step of one problem on the unreduced KKT system in ``(dz, ds, dlam, dnu)``:
    ``[[Q, 0, G^T, A^T], [G, I, 0, 0], [A, 0, 0, 0], [0, diag(lam), diag(s), 0]]``."""
    n, m, k = len(z), len(s), len(nu)
    mat = torch.zeros(n + 2 * m + k, n + 2 * m + k, dtype=DT)
    mat[:n, :n], mat[:n, n + m:n + 2 * m], mat[:n, n + 2 * m:] = q, gm.t(), a.t()
    mat[n:n + m, :n], mat[n:n + m, n:n + m] = gm, torch.eye(m, dtype=DT)
    mat[n + m:n + m + k, :n] = a
    mat[n + m + k:, n:n + m], mat[n + m + k:, n + m:n + 2 * m] = torch.diag(lam), torch.diag(s)
    sol = torch.linalg.solve(mat, torch.cat(rhs))
    return [sol[:n], sol[n:n + m], sol[n + m:n + 2 * m], sol[n + 2 * m:]]


def longest_step(v: Tensor, dv: Tensor) -> float:
    return min([-vi / dvi for vi, dvi in zip(v.tolist(), dv.tolist()) if dvi < 0], default=float("inf"))


@pytest.mark.parametrize(("seed", "batch", "n", "m"), [(5, 2, 4, 5), (2, 1, 3, 3)], ids=["step-limited", "full-step"])
def test_start_and_first_iteration_are_qpths_start_and_a_mehrotra_predictor_corrector_step(seed, batch, n, m):
    q, p, gm, h, a, b = random_qp(seed, batch=batch, n=n, m=m, k=1)
    start = interior_point(q, p, gm, h, a, b, max_iter=1)
    first = interior_point(q, p, gm, h, a, b, max_iter=2)
    for i in range(batch):
        # start: the KKT system with unit scaling, Q z + G^T lam + A^T nu = -p, s + lam = 0, G z + s = h, A z = b
        z, s, lam, nu = full_newton(q[i], gm[i], a[i], torch.zeros(n, dtype=DT), torch.ones(m, dtype=DT),
                                    torch.ones(m, dtype=DT), torch.zeros(1, dtype=DT),
                                    [-p[i], h[i], b[i], torch.zeros(m, dtype=DT)])
        s = s + max(0.0, 1 - s.min().item())
        lam = lam + max(0.0, 1 - lam.min().item())
        assert min(s.min(), lam.min()) > 1 - 1e-12
        for mine, hand in zip(start, (z, s, lam, nu)):
            assert torch.allclose(mine[i], hand, atol=1e-10)
        # one Mehrotra step
        r = [mv(q[i], z) + p[i] + gm[i].t() @ lam + a[i].t() @ nu, gm[i] @ z + s - h[i], a[i] @ z - b[i]]
        mu = (s @ lam).item() / m
        aff = full_newton(q[i], gm[i], a[i], z, s, lam, nu, [-r[0], -r[1], -r[2], -s * lam])
        t = min(1.0, longest_step(s, aff[1]), longest_step(lam, aff[2]))
        assert (t < 1) == (seed == 5)  # the second case's affine step is cut to 1
        sigma = (((s + t * aff[1]) @ (lam + t * aff[2])).item() / m / mu) ** 3
        step = full_newton(q[i], gm[i], a[i], z, s, lam, nu,
                           [-r[0], -r[1], -r[2], -(s * lam + aff[1] * aff[2] - sigma * mu)])
        t = min(1.0, 0.999 * min(longest_step(s, step[1]), longest_step(lam, step[2])))
        for mine, v, dv in zip(first, (z, s, lam, nu), step):
            assert torch.allclose(mine[i], v + t * dv, atol=1e-9)


def test_start_shifts_only_the_vector_with_an_entry_below_one():
    # min z^2 / 2 subject to z <= 5 (start z = 2.5, slack 2.5) and subject to z <= -5 (start z = -2.5, slack -2.5)
    q, g = torch.ones(2, 1, 1, dtype=DT), torch.ones(2, 1, 1, dtype=DT)
    start = interior_point(q, torch.zeros(2, 1, dtype=DT), g, torch.tensor([[5.0], [-5.0]], dtype=DT),
                           torch.zeros(2, 0, 1, dtype=DT), torch.zeros(2, 0, dtype=DT), max_iter=1)
    assert start.z.flatten().tolist() == [2.5, -2.5]
    assert start.s.flatten().tolist() == [2.5, 1.0]
    assert start.lam.flatten().tolist() == [1.0, 2.5]


def test_longest_step_ignores_directions_that_do_not_decrease():
    v = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]], dtype=DT)
    dv = torch.tensor([[0.0, -1.0, 2.0], [0.0, 0.0, 1.0]], dtype=DT)
    assert episode_solvers._max_step(v, dv).tolist() == [2.0, float("inf")]


def hand_residual(problem, it) -> Tensor:
    """qpth's ``resids``: ``||r_dual|| + ||r_ineq|| + ||r_eq|| + m mu``, one per problem."""
    q, p, gm, h, a, b = problem
    return ((mv(q, it.z) + p + mv(gm.transpose(-1, -2), it.lam) + mv(a.transpose(-1, -2), it.nu)).norm(dim=-1)
            + (mv(gm, it.z) + it.s - h).norm(dim=-1) + (mv(a, it.z) - b).norm(dim=-1) + (it.s * it.lam).sum(-1))


def test_iterations_stop_at_the_first_point_whose_residual_is_below_tol():
    problem = random_qp(6, batch=1)
    points = [interior_point(*problem, max_iter=i) for i in range(1, 9)]  # the 9th no longer improves
    residuals = [hand_residual(problem, it).item() for it in points]
    assert all(later < earlier for earlier, later in zip(residuals, residuals[1:]))
    for j in (2, 5, 7):
        tol = residuals[j - 1] * 0.999  # the residual of point j is below it, that of point j - 1 just above
        for mine, hand in zip(interior_point(*problem, max_iter=30, tol=tol), points[j]):
            assert torch.equal(mine, hand)


def test_iterations_stop_at_the_tolerance_and_return_the_best_iterate():
    problem = random_qp(6, batch=2)
    start = interior_point(*problem, max_iter=1)
    for mine, hand in zip(interior_point(*problem, max_iter=20, tol=float("inf")), start):
        assert torch.equal(mine, hand)
    loose = interior_point(*problem, max_iter=30, tol=1e-3)
    assert max(kkt_violations(*problem, loose).values()) < 1e-3
    assert max(kkt_violations(*problem, loose).values()) > 1e-11  # stopped well before full convergence
    # more iterations never return a worse point: each problem keeps its smallest-residual iterate
    problem = random_qp(0)
    values = torch.stack([hand_residual(problem, interior_point(*problem, max_iter=i)) for i in range(1, 25)])
    assert (values[1:] <= values[:-1]).all()
    assert (values[-1] < 1e-8).all()


def test_gradients_of_the_solution_match_finite_differences_in_every_input():
    problem = random_qp(1, batch=2, n=4, m=5, k=1)
    it = interior_point(*problem, max_iter=50)
    slack = problem[3] - mv(problem[2], it.z)
    assert ((it.lam > 1e-3) | (slack > 1e-3)).all() and ((it.lam > 1e-3).sum(1) > 0).all()  # strictly complementary
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 4, generator=g, dtype=DT)
    inputs = [t.clone().requires_grad_() for t in problem]
    grads = torch.autograd.grad((solve_qp(*inputs, max_iter=50) * w).sum(), inputs)
    assert torch.allclose(grads[0], grads[0].transpose(1, 2))  # Q's gradient is symmetric, as qpth's
    for i, (value, grad) in enumerate(zip(problem, grads)):
        direction = torch.randn(value.shape, generator=g, dtype=DT)
        if i == 0:
            direction = direction + direction.transpose(1, 2)  # Q stays symmetric

        def f(eps: float, i=i, value=value, direction=direction) -> float:
            args = list(problem)
            args[i] = value + eps * direction
            return (solve_qp(*args, max_iter=50) * w).sum().item()

        numeric = (f(1e-6) - f(-1e-6)) / 2e-6
        assert (grad * direction).sum().item() == pytest.approx(numeric, rel=1e-5, abs=1e-8), i


def test_backward_before_convergence_is_optnets_reduced_system_at_the_returned_point():
    problem = random_qp(8, batch=2, n=4, m=5, k=1)
    it = interior_point(*problem, max_iter=3)  # MetaOptNet's iterations at test time: far from converged
    q, p, gm, h, a, b = problem
    inputs = [t.clone().requires_grad_() for t in problem]
    g = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=DT)
    grads = torch.autograd.grad(solve_qp(*inputs, max_iter=3), inputs, g)
    for i in range(2):
        d = torch.diag(it.lam[i] / it.s[i])
        kkt = torch.cat([torch.cat([q[i] + gm[i].t() @ d @ gm[i], a[i].t()], 1),
                         torch.cat([a[i], torch.zeros(1, 1, dtype=DT)], 1)])
        sol = torch.linalg.solve(kkt, torch.cat([-g[i], torch.zeros(1, dtype=DT)]))
        dz, dnu = sol[:4], sol[4:]
        dlam = d @ gm[i] @ dz
        expected = [(torch.outer(dz, it.z[i]) + torch.outer(it.z[i], dz)) / 2, dz,
                    torch.outer(it.lam[i], dz) + torch.outer(dlam, it.z[i]), -dlam,
                    torch.outer(it.nu[i], dz) + torch.outer(dnu, it.z[i]), -dnu]
        for mine, hand in zip(grads, expected):
            assert torch.allclose(mine[i], hand, atol=1e-8)


def test_any_leading_batch_dimensions():
    flat = random_qp(7, batch=4, n=4, m=5, k=1)
    nested = [t.reshape(2, 2, *t.shape[1:]) for t in flat]
    for mine, hand in zip(interior_point(*nested, max_iter=6), interior_point(*flat, max_iter=6)):
        assert torch.allclose(mine.flatten(0, 1), hand, atol=1e-12)
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=DT)
    grads = []
    for problem in (flat, nested):
        inputs = [t.clone().requires_grad_() for t in problem]
        grads.append(torch.autograd.grad(solve_qp(*inputs, max_iter=6), inputs, w.reshape(inputs[1].shape)))
    for hand, mine in zip(*grads):
        assert torch.allclose(mine.flatten(0, 1), hand, atol=1e-10)


def test_solve_qp_returns_the_inputs_dtype_and_differentiates_through_the_cast():
    q, p, gm, h, a, b = (t.float() for t in random_qp(2))
    p.requires_grad_()
    z = solve_qp(q, p, gm, h, a, b, max_iter=30)
    assert z.dtype == torch.float32
    z.sum().backward()
    assert p.grad is not None and p.grad.dtype == torch.float32
    assert torch.allclose(z.double(), interior_point(*random_qp(2), max_iter=30).z, atol=1e-5)


# the Crammer-Singer SVM


def test_crammer_singer_dual_is_the_official_qp():
    x = torch.tensor([[[1.0, 2.0], [0.0, -1.0]]], dtype=DT)  # two examples, labels 1 and 0, 2-way
    q, p, gm, h, a, b = crammer_singer_dual(x, torch.tensor([[1, 0]]), 2, 0.5)
    k = [[5.0, -2.0], [-2.0, 1.0]]  # x x^T; alpha ordered (i=0,m=0), (0,1), (1,0), (1,1)
    assert q[0].tolist() == [[k[0][0], 0, k[0][1], 0], [0, k[0][0], 0, k[0][1]],
                             [k[1][0], 0, k[1][1], 0], [0, k[1][0], 0, k[1][1]]]
    assert p[0].tolist() == [0, -1, -1, 0]
    assert torch.equal(gm[0], torch.eye(4, dtype=DT))
    assert h[0].tolist() == [0, 0.5, 0.5, 0]
    assert a[0].tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    assert b[0].tolist() == [0, 0]


def primal_svm(x: np.ndarray, y: np.ndarray, n_way: int, c: float) -> np.ndarray:
    """Crammer & Singer's primal by scipy: ``min 1/2 ||W||^2 + C sum_i xi_i`` subject to ``w_{y_i} . x_i - w_m . x_i
    >= 1 - [m = y_i] - xi_i`` for all ``i, m``; returns ``W`` (n_way x d)."""
    n, d = x.shape

    def unpack(v):
        return v[: n_way * d].reshape(n_way, d), v[n_way * d:]

    constraints = [{"type": "ineq", "fun": lambda v, i=i, m=m: (unpack(v)[0][y[i]] - unpack(v)[0][m]) @ x[i]
                    - (m != y[i]) + unpack(v)[1][i]} for i in range(n) for m in range(n_way)]
    result = minimize(lambda v: 0.5 * (unpack(v)[0] ** 2).sum() + c * unpack(v)[1].sum(),
                      np.zeros(n_way * d + n), constraints=constraints, method="SLSQP",
                      options={"ftol": 1e-14, "maxiter": 500})
    assert result.success
    return unpack(result.x)[0]


def test_svm_dual_solution_is_the_primal_svm_with_zero_duality_gap():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 3, generator=g, dtype=DT)
    y = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 2, 1, 0]])
    query = torch.randn(2, 4, 3, generator=g, dtype=DT)
    c = 0.3
    problem = crammer_singer_dual(x, y, 3, c)
    alpha = interior_point(*problem, max_iter=40).z
    logits = crammer_singer_svm_logits(x, y, query, 3, c, max_iter=40)
    for e in range(2):
        weights = alpha[e].view(6, 3).t() @ x[e]
        scores = x[e] @ weights.t()
        one_hot = F.one_hot(y[e], 3).to(DT)
        slack = (scores + 1 - one_hot - (scores * one_hot).sum(1, keepdim=True)).amax(1)
        primal = 0.5 * weights.pow(2).sum() + c * slack.sum()
        dual = 0.5 * weights.pow(2).sum() - (alpha[e] * one_hot.flatten()).sum()
        assert (primal + dual).abs() < 1e-7
        reference = torch.from_numpy(primal_svm(x[e].numpy(), y[e].numpy(), 3, c))
        assert torch.allclose(weights, reference, atol=1e-5)
        assert torch.allclose(logits[e], query[e] @ reference.t(), atol=1e-5)


def test_svm_on_a_separable_episode_classifies_its_support_and_queries():
    g = torch.Generator().manual_seed(4)
    centres = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]], dtype=DT)
    y = torch.arange(3).repeat_interleave(3)
    support = (centres[y] + 0.3 * torch.randn(9, 3, generator=g, dtype=DT)).unsqueeze(0)
    query = (centres[y] + 0.3 * torch.randn(9, 3, generator=g, dtype=DT)).unsqueeze(0)
    for x in (support, query):
        assert torch.equal(crammer_singer_svm_logits(support, y[None], x, 3, 0.1, max_iter=15)[0].argmax(1), y)


def test_svm_logits_gradients_match_finite_differences_in_support_and_query_features():
    g = torch.Generator().manual_seed(5)
    support, query = torch.randn(2, 4, 3, generator=g, dtype=DT), torch.randn(2, 3, 3, generator=g, dtype=DT)
    y = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0]])
    w = torch.randn(2, 3, 2, generator=g, dtype=DT)
    s, qx = support.clone().requires_grad_(), query.clone().requires_grad_()
    grads = torch.autograd.grad((crammer_singer_svm_logits(s, y, qx, 2, 0.1, max_iter=40) * w).sum(), [s, qx])
    for which, grad in enumerate(grads):
        direction = torch.randn(grad.shape, generator=g, dtype=DT)

        def f(eps: float, which=which, direction=direction) -> float:
            args = [support, query]
            args[which] = args[which] + eps * direction
            return (crammer_singer_svm_logits(args[0], y, args[1], 2, 0.1, max_iter=40) * w).sum().item()

        assert (grad * direction).sum().item() == pytest.approx((f(1e-6) - f(-1e-6)) / 2e-6, rel=1e-5, abs=1e-8)
