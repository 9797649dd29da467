"""RDM: the penalties by hand (an explicit kernel sum over DomainBed's eight widths, unbiased variances, the worst
domain), three updates across the switch replayed with HandAdam (Adam rebuilt at lr rdm_lr when the penalties
switch on), the defaults and search space, resume before and after the switch."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from search_space import bounds
from torch import Tensor, nn

from dg_meta import registry
from dg_meta.hparams import declared_hparams, resolve

RDM = registry.get_algorithm("RDM")
GAMMAS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0]
SETTINGS = {"rdm_lambda": 2.0, "variance_weight": 0.3, "rdm_penalty_anneal_iters": 1, "lr": 0.01, "rdm_lr": 0.003}


def tiny(**overrides) -> nn.Module:
    hp = resolve(declared_hparams(RDM), 0, {**SETTINGS, **overrides})
    torch.manual_seed(0)
    return RDM((4,), 3, 3, {**hp, "mlp_width": 6, "mlp_depth": 2}).double()


def tiny_batch(seed: int, sizes: tuple[int, ...] = (4, 5, 3)) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64) * (1 + d), torch.randint(0, 3, (n,), generator=g))
            for d, n in enumerate(sizes)]


def hand_mmd(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Biased MMD^2 under ``k(u, v) = sum_g exp(-g (u - v)^2)``, from the pairwise differences."""
    def mean_k(u: list[Tensor], v: list[Tensor]) -> Tensor:
        diff = torch.stack(u)[:, None] - torch.stack(v)[None, :]
        return sum(torch.exp(-g * diff ** 2) for g in GAMMAS).mean()

    return mean_k(a, a) + mean_k(b, b) - 2 * mean_k(a, b)


def hand_variance(values: list[Tensor]) -> Tensor:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def hand_objective(risks: list[list[Tensor]], lam: float, mu: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    means = [sum(r) / len(r) for r in risks]
    worst = max(range(len(risks)), key=lambda d: float(means[d].detach()))
    pooled = [v for r in risks for v in r]
    erm = sum(means) / len(means)
    matching = hand_mmd(risks[worst], pooled)
    variance = hand_variance(pooled) + hand_variance(risks[worst])
    return erm + lam * matching + mu * variance, erm, matching, variance


def test_defaults_and_search_space_are_domainbeds():
    hp = resolve(declared_hparams(RDM))
    assert (hp["rdm_lambda"], hp["rdm_penalty_anneal_iters"], hp["variance_weight"], hp["rdm_lr"]) == \
        (5.0, 1500, 0.004, 1.5e-5)
    assert bounds(RDM.HPARAMS["rdm_lambda"]) == (0.1, 10.0)
    assert bounds(RDM.HPARAMS["rdm_penalty_anneal_iters"]) == (800, 2699)  # int(U(800, 2700))
    assert bounds(RDM.HPARAMS["variance_weight"]) == (0.001, 0.007)
    assert bounds(RDM.HPARAMS["rdm_lr"]) == (8e-6, 2e-5)


def test_penalties_match_the_hand_formulas_with_their_gradients():
    alg = tiny()
    g = torch.Generator().manual_seed(3)
    risks = [(torch.rand(n, generator=g, dtype=torch.float64) * 3).requires_grad_() for n in (4, 6, 3)]
    erm, matching, variance = alg.penalties(risks)
    _, hand_erm, hand_matching, hand_var = hand_objective([list(r) for r in risks], 0.0, 0.0)
    for ours, theirs in ((erm, hand_erm), (matching, hand_matching), (variance, hand_var)):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)
        for a, b in zip(torch.autograd.grad(ours, risks, allow_unused=True, materialize_grads=True),
                        torch.autograd.grad(theirs, risks, allow_unused=True, materialize_grads=True)):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert float(matching.detach()) > 1e-3


def test_the_worst_domain_is_the_one_with_the_largest_mean_risk():
    alg = tiny()
    low, high = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), torch.tensor([2.0, 0.1], dtype=torch.float64)
    for risks, worst in (([low, high], high), ([high, low], high), ([low, low * 0.5], low)):
        _, matching, variance = alg.penalties(risks)
        pooled = list(torch.cat(risks))
        assert math.isclose(float(matching), float(hand_mmd(list(worst), pooled)), abs_tol=1e-12)
        assert math.isclose(float(variance), float(hand_variance(pooled) + hand_variance(list(worst))), abs_tol=1e-12)


def test_three_updates_across_the_switch_with_adam_rebuilt_at_rdm_lr():
    alg = tiny()
    net = alg.network
    names = [n for n, _ in net.named_parameters()]
    hand = HandAdam(list(net.parameters()), lr=0.01)
    optimizers = []
    for step in range(3):
        batch = tiny_batch(step)
        on = step >= 1
        if step == 1:
            hand = HandAdam(hand.params, lr=0.003)
        params = [p.detach().requires_grad_() for p in hand.params]
        risks = [list(F.cross_entropy(torch.func.functional_call(net, dict(zip(names, params)), (x,)), y,
                                      reduction="none")) for x, y in batch]
        total, erm, matching, variance = hand_objective(risks, 2.0 * on, 0.3 * on)
        hand.step([g.detach() for g in torch.autograd.grad(total, params)])
        losses = alg.update(batch)
        optimizers.append(alg.optimizer)
        for key, value in (("loss", total), ("erm_loss", erm), ("matching_penalty", matching),
                           ("variance_penalty", variance)):
            assert torch.allclose(losses[key], value.detach(), rtol=0, atol=1e-12), key
        for p, q in zip(net.parameters(), hand.params):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)
    assert optimizers[0] is not optimizers[1] and optimizers[1] is optimizers[2]
    group = alg.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.003, 0.0)
    assert [id(p) for p in group["params"]] == [id(p) for p in net.parameters()]


def test_penalties_are_off_during_the_annealing_updates():
    alg = tiny(rdm_penalty_anneal_iters=2)
    for step in range(2):
        losses = alg.update(tiny_batch(step))
        assert torch.equal(losses["loss"], losses["erm_loss"])
        assert float(losses["matching_penalty"]) > 0
        assert alg.optimizer.param_groups[0]["lr"] == 0.01
    first = alg.optimizer
    alg.update(tiny_batch(2))
    assert alg.optimizer is not first and alg.optimizer.param_groups[0]["lr"] == 0.003


@pytest.mark.parametrize("saved_after", [1, 2])
def test_resume_equals_uninterrupted(saved_after):
    alg = tiny(rdm_penalty_anneal_iters=2)
    for step in range(saved_after):
        alg.update(tiny_batch(step))
    buffer = io.BytesIO()
    torch.save(alg.checkpoint_state(), buffer)
    for step in range(saved_after, 4):
        alg.update(tiny_batch(step))
    buffer.seek(0)
    resumed = tiny(rdm_penalty_anneal_iters=2)
    resumed.load_checkpoint_state(torch.load(buffer, weights_only=True))
    for step in range(saved_after, 4):
        resumed.update(tiny_batch(step))
    for p, q in zip(alg.network.parameters(), resumed.network.parameters()):
        assert torch.equal(p, q)
    assert resumed.optimizer.param_groups[0]["lr"] == 0.003 and resumed.schedule.count == 4
