"""TRM: three updates (one ERM, two with the transfer risk) replayed by an independent re-implementation (explicit
Hessians, per-head ``torch.func.grad`` SGD, HandAdam), in the formulas' form and in DomainBed's
(``trm_domainbed_inplace``), both Neumann estimates against their closed forms and the bound, the class-balanced
restart, the defaults and search space, resume."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.trm import neumann_inverse_hvp
from search_space import bounds, drawn
from torch import Tensor, nn

from dg_meta import registry
from dg_meta.hparams import declared_hparams, resolve

TRM = registry.get_algorithm("TRM")
N_FEATURES, N_CLASSES, N_DOMAINS = 6, 3, 3


def tiny(**overrides) -> nn.Module:
    hp = resolve(declared_hparams(TRM), 0, {"cos_lambda": 0.5, "groupdro_eta": 0.3, "iters": 1, "lr": 0.01,
                                           **overrides})
    torch.manual_seed(0)
    return TRM((4,), N_CLASSES, N_DOMAINS, {**hp, "mlp_width": N_FEATURES, "mlp_depth": 2}).double()


def tiny_batch(seed: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, N_CLASSES, (5,), generator=g))
            for _ in range(N_DOMAINS)]


def neumann(hessian: Tensor, v: Tensor, domainbed: bool = False) -> Tensor:
    """``v_0 + v_1 + ...`` (DomainBed's code: ``2 v_1 + v_2 + ...``) with ``v_k = (I - H)^k v`` and an explicit
    Hessian, stopping after the term that makes an entry exceed 10 in magnitude, at most 10 terms after v_0."""
    identity = torch.eye(len(v), dtype=v.dtype)
    terms = [v]
    for _ in range(10):
        terms.append((identity - hessian) @ terms[-1])
        estimate = 2 * terms[1] + sum(terms[2:]) if domainbed else sum(terms)
        if estimate.abs().max() > 10:
            break
    return estimate


def linear_ce(z: Tensor, weight: Tensor, bias: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(z @ weight.reshape(N_CLASSES, N_FEATURES).t() + bias, y)


class Reference:
    """TRM's update from the formulas: featurizer by ``functional_call``, heads as plain tensors."""

    def __init__(self, alg: nn.Module, lr: float, iters: int, cos_lambda: float, eta: float, balanced: bool,
                 domainbed: bool):
        self.alg, self.iters, self.cos_lambda, self.eta = alg, iters, cos_lambda, eta
        self.balanced, self.domainbed = balanced, domainbed
        self.names = [n for n, _ in alg.network.named_parameters()]
        self.adam = HandAdam(list(alg.network.parameters()), lr)
        self.heads = [[h.weight.detach().clone(), h.bias.detach().clone()] for h in alg.heads]
        self.alpha = torch.ones(N_DOMAINS, N_DOMAINS, dtype=torch.float64) - torch.eye(N_DOMAINS)
        self.count = 0

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        params = [p.detach().requires_grad_() for p in self.adam.params]
        named = dict(zip(self.names, params))
        x, y = torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch])
        z = torch.func.functional_call(self.alg.network[0], {k[2:]: v for k, v in named.items()
                                                              if k.startswith("0.")}, (x,))
        loss = linear_ce(z, named["1.weight"], named["1.bias"], y)
        value = surrogate = loss
        if self.count >= self.iters:
            self.alpha = self.alpha / self.alpha.sum(1, keepdim=True)
            zs, ys = z.split(5), [b[1] for b in batch]
            if self.balanced:
                for head in self.heads:
                    head[0] = named["1.weight"].detach().clone()
            for _ in range(30):
                for d, head in enumerate(self.heads):
                    gw, gb = torch.func.grad(linear_ce, argnums=(1, 2))(zs[d].detach(), *head, ys[d])
                    head[0], head[1] = head[0] - 0.1 * gw, head[1] - 0.1 * gb
            transfer_value = transfer_surrogate = 0.0
            new_alpha = self.alpha.clone()
            for q, (w_q, b_q) in enumerate(self.heads):
                w = w_q.clone().requires_grad_()
                (grad_q,) = torch.autograd.grad(linear_ce(zs[q], w, b_q, ys[q]), w, create_graph=True)
                others = [i for i in range(N_DOMAINS) if i != q]
                risks = {i: linear_ce(zs[i], w, b_q, ys[i]) for i in others}
                p_q = sum(self.alpha[q, i] * risks[i] for i in others)
                (grad_p,) = torch.autograd.grad(p_q, w, retain_graph=True)
                hessian = torch.autograd.functional.hessian(
                    lambda flat, q=q, b_q=b_q: linear_ce(zs[q].detach(), flat, b_q, ys[q]), w_q.detach().flatten())
                inner = neumann(hessian, grad_p.flatten().detach(), self.domainbed) @ grad_q.flatten()
                updated = {i: float(self.alpha[q, i] * torch.exp(self.eta * self.alpha[q, i] * risks[i].detach()))
                           for i in others}
                for i in others:
                    new_alpha[q, i] = updated[i]
                transfer_value = transfer_value + p_q - self.cos_lambda * inner
                gradient_weights = updated if self.domainbed else {i: self.alpha[q, i] for i in others}
                transfer_surrogate = transfer_surrogate + sum(gradient_weights[i] * risks[i] for i in others) \
                    - self.cos_lambda * inner
            self.alpha = new_alpha
            value = loss + transfer_value / N_DOMAINS
            surrogate = loss + transfer_surrogate / N_DOMAINS
        self.adam.step([g.detach() for g in torch.autograd.grad(surrogate, params)])
        self.count += 1
        return value.detach(), loss.detach()


