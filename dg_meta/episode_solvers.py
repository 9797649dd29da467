"""Differentiable per-episode solvers for few-shot heads: closed-form ridge regression, a batched quadratic-program
solver with implicit gradients, and the Crammer-Singer multi-class SVM solved through its dual.

- ``ridge_regression``: ``argmin_W ||X W - Y||^2 + lam ||W||^2`` in closed form, through the Woodbury identity
  ``X^T (X X^T + lam I)^-1 Y`` when there are no more examples than features (R2D2).
- ``solve_qp``: ``argmin_z 1/2 z^T Q z + p^T z`` subject to ``G z <= h``, ``A z = b`` for a batch of problems,
  by a primal-dual interior-point method (Mehrotra's predictor-corrector, as qpth's batched solver), with the
  gradient of the solution by implicit differentiation of the KKT conditions (OptNet, Amos & Kolter 2017).
  ``interior_point`` gives the primal and dual iterate without gradients.
- ``crammer_singer_dual`` and ``crammer_singer_svm_logits``: the dual QP of the Crammer-Singer SVM on an
  episode's support set and the query scores of its solution (MetaOptNet).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def ridge_regression(x: Tensor, y: Tensor, lam: Tensor | float) -> Tensor:
    """``W = argmin_W ||X W - Y||^2 + lam ||W||^2`` for ``x`` (n x d) and ``y`` (n x c), batched over leading
    dimensions: ``X^T (X X^T + lam I_n)^-1 Y`` (Woodbury) when ``n <= d``, else ``(X^T X + lam I_d)^-1 X^T Y``;
    the two are equal, each inverts the smaller matrix."""
    n, d = x.shape[-2:]
    xt = x.transpose(-1, -2)
    if n <= d:
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        return xt @ torch.linalg.solve(x @ xt + lam * eye, y)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return torch.linalg.solve(xt @ x + lam * eye, xt @ y)


class QPIterate(NamedTuple):
    """A primal-dual point of ``min 1/2 z^T Q z + p^T z, G z + s = h, s >= 0, A z = b``: solution ``z``, slacks
    ``s``, inequality multipliers ``lam`` and equality multipliers ``nu`` (each with the problems' batch
    dimensions first)."""

    z: Tensor
    s: Tensor
    lam: Tensor
    nu: Tensor


def _mv(m: Tensor, v: Tensor) -> Tensor:
    return (m @ v.unsqueeze(-1)).squeeze(-1)


def _factor_kkt(q: Tensor, g: Tensor, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """LU factors of the reduced KKT matrix ``[[Q + G^T diag(d) G, A^T], [A, 0]]`` (unchecked: a numerically
    singular matrix gives non-finite solutions rather than an error)."""
    h = q + g.transpose(-1, -2) @ (d.unsqueeze(-1) * g)
    k = a.shape[-2]
    zeros = torch.zeros(*a.shape[:-2], k, k, dtype=q.dtype, device=q.device)
    kkt = torch.cat([torch.cat([h, a.transpose(-1, -2)], -1), torch.cat([a, zeros], -1)], -2)
    lu, pivots, _ = torch.linalg.lu_factor_ex(kkt)
    return lu, pivots


def _solve_kkt(factor: tuple[Tensor, Tensor], top: Tensor, bottom: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, y)`` with ``[[H, A^T], [A, 0]] [x; y] = [top; bottom]``, from ``_factor_kkt``'s factors."""
    n = top.shape[-1]
    sol = torch.linalg.lu_solve(*factor, torch.cat([top, bottom], -1).unsqueeze(-1)).squeeze(-1)
    return sol[..., :n], sol[..., n:]


def _newton_step(factor: tuple[Tensor, Tensor], g: Tensor, d: Tensor, s: Tensor, r_dual: Tensor, r_ineq: Tensor,
                 r_eq: Tensor, r_comp: Tensor) -> QPIterate:
    """The Newton direction of the KKT residuals: ``Q dz + G^T dlam + A^T dnu = -r_dual``, ``G dz + ds =
    -r_ineq``, ``A dz = -r_eq``, ``lam ds + s dlam = -r_comp``, with ``dlam`` and ``ds`` eliminated
    (``d = lam / s``)."""
    top = -r_dual - _mv(g.transpose(-1, -2), d * r_ineq - r_comp / s)
    dz, dnu = _solve_kkt(factor, top, -r_eq)
    g_dz = _mv(g, dz)
    return QPIterate(dz, -r_ineq - g_dz, d * (g_dz + r_ineq) - r_comp / s, dnu)


def _max_step(v: Tensor, dv: Tensor) -> Tensor:
    """The largest ``t`` with ``v + t dv >= 0`` (per problem; ``inf`` when no entry decreases)."""
    ratio = torch.where(dv < 0, -v / dv, torch.full_like(v, torch.inf))
    return ratio.amin(-1)


def _residuals(q: Tensor, p: Tensor, g: Tensor, h: Tensor, a: Tensor, b: Tensor,
               it: QPIterate) -> tuple[Tensor, Tensor, Tensor]:
    r_dual = _mv(q, it.z) + p + _mv(g.transpose(-1, -2), it.lam) + _mv(a.transpose(-1, -2), it.nu)
    return r_dual, _mv(g, it.z) + it.s - h, _mv(a, it.z) - b


