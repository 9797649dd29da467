"""MetaOptNet: the official defaults and learning-rate schedule; the label-smoothed loss written out; the SVM head
against scipy's primal Crammer-Singer SVM and on a separable episode; the iterations of training and adapt; two
updates replayed by hand (one forward pass for the supports of the meta-batch and one for its queries, the SVM
dual solved on its active set by a plain linear solve, smoothed cross-entropy, Nesterov SGD with weight decay)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dg_meta.algorithms import metaoptnet as metaoptnet_module
from dg_meta.algorithms.metaoptnet import MetaOptNet, lr_factor
from episode_checks import build_double, random_episode
from scipy.optimize import minimize
from search_space import bounds, drawn
from torch import Tensor, nn

from dg_meta.episode_solvers import interior_point
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.samplers import Episode

SHAPE = (1, 16, 16)
DT = torch.float64


def make(**overrides) -> MetaOptNet:
    return build_double(MetaOptNet, SHAPE, overrides)


def episode(seed: int, n_way: int = 2, shot: int = 2, query: int = 2) -> Episode:
    return random_episode(seed, n_way, shot, query, SHAPE)


def test_defaults_are_the_official_ones_and_the_search_space():
    hp = resolve(declared_hparams(MetaOptNet))
    assert (hp["lr"], hp["weight_decay"], hp["steps_per_epoch"], hp["meta_batch_size"]) == (0.1, 5e-4, 1000, 8)
    assert (hp["n_way"], hp["k_shot"], hp["n_query"]) == (5, 15, 6)
    assert (hp["svm_c"], hp["qp_iterations"], hp["qp_iterations_test"], hp["label_smoothing"], hp["backbone"]) == \
        (0.1, 15, 3, 0.0, "conv4")
    space = declared_hparams(MetaOptNet)
    assert bounds(space["lr"]) == pytest.approx((1e-2, 10 ** -0.5))
    assert bounds(space["svm_c"]) == pytest.approx((1e-2, 1.0))
    assert drawn(space["label_smoothing"]) == {0.0, 0.1}
    assert drawn(space["qp_iterations_test"]) == {3, 5, 15}
    assert drawn(space["qp_iterations"]) == {10, 15}
    assert bounds(space["weight_decay"]) == pytest.approx((1e-5, 1e-3))
    assert drawn(space["steps_per_epoch"]) == {500, 1000, 2000}
    assert drawn(space["k_shot"]) == {5, 10, 15}
    assert bounds(space["n_query"]) == (5, 15)
    assert drawn(space["meta_batch_size"]) == {4, 8}
    algorithm = make()
    assert algorithm.scale.item() == 1.0
    group = algorithm.optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"], group["dampening"]) == (0.9, True, 5e-4, 0)
    assert {id(p) for p in group["params"]} == {id(p) for p in algorithm.parameters()}


@pytest.mark.parametrize(("steps_done", "factor"), [(0, 1.0), (19999, 1.0), (20000, 0.06), (39999, 0.06),
                                                    (40000, 0.012), (49999, 0.012), (50000, 0.0024),
                                                    (10 ** 6, 0.0024)])
def test_learning_rate_follows_the_official_epoch_schedule(steps_done, factor):
    algorithm = make()
    algorithm.steps_done.fill_(steps_done)
    algorithm.set_learning_rate()
    assert algorithm.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * factor)
    assert lr_factor(steps_done // 1000) == factor
    short = make(steps_per_epoch=10, lr=0.5)
    short.steps_done.fill_(steps_done // 100)
    short.set_learning_rate()
    assert short.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * factor)


def smoothed_ce_by_hand(logits: Tensor, y: Tensor, eps: float) -> float:
    total = 0.0
    for row, label in zip(logits.tolist(), y.tolist()):
        log_z = np.log(np.sum(np.exp(row)))
        total -= sum(((1 - eps) if k == label else eps / (len(row) - 1)) * (v - log_z) for k, v in enumerate(row))
    return total / len(logits)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_loss_is_cross_entropy_against_the_official_smoothed_targets(eps):
    algorithm = make(label_smoothing=eps)
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.2, 0.1, 3.0]], dtype=DT)
    y = torch.tensor([2, 0])
    assert algorithm.smoothed_cross_entropy(logits, y, 3).item() == pytest.approx(smoothed_ce_by_hand(logits, y, eps))


def primal_svm(x: np.ndarray, y: np.ndarray, n_way: int, c: float) -> np.ndarray:
    """Crammer & Singer's primal ``min 1/2 ||W||^2 + C sum_i xi_i``, ``(w_{y_i} - w_m) . x_i >= 1 - [m = y_i] -
    xi_i``, by scipy; returns ``W``."""
    n, d = x.shape
    cut = n_way * d
    constraints = [{"type": "ineq", "fun": lambda v, i=i, m=m: (v[:cut].reshape(n_way, d)[y[i]] - v[:cut].reshape(
        n_way, d)[m]) @ x[i] - (m != y[i]) + v[cut + i]} for i in range(n) for m in range(n_way)]
    result = minimize(lambda v: 0.5 * (v[:cut] ** 2).sum() + c * v[cut:].sum(), np.zeros(cut + n),
                      constraints=constraints, method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
    assert result.success
    return result.x[:cut].reshape(n_way, d)


def test_episode_logits_are_scale_times_the_primal_svm_scores():
    algorithm = make(svm_c=0.2, qp_iterations_test=30)
    with torch.no_grad():
        algorithm.scale.fill_(1.5)
    g = torch.Generator().manual_seed(0)
    support_z, query_z = torch.randn(6, 4, generator=g, dtype=DT), torch.randn(5, 4, generator=g, dtype=DT)
    support_y = torch.tensor([0, 1, 2, 0, 1, 2])
    weights = torch.from_numpy(primal_svm(support_z.numpy(), support_y.numpy(), 3, 0.2))
    logits = algorithm.episode_logits(support_z, support_y, query_z, 3)
    assert logits.shape == (5, 3)
    assert torch.allclose(logits, 1.5 * query_z @ weights.t(), atol=1e-5)


def test_adapt_separates_a_separable_episode():
    algorithm = make()
    algorithm.featurizer = nn.Flatten()
    centres = torch.eye(3, dtype=DT).repeat_interleave(2, 1) * 3  # 3 classes in 6 dimensions
    g = torch.Generator().manual_seed(1)
    y = torch.arange(3).repeat_interleave(4)
    support = centres[y] + 0.3 * torch.randn(12, 6, generator=g, dtype=DT)
    query = centres[y] + 0.3 * torch.randn(12, 6, generator=g, dtype=DT)
    predict = algorithm.adapt(support, y)
    assert torch.equal(predict(support).argmax(1), y)
    assert torch.equal(predict(query).argmax(1), y)


def test_training_uses_qp_iterations_and_adapt_qp_iterations_test(monkeypatch):
    seen = []
    solver = metaoptnet_module.crammer_singer_svm_logits

    def spy(support, support_y, query, n_way, c, max_iter):
        seen.append((n_way, c, max_iter, support.shape[0]))
        return solver(support, support_y, query, n_way, c, max_iter)

    monkeypatch.setattr(metaoptnet_module, "crammer_singer_svm_logits", spy)
    algorithm = make(qp_iterations=7, qp_iterations_test=2, svm_c=0.3)
    algorithm.update([episode(0), episode(1)])
    algorithm.update([episode(2, n_way=4, shot=1, query=3)])  # a meta-batch of one episode
    algorithm.eval()
    e = episode(2, n_way=3)
    algorithm.adapt(e.support_x, e.support_y)(e.query_x)
    assert seen == [(2, 0.3, 7, 2), (4, 0.3, 7, 1), (3, 0.3, 2, 1)]


def svm_by_active_set(support: Tensor, support_y: Tensor, query: Tensor, n_way: int, c: float) -> Tensor:
    """The SVM's query scores with ``alpha`` from a plain linear solve, differentiable by autograd: the dual's KKT
    system with the bounds that ``interior_point`` finds active (``alpha_i^m = C [m = y_i]``) as equalities."""
    n, d = support.shape
    kernel = support @ support.t()
    size = n * n_way
    q = torch.zeros(size, size, dtype=DT)
    for i in range(n):
        for j in range(n):
            for m in range(n_way):
                q[i * n_way + m, j * n_way + m] = kernel[i, j]
    one_hot = F.one_hot(support_y, n_way).to(DT).flatten()
    sums = torch.zeros(n, size, dtype=DT)
    for i in range(n):
        sums[i, i * n_way:(i + 1) * n_way] = 1
    with torch.no_grad():
        alpha = interior_point(q[None], -one_hot[None], torch.eye(size, dtype=DT)[None], c * one_hot[None],
                               sums[None], torch.zeros(1, n, dtype=DT), max_iter=40).z[0]
    active = (c * one_hot - alpha) < 1e-7
    rows = torch.cat([torch.eye(size, dtype=DT)[active], sums])
    kkt = torch.cat([torch.cat([q, rows.t()], 1), torch.cat([rows, torch.zeros(len(rows), len(rows), dtype=DT)], 1)])
    rhs = torch.cat([one_hot, c * one_hot[active], torch.zeros(n, dtype=DT)])
    alpha = torch.linalg.solve(kkt, rhs)[:size]
    return query @ (alpha.view(n, n_way).t() @ support).t()


def test_two_updates_are_nesterov_sgd_steps_on_the_smoothed_loss_through_the_svm():
    algorithm = make(qp_iterations=40, label_smoothing=0.1, svm_c=0.014)  # some bounds active, some not
    algorithm.steps_done.fill_(19999)  # the second step starts epoch 20: lr 0.1 * 0.06
    net = copy.deepcopy(algorithm.featurizer)
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach().clone() for p in [*net.parameters(), algorithm.scale]]
    buffers = [torch.zeros_like(p) for p in params]
    for step, lr in enumerate([0.1, 0.006]):
        batch = [episode(2 * step), episode(2 * step + 1)]
        leaves = [p.requires_grad_() for p in params]
        weights = dict(zip(names, leaves[:-1]))
        support = torch.func.functional_call(net, weights, (torch.cat([e.support_x for e in batch]),))
        query = torch.func.functional_call(net, weights, (torch.cat([e.query_x for e in batch]),))
        logits = torch.cat([leaves[-1] * svm_by_active_set(support[4 * i:4 * i + 4], e.support_y,
                                                           query[4 * i:4 * i + 4], 2, 0.014)
                            for i, e in enumerate(batch)])
        y = torch.cat([e.query_y for e in batch])
        target = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=DT)[y]  # 1 - eps and eps / (n_way - 1)
        expected = -(target * logits.log_softmax(1)).sum(1).mean()
        grads = torch.autograd.grad(expected, leaves)
        with torch.no_grad():
            for i, (p, grad) in enumerate(zip(params, grads)):
                grad = grad + 5e-4 * p
                buffers[i] = grad if step == 0 else 0.9 * buffers[i] + grad
                params[i] = p - lr * (grad + 0.9 * buffers[i])
        losses = algorithm.update(batch)
        assert torch.allclose(losses["loss"], expected.detach(), rtol=0, atol=1e-9)
        assert not losses["loss"].requires_grad
        for p, q in zip([*algorithm.featurizer.parameters(), algorithm.scale], params):
            assert torch.allclose(p, q, rtol=0, atol=1e-8)
    assert algorithm.scale.item() != pytest.approx(1.0, abs=1e-6)
    assert int(algorithm.steps_done) == 20001