def assert_matches(alg: nn.Module, ref: Reference) -> None:
    for p, q in zip(alg.network.parameters(), ref.adam.params):
        assert torch.allclose(p, q, rtol=0, atol=1e-11)
    for head, (w, b) in zip(alg.heads, ref.heads):
        assert torch.allclose(head.weight, w, rtol=0, atol=1e-11)
        assert torch.allclose(head.bias, b, rtol=0, atol=1e-11)
    assert torch.allclose(alg.alpha, ref.alpha, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("balanced", "domainbed"), [(False, False), (True, False), (False, True), (True, True)])
def test_erm_then_transfer_risk_updates_match_an_independent_reimplementation(balanced, domainbed):
    alg = tiny(class_balanced=balanced, trm_domainbed_inplace=domainbed)
    ref = Reference(alg, lr=0.01, iters=1, cos_lambda=0.5, eta=0.3, balanced=balanced, domainbed=domainbed)
    for step in range(3):
        batch = tiny_batch(step)
        value, nll = ref.update(batch)
        losses = alg.update(batch)
        assert torch.allclose(losses["loss"], value, rtol=0, atol=1e-12)
        assert torch.allclose(losses["nll"], nll, rtol=0, atol=1e-12)
        assert torch.allclose(losses["trm_loss"], value - nll, rtol=0, atol=1e-12)
        assert_matches(alg, ref)
        assert (float(losses["trm_loss"]) == 0) == (step == 0)
    assert not torch.allclose(ref.alpha, (torch.ones(3, 3) - torch.eye(3)).double() / 2, atol=1e-3)


def test_erm_phase_leaves_heads_and_alpha_alone():
    alg = tiny(iters=2)
    heads = [h.weight.detach().clone() for h in alg.heads]
    for step in range(2):
        alg.update(tiny_batch(step))
    assert all(torch.equal(h.weight, w) for h, w in zip(alg.heads, heads))
    assert torch.equal(alg.alpha, (torch.ones(3, 3) - torch.eye(3)).double())


def quadratic(weight: Tensor, matrix: Tensor) -> Tensor:
    flat = weight.flatten()
    return 0.5 * flat @ matrix @ flat


