"""Fishr: the penalty and its gradient against per-example gradients taken one example at a time, three
updates (annealing, switch with Adam rebuilt, after) replayed by hand with the moving averages, resume, and
the defaults and search space against DomainBed's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from search_space import bounds

from dg_meta import registry
from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve

Fishr = registry.get_algorithm("Fishr")
SIZES = (4, 5, 6)


def tiny(nonlinear: bool = False, **overrides) -> torch.nn.Module:
    hp = resolve(declared_hparams(Fishr), 0, {"nonlinear_classifier": nonlinear, **overrides})
    torch.manual_seed(0)
    return Fishr((4,), 3, len(SIZES), {**hp, "mlp_width": 6, "mlp_depth": 2}).double()


def tiny_batch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in SIZES]


class Reference:
    """Fishr written out: per-example classifier gradients by one autograd call per example, variances,
    moving averages and penalty by explicit sums."""

    def __init__(self, alg, ema: float):
        self.feat, self.cls = copy.deepcopy(alg.featurizer), copy.deepcopy(alg.classifier)
        self.feat_names = [n for n, _ in self.feat.named_parameters()]
        self.cls_names = [n for n, _ in self.cls.named_parameters()]
        self.ema = ema
        self.m = [0.0] * len(SIZES)

    def objective(self, params: list[torch.Tensor], batch, weight: float):
        nf = len(self.feat_names)
        fp, cp = dict(zip(self.feat_names, params[:nf])), dict(zip(self.cls_names, params[nf:]))
        x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
        z = torch.func.functional_call(self.feat, fp, (x,))
        nll = F.cross_entropy(torch.func.functional_call(self.cls, cp, (z,)), y)
        rows = []
        for i in range(len(y)):
            loss_i = F.cross_entropy(torch.func.functional_call(self.cls, cp, (z[i:i + 1],)), y[i:i + 1])
            grads = torch.autograd.grad(loss_i, list(cp.values()), create_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        grads = torch.stack(rows)
        n_entries = grads.shape[1]
        smoothed, start = [], 0
        for e, n in enumerate(SIZES):
            g_e = grads[start:start + n]
            start += n
            mean = g_e.sum(0) / n
            variance = ((g_e - mean) ** 2).sum(0) / n
            m_e = self.ema * self.m[e] + (1 - self.ema) * variance
            self.m[e] = m_e.detach()
            smoothed.append(m_e / (1 - self.ema))
        centre = sum(smoothed) / len(SIZES)
        penalty = sum(((v - centre) ** 2).sum() / n_entries for v in smoothed) / len(SIZES)
        return nll + weight * penalty, nll, penalty


@pytest.mark.parametrize("nonlinear", [False, True])
def test_penalty_and_its_gradient_match_per_example_gradients_taken_one_at_a_time(nonlinear):
    alg, batch = tiny(nonlinear, ema=0.9), tiny_batch(1)
    ref = Reference(alg, 0.9)
    params = [p.detach().clone().requires_grad_() for p in alg.network.parameters()]
    _, _, expected = ref.objective(params, batch, 1.0)
    expected_grads = torch.autograd.grad(expected, params)

    x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
    penalty = alg.fishr_penalty(alg.gradient_variances(alg.featurizer(x), y, list(SIZES)))
    grads = torch.autograd.grad(penalty, list(alg.network.parameters()))
    assert torch.allclose(penalty, expected, rtol=1e-10, atol=0) and float(expected.detach()) > 1e-6
    for g, e in zip(grads, expected_grads):
        assert torch.allclose(g, e, rtol=1e-8, atol=1e-14)
    assert all(float(g.abs().max()) > 0 for g in grads[:2])  # reaches the featurizer


def test_variances_are_per_domain_population_variances_of_the_classifier_gradients():
    alg, batch = tiny(), tiny_batch(2)
    x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
    with torch.no_grad():
        z = alg.featurizer(x)
        p = torch.softmax(alg.classifier(z), 1)
    # the cross-entropy gradient of a linear head: d/dW = (p - onehot) z^T, d/db = p - onehot
    residual = p - F.one_hot(y, 3).double()
    per_example = torch.cat([(residual[:, :, None] * z[:, None, :]).flatten(1), residual], 1)
    expected = torch.stack([chunk.var(0, unbiased=False) for chunk in per_example.split(list(SIZES))])
    assert torch.allclose(alg.gradient_variances(z, y, list(SIZES)), expected, rtol=1e-10, atol=1e-15)


def test_three_updates_anneal_then_switch_with_adam_rebuilt_and_moving_averages():
    alg = tiny(**{"lambda": 7.0, "penalty_anneal_iters": 1, "ema": 0.8})
    ref = Reference(alg, 0.8)
    first = HandAdam(list(alg.network.parameters()), lr=1e-3)
    second = None
    for step in range(3):
        batch = tiny_batch(10 + step)
        if step == 1:  # the penalty switches on: Adam starts again from the current weights
            second = HandAdam(first.params, lr=1e-3)
        hand = first if step == 0 else second
        params = [p.detach().requires_grad_() for p in hand.params]
        objective, nll, penalty = ref.objective(params, batch, 0.0 if step == 0 else 7.0)
        hand.step([g.detach() for g in torch.autograd.grad(objective, params)])
        losses = alg.update(batch)
        assert torch.allclose(losses["loss"], objective.detach(), rtol=1e-10, atol=0)
        assert torch.allclose(losses["nll"], nll.detach(), rtol=1e-10, atol=0)
        assert torch.allclose(losses["penalty"], penalty.detach(), rtol=1e-10, atol=0)
        for p, q in zip(alg.network.parameters(), hand.params):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)
        assert torch.allclose(alg.ema_variances, torch.stack(ref.m), rtol=1e-10, atol=0)
    assert float(losses["loss"] - losses["nll"]) > 1e-6


def test_zero_anneal_iters_applies_lambda_from_the_first_update():
    alg = tiny(**{"lambda": 5.0, "penalty_anneal_iters": 0})
    losses = alg.update(tiny_batch(3))
    assert torch.allclose(losses["loss"], losses["nll"] + 5.0 * losses["penalty"], rtol=1e-12, atol=0)
    assert float(losses["penalty"]) > 0


def test_resume_from_checkpoint_state_continues_the_same_trajectory():
    kwargs = {"lambda": 3.0, "penalty_anneal_iters": 2, "ema": 0.9}
    alg = tiny(**kwargs)
    alg.update(tiny_batch(20))
    state = copy.deepcopy(alg.checkpoint_state())
    assert set(state["model"]) >= {"ema_variances", "schedule._extra_state"}
    resumed = tiny(**kwargs)
    resumed.load_checkpoint_state(state)
    for step in (21, 22, 23):
        a, b = alg.update(tiny_batch(step)), resumed.update(tiny_batch(step))
        assert torch.equal(a["loss"], b["loss"])
    for p, q in zip(alg.network.parameters(), resumed.network.parameters()):
        assert torch.equal(p, q)


def test_defaults_and_random_search_ranges_are_domainbeds():
    declared = declared_hparams(Fishr)
    hp = resolve(declared)
    assert (hp["lambda"], hp["penalty_anneal_iters"], hp["ema"]) == (1000.0, 1500, 0.95)
    assert bounds(declared["lambda"]) == pytest.approx((10.0, 1e4))
    assert bounds(declared["penalty_anneal_iters"]) == (0, 5000)
    assert bounds(declared["ema"]) == pytest.approx((0.90, 0.99))
    assert isinstance(resolve(declared, 3)["penalty_anneal_iters"], int)
    assert isinstance(resolve(declared, 3)["ema"], float)
    for bad in ({"ema": 1.0}, {"ema": -0.1}, {"lambda": -1.0}, {"penalty_anneal_iters": -1}):
        with pytest.raises(UsageError):
            resolve(declared, 0, bad)
    assert resolve(declared, 0, {"ema": 0.0})["ema"] == 0.0