def interior_point(q: Tensor, p: Tensor, g: Tensor, h: Tensor, a: Tensor, b: Tensor, max_iter: int,
                   tol: float = 1e-12) -> QPIterate:
    """A primal-dual interior-point solve of ``min 1/2 z^T Q z + p^T z, G z <= h, A z = b`` for a batch of
    problems (``q`` ... x n x n symmetric positive semi-definite, ``p`` ... x n, ``g`` ... x m x n with ``m >= 1``,
    ``h`` ... x m, ``a`` ... x k x n with ``k >= 0``, ``b`` ... x k; any leading batch dimensions, the same for
    all six), without gradients.

    As qpth's batched solver (``qpth/solvers/pdipm/batch.py``, behind MetaOptNet's ``QPFunction``): the start
    solves the KKT system with unit scaling, ``[[Q + G^T G, A^T], [A, 0]] [z; nu] = [-p + G^T h; b]``, and takes
    ``s = h - G z`` and ``lam = G z - h``, each shifted by a constant so that its smallest entry is at least 1
    (qpth shifts only those with a negative entry). Each of at most ``max_iter`` iterations evaluates the residual
    ``||r_dual|| + ||r_ineq|| + ||r_eq|| + m mu`` (``mu`` the mean of ``s lam``) of the current point, keeps each
    problem's point of smallest residual so far (returned at the end), stops once every problem's is below
    ``tol`` (qpth's ``eps``), and otherwise moves along Mehrotra's predictor-corrector direction: the affine
    direction, the centring ``sigma = (mu_aff / mu)^3``, the combined direction, with a step of 0.999 times the
    longest that keeps ``s, lam >= 0``, at most 1. ``max_iter`` thus counts the points evaluated, as qpth's
    ``maxIter`` does. Departures from qpth: the reduced KKT matrix ``[[Q + G^T diag(lam / s) G, A^T], [A, 0]]`` is
    factored by LU with pivoting, so ``Q`` may be singular (qpth factors ``Q`` itself); qpth also stops when no
    problem has improved for three iterations. Far below the tolerance that matrix can become numerically
    singular: the problem's steps then turn non-finite and are never kept.
    """
    with torch.no_grad():
        m = g.shape[-2]
        ones = torch.ones_like(h)
        z, nu = _solve_kkt(_factor_kkt(q, g, a, ones), -p + _mv(g.transpose(-1, -2), h), b)
        r = _mv(g, z) - h
        s = -r + (1 - (-r).amin(-1, keepdim=True)).clamp(min=0)
        lam = r + (1 - r.amin(-1, keepdim=True)).clamp(min=0)
        it = best = QPIterate(z, s, lam, nu)
        best_residual = h.new_full(h.shape[:-1], torch.inf)
        for i in range(max_iter):
            r_dual, r_ineq, r_eq = _residuals(q, p, g, h, a, b, it)
            mu = (it.s * it.lam).sum(-1) / m
            residual = r_dual.norm(dim=-1) + r_ineq.norm(dim=-1) + r_eq.norm(dim=-1) + m * mu
            better = residual < best_residual
            best_residual = torch.where(better, residual, best_residual)
            best = QPIterate(*(torch.where(better.unsqueeze(-1), v, w) for v, w in zip(it, best)))
            if i == max_iter - 1 or bool((best_residual < tol).all()):
                break
            d = it.lam / it.s
            factor = _factor_kkt(q, g, a, d)
            affine = _newton_step(factor, g, d, it.s, r_dual, r_ineq, r_eq, it.s * it.lam)
            t_aff = torch.minimum(_max_step(it.s, affine.s), _max_step(it.lam, affine.lam)).clamp(max=1)
            s_aff = it.s + t_aff.unsqueeze(-1) * affine.s
            lam_aff = it.lam + t_aff.unsqueeze(-1) * affine.lam
            sigma = ((s_aff * lam_aff).sum(-1) / m / mu) ** 3
            r_comp = it.s * it.lam + affine.s * affine.lam - (sigma * mu).unsqueeze(-1)
            step = _newton_step(factor, g, d, it.s, r_dual, r_ineq, r_eq, r_comp)
            t = (0.999 * torch.minimum(_max_step(it.s, step.s), _max_step(it.lam, step.lam))).clamp(max=1)
            it = QPIterate(*(v + t.unsqueeze(-1) * dv for v, dv in zip(it, step)))
        return best