@pytest.mark.parametrize("domainbed", [False, True])
@pytest.mark.parametrize("scale", [0.5, 40.0])
def test_neumann_estimate_with_its_early_stop(scale, domainbed):
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    hessian = basis @ torch.diag(torch.linspace(0.1, 0.6, 6, dtype=torch.float64)) @ basis.t()
    weight = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, generator=g, dtype=torch.float64) * scale
    estimate = neumann_inverse_hvp(v.clone(), quadratic(weight, hessian), weight, domainbed)
    assert torch.allclose(estimate, neumann(hessian, v, domainbed), rtol=0, atol=1e-10)
    assert not estimate.requires_grad
    powers = [torch.linalg.matrix_power(torch.eye(6, dtype=torch.float64) - hessian, k) @ v for k in range(11)]
    if scale < 1:  # all ten terms; the plain series is close to H^-1 v
        expected = 2 * powers[1] + sum(powers[2:]) if domainbed else sum(powers)
        assert torch.allclose(estimate, expected, rtol=0, atol=1e-10)
        assert not torch.allclose(2 * powers[1] + sum(powers[2:]), sum(powers), atol=1e-3)
        if not domainbed:
            exact = torch.linalg.solve(hessian, v)
            assert float((estimate - exact).norm()) < 0.5 * float(exact.norm())
    else:  # stopped after the first term
        expected = 2 * powers[1] if domainbed else powers[0] + powers[1]
        assert torch.allclose(estimate, expected, rtol=0, atol=1e-10)


def test_neumann_stops_strictly_above_the_bound_of_ten():
    """H = I/2 and v = (10 or 10.5, 1, ...) in exact binary arithmetic: ``2 v_1`` has the largest entry 10 (the
    series goes on: at most 10 is not past the bound) or 10.5 (it stops there)."""
    hessian = torch.eye(6, dtype=torch.float64) / 2
    weight = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    for first, stops in ((10.0, False), (10.5, True)):
        v = torch.tensor([first, 1, 1, 1, 1, 1], dtype=torch.float64)
        estimate = neumann_inverse_hvp(v.clone(), quadratic(weight, hessian), weight, domainbed_inplace=True)
        assert torch.equal(estimate, neumann(hessian, v, domainbed=True))
        assert torch.equal(estimate, v if stops else 1.25 * v)


def test_defaults_and_search_space_are_domainbeds():
    hp = resolve(declared_hparams(TRM))
    assert (hp["cos_lambda"], hp["iters"], hp["groupdro_eta"], hp["class_balanced"]) == (1e-4, 200, 1e-2, False)
    assert hp["trm_domainbed_inplace"] is False and drawn(TRM.HPARAMS["trm_domainbed_inplace"]) == {False}
    assert bounds(TRM.HPARAMS["cos_lambda"]) == (pytest.approx(1e-5), pytest.approx(1.0))
    assert bounds(TRM.HPARAMS["iters"]) == (1, 10000)
    assert bounds(TRM.HPARAMS["groupdro_eta"]) == (pytest.approx(1e-3), pytest.approx(1e-1))
    assert all(isinstance(v, int) for v in drawn(TRM.HPARAMS["iters"]))
    assert drawn(TRM.HPARAMS["class_balanced"]) == {False}


def test_optimizers_heads_and_predict():
    alg = tiny(weight_decay=0.01)
    group = alg.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.01, 0.01)
    assert [id(p) for p in group["params"]] == [id(p) for p in alg.network.parameters()]
    heads = alg.head_optimizer.param_groups[0]
    assert isinstance(alg.head_optimizer, torch.optim.SGD) and heads["lr"] == 0.1 and heads["momentum"] == 0
    assert [id(p) for p in heads["params"]] == [id(p) for p in alg.heads.parameters()]
    assert len(alg.heads) == N_DOMAINS and isinstance(alg.classifier, nn.Linear)
    x = tiny_batch(4)[0][0]
    with torch.no_grad():
        assert torch.equal(alg.predict(x), alg.classifier(alg.featurizer(x)))


def test_resume_equals_uninterrupted():
    alg = tiny()
    for step in range(2):
        alg.update(tiny_batch(step))
    buffer = io.BytesIO()
    torch.save(alg.checkpoint_state(), buffer)
    alg.update(tiny_batch(2))
    buffer.seek(0)
    resumed = tiny()
    resumed.load_checkpoint_state(torch.load(buffer, weights_only=True))
    resumed.update(tiny_batch(2))
    for (name, p), q in zip(alg.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q) if isinstance(p, Tensor) else p == q, name
    assert resumed.schedule.count == 3
