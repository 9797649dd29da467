"""The DG mechanisms shared by several algorithms: penalty schedules, gradient reversal, the discriminator
alternation and gradient penalty, feature-distribution distances, per-domain and per-example gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dg_meta.adversarial import (
    DISCRIMINATOR_HPARAMS,
    discriminator_turn,
    domain_discriminator,
    grad_reverse,
    input_gradient_penalty,
)
from dg_meta.feature_alignment import DOMAINBED_GAMMAS, coral_distance, gaussian_mmd, mean_over_pairs
from dg_meta.gradients import domain_gradients, per_example_gradients
from dg_meta.hparams import resolve
from dg_meta.init_from import load_matching
from dg_meta.penalty_schedule import PenaltySchedule


def test_penalty_schedule_switches_once_at_anneal_iters_and_its_count_is_in_the_state_dict():
    schedule = PenaltySchedule(100.0, 3, before=0.5)
    seen = []
    for _ in range(5):
        seen.append((schedule.weight(), schedule.switching()))
        schedule.advance()
    assert seen == [(0.5, False), (0.5, False), (0.5, False), (100.0, True), (100.0, False)]
    restored = PenaltySchedule(100.0, 3, before=0.5)
    restored.load_state_dict(schedule.state_dict())
    assert restored.count == 5 and restored.weight() == 100.0 and not restored.switching()
    fresh = PenaltySchedule(7.0, 0)
    assert fresh.weight() == 7.0 and fresh.switching() and PenaltySchedule(7.0, 2).weight() == 1.0


def test_grad_reverse_is_identity_forward_and_minus_scale_times_the_gradient_backward():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = grad_reverse(x, 0.25)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-0.25, -0.5, -0.75]))


def test_discriminator_alternation_is_domainbeds():
    assert [discriminator_turn(c, 1) for c in range(1, 7)] == [False, True, False, True, False, True]
    assert [discriminator_turn(c, 2) for c in range(1, 7)] == [True, False, True, True, False, True]


def test_discriminator_is_an_mlp_of_the_declared_width_and_depth():
    hp = resolve(DISCRIMINATOR_HPARAMS)
    assert (hp["mlp_width"], hp["mlp_depth"], hp["mlp_dropout"]) == (256, 3, 0.0)
    linears = [m for m in domain_discriminator(5, 3, {**hp, "mlp_width": 7}).modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(5, 7), (7, 7), (7, 3)]
    for seed in range(1, 30):
        drawn = resolve(DISCRIMINATOR_HPARAMS, seed)
        assert 64 <= drawn["mlp_width"] < 1024 and drawn["mlp_depth"] in (3, 4, 5)
        assert drawn["mlp_dropout"] in (0.0, 0.1, 0.5)


def test_input_gradient_penalty_is_the_mean_squared_norm_of_the_input_gradient():
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    z = torch.tensor([[0.5, 1.0], [2.0, -1.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 1])
    loss = F.cross_entropy(z @ w.t(), y, reduction="sum")
    penalty = input_gradient_penalty(loss, z)
    p = F.softmax(z.detach() @ w.t(), 1) - F.one_hot(y, 2)
    expected = (p @ w).pow(2).sum(1).mean()
    assert torch.allclose(penalty, expected, rtol=0, atol=1e-12)
    assert penalty.requires_grad


def test_coral_distance_is_mean_squared_mean_and_covariance_differences():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    # means (2, 1) and (1, 1); covariances [[1, -1], [-1, 1]] and [[2, 2], [2, 2]]
    expected = ((1.0 ** 2 + 0.0) / 2) + ((1 + 9 + 9 + 1) / 4)
    assert torch.allclose(coral_distance(x, y), torch.tensor(expected, dtype=torch.float64))


def test_gaussian_mmd_is_the_biased_estimate_under_the_sum_of_domainbed_kernels():
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    y = torch.tensor([[3.0]], dtype=torch.float64)

    def k(d2: float) -> float:
        return sum(torch.exp(torch.tensor(-g * d2, dtype=torch.float64)) for g in DOMAINBED_GAMMAS)

    expected = (2 * k(0) + 2 * k(1)) / 4 + k(0) - 2 * (k(9) + k(4)) / 2
    assert DOMAINBED_GAMMAS == (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
    assert torch.allclose(gaussian_mmd(x, y), expected, rtol=1e-12, atol=0)


def test_mean_over_pairs_averages_every_unordered_pair_once():
    samples = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([4.0])]
    got = mean_over_pairs(samples, lambda a, b: (a - b).abs().sum())
    assert torch.allclose(got, torch.tensor((1.0 + 3.0 + 2.0) / 3))
    assert mean_over_pairs(samples[:1], lambda a, b: a.sum()).item() == 0.0


def test_domain_gradients_are_each_losss_gradient_and_keep_the_graph_when_asked():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    losses = [(w ** 2).sum(), (3 * w).sum()]
    grads = domain_gradients(losses, [w], create_graph=True)
    assert torch.equal(grads[0][0], torch.tensor([2.0, -4.0])) and torch.equal(grads[1][0], torch.tensor([3.0, 3.0]))
    (g,) = torch.autograd.grad(grads[0][0].sum(), [w])
    assert torch.equal(g, torch.tensor([2.0, 2.0]))
    plain = domain_gradients([(w ** 2).sum(), w.sum()], [w])
    assert not plain[0][0].requires_grad


def test_per_example_gradients_match_one_backward_per_example_and_are_differentiable():
    torch.manual_seed(0)
    head = nn.Linear(3, 2).double()
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 1, 0])
    grads = per_example_gradients(head, dict(head.named_parameters()), z, y, F.cross_entropy)
    for i in range(4):
        gw, gb = torch.autograd.grad(F.cross_entropy(head(z[i:i + 1]), y[i:i + 1]), [head.weight, head.bias])
        assert torch.allclose(grads["weight"][i], gw, rtol=0, atol=1e-12)
        assert torch.allclose(grads["bias"][i], gb, rtol=0, atol=1e-12)
    (dz,) = torch.autograd.grad(grads["weight"].var(0).sum(), [z])
    assert dz.abs().sum() > 0


def test_init_from_loads_weights_and_leaves_a_schedules_step_alone():
    def model() -> nn.Module:
        m = nn.Module()
        m.lin, m.schedule = nn.Linear(2, 1), PenaltySchedule(10.0, 5)
        return m

    source, target = model(), model()
    source.schedule.count = 7
    loaded, skipped = load_matching(target, source.state_dict())
    assert (loaded, skipped) == (["lin.weight", "lin.bias"], [])
    assert torch.equal(target.lin.weight, source.lin.weight) and target.schedule.count == 0