class _QP(torch.autograd.Function):
    """``interior_point``'s ``z``, differentiated implicitly through the KKT conditions at the returned point."""

    @staticmethod
    def forward(ctx, q: Tensor, p: Tensor, g: Tensor, h: Tensor, a: Tensor, b: Tensor, max_iter: int,
                tol: float) -> Tensor:
        it = interior_point(q, p, g, h, a, b, max_iter, tol)
        ctx.save_for_backward(q, g, a, *it)
        return it.z

    @staticmethod
    def backward(ctx, grad_z: Tensor):
        """Solve ``[[Q, G^T, A^T], [G, -diag(s / lam), 0], [A, 0, 0]] [dz; dlam; dnu] = [-grad_z; 0; 0]``; then
        ``dQ = (dz z^T + z dz^T) / 2``, ``dp = dz``, ``dG = lam dz^T + dlam z^T``, ``dh = -dlam``, ``dA = nu dz^T +
        dnu z^T``, ``db = -dnu`` (OptNet's equations, as qpth's backward). Eliminating ``dlam = diag(lam / s) G dz``
        would give the reduced system of the forward pass, whose ``lam / s`` reaches 1e16 at a converged
        solution; this augmented form keeps ``s / lam``, large only for inactive constraints, where it only
        damps ``dlam``."""
        q, g, a, z, s, lam, nu = ctx.saved_tensors
        n, m, k = z.shape[-1], s.shape[-1], nu.shape[-1]
        kkt = q.new_zeros(*q.shape[:-2], n + m + k, n + m + k)
        kkt[..., :n, :n] = q
        kkt[..., :n, n:n + m] = g.transpose(-1, -2)
        kkt[..., :n, n + m:] = a.transpose(-1, -2)
        kkt[..., n:n + m, :n] = g
        kkt[..., n:n + m, n:n + m] = torch.diag_embed(-s / lam)
        kkt[..., n + m:, :n] = a
        rhs = torch.cat([-grad_z, torch.zeros_like(s), torch.zeros_like(nu)], -1)
        sol = torch.linalg.solve(kkt, rhs.unsqueeze(-1)).squeeze(-1)
        dz, dlam, dnu = sol[..., :n], sol[..., n:n + m], sol[..., n + m:]

        def outer(u: Tensor, v: Tensor) -> Tensor:
            return u.unsqueeze(-1) * v.unsqueeze(-2)

        grad_q = (outer(dz, z) + outer(z, dz)) / 2
        return grad_q, dz, outer(lam, dz) + outer(dlam, z), -dlam, outer(nu, dz) + outer(dnu, z), -dnu, None, None


def solve_qp(q: Tensor, p: Tensor, g: Tensor, h: Tensor, a: Tensor, b: Tensor, max_iter: int,
             tol: float = 1e-12) -> Tensor:
    """The solution ``z`` of ``min 1/2 z^T Q z + p^T z, G z <= h, A z = b`` (batched as in ``interior_point``),
    differentiable with respect to all six inputs. Solved in float64 whatever the inputs' dtype (the KKT system
    grows ill-conditioned as the iterate approaches the boundary), returned in ``q``'s dtype."""
    z = _QP.apply(*(t.double() for t in (q, p, g, h, a, b)), max_iter, tol)
    return z.to(q.dtype)


def crammer_singer_dual(support: Tensor, support_y: Tensor, n_way: int,
                        c: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(Q, p, G, h, A, b)`` of the dual of the Crammer-Singer SVM on ``support`` (E x n x d) with labels
    ``support_y`` (E x n) in ``0..n_way-1``, over ``alpha`` (E x n * n_way, ``alpha_i^m`` at ``i * n_way + m``):

    ``min_alpha 1/2 sum_m ||w_m||^2 - sum_i alpha_i^{y_i}``, ``w_m = sum_i alpha_i^m x_i``, subject to
    ``alpha_i^m <= C [m = y_i]`` and ``sum_m alpha_i^m = 0``: ``Q = (X X^T) kron I``, ``p = -onehot(y)``,
    ``G = I``, ``h = C onehot(y)``, ``A = I kron 1^T``, ``b = 0``. (liblinear's form has ``p = 1 - onehot(y)``;
    the two objectives differ by ``sum alpha = 0`` on the feasible set.)"""
    e, n, _ = support.shape
    nz = n * n_way
    kernel = support @ support.transpose(1, 2)
    eye_way = torch.eye(n_way, dtype=support.dtype, device=support.device)
    q = (kernel[:, :, None, :, None] * eye_way[None, None, :, None, :]).reshape(e, nz, nz)
    one_hot = F.one_hot(support_y, n_way).to(support.dtype).reshape(e, nz)
    g = torch.eye(nz, dtype=support.dtype, device=support.device).expand(e, nz, nz)
    rows = torch.eye(n, dtype=support.dtype, device=support.device).repeat_interleave(n_way, dim=1)
    return q, -one_hot, g, c * one_hot, rows.expand(e, n, nz), torch.zeros(e, n, dtype=support.dtype,
                                                                             device=support.device)


def crammer_singer_svm_logits(support: Tensor, support_y: Tensor, query: Tensor, n_way: int, c: float,
                              max_iter: int) -> Tensor:
    """Query scores ``w_m . x_q`` (E x n_query x n_way) of the Crammer-Singer SVM fitted on each episode's
    ``support`` by ``max_iter`` interior-point iterations on ``crammer_singer_dual``, differentiable in the
    support and query features."""
    alpha = solve_qp(*crammer_singer_dual(support, support_y, n_way, c), max_iter)
    weights = alpha.reshape(len(support), -1, n_way).transpose(1, 2) @ support
    return query @ weights.transpose(1, 2)
