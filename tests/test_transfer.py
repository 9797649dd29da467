"""Transfer: the risk gap and the projection on hand-computed cases, which optimizer moves what, and two updates
(descent on the cross-entropy, descent on the gap, projected ascent of the adversarial head) replayed by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.transfer import Transfer, risk_gap
from search_space import bounds, drawn
from torch import Tensor, nn
from torch.func import functional_call

from dg_meta.hparams import declared_hparams, resolve
from dg_meta.registry import ALGORITHMS


def make(**overrides) -> Transfer:
    torch.manual_seed(0)
    hparams = {**resolve(declared_hparams(Transfer)), "mlp_width": 6, "mlp_depth": 3, **overrides}
    return Transfer((3,), 3, 3, hparams).double()


def domain_batches(seed: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
            for _ in range(3)]


def test_registered_with_domainbeds_defaults_and_search_space():
    assert ALGORITHMS["Transfer"] is Transfer
    hp = resolve(declared_hparams(Transfer))
    assert (hp["t_lambda"], hp["delta"], hp["d_steps_per_g"], hp["lr_d"], hp["gda"]) == (1.0, 2.0, 10, 1e-3, False)
    assert (hp["lr"], hp["weight_decay"]) == (1e-3, 0.0)
    declared = Transfer.HPARAMS
    assert bounds(declared["t_lambda"]) == (pytest.approx(0.01), pytest.approx(10.0))
    assert bounds(declared["delta"]) == (0.1, 3.0)
    assert bounds(declared["lr_d"]) == (pytest.approx(10 ** -4.5), pytest.approx(10 ** -2.5))
    assert drawn(declared["d_steps_per_g"]) == {1, 2, 5}
    assert drawn(declared["gda"]) == {True}


def test_optimizers_and_the_adversarial_head():
    algorithm = make(lr=0.02, weight_decay=0.1, lr_d=0.3)
    assert isinstance(algorithm.optimizer, torch.optim.Adam)
    group = algorithm.optimizer.param_groups[0]
    assert [id(p) for p in group["params"]] == [id(p) for p in algorithm.network.parameters()]
    assert (group["lr"], group["weight_decay"]) == (0.02, 0.1)
    assert isinstance(algorithm.adv_opt, torch.optim.SGD)
    adv_group = algorithm.adv_opt.param_groups[0]
    assert [id(p) for p in adv_group["params"]] == [id(p) for p in algorithm.adv_classifier.parameters()]
    assert (adv_group["lr"], adv_group["momentum"], adv_group["weight_decay"]) == (0.3, 0, 0)
    assert set(algorithm.optimizers()) == {"optimizer", "adv_opt"}
    for a, h in zip(algorithm.adv_classifier.parameters(), algorithm.classifier.parameters(), strict=True):
        assert torch.equal(a, h) and a.data_ptr() != h.data_ptr()
    assert any(name.startswith("adv_classifier.") for name in algorithm.state_dict())
    gda = make(gda=True, lr=0.02, weight_decay=0.1)
    assert isinstance(gda.optimizer, torch.optim.SGD)
    sgd_group = gda.optimizer.param_groups[0]
    assert [id(p) for p in sgd_group["params"]] == [id(p) for p in gda.network.parameters()]
    assert (sgd_group["lr"], sgd_group["momentum"], sgd_group["weight_decay"]) == (0.02, 0, 0)


def test_risk_gap_is_largest_minus_smallest_domain_risk_and_its_gradient_reaches_only_those():
    head = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    features = [torch.tensor([[2.0, 0.0]], dtype=torch.float64, requires_grad=True),  # CE log(1 + e^-2)
                torch.tensor([[0.0, 1.0]], dtype=torch.float64, requires_grad=True),  # CE log(1 + e^1), largest
                torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)]  # CE log 2
    labels = [torch.tensor([0]), torch.tensor([0]), torch.tensor([1])]
    gap = risk_gap(features, labels, head)
    assert gap.item() == pytest.approx(math.log1p(math.e) - math.log1p(math.exp(-2.0)), rel=1e-12)
    gap.backward()
    assert features[2].grad.abs().sum() == 0
    assert features[0].grad.abs().sum() > 0 and features[1].grad.abs().sum() > 0


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_projection_rescales_the_offset_to_delta_only_when_longer(scale):
    algorithm = make(delta=1.0)
    g = torch.Generator().manual_seed(1)
    offsets = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in algorithm.classifier.parameters()]
    norm = torch.stack([o.pow(2).sum() for o in offsets]).sum().sqrt()
    offsets = [scale * o / norm for o in offsets]  # offset of length `scale`
    with torch.no_grad():
        for a, h, o in zip(algorithm.adv_classifier.parameters(), algorithm.classifier.parameters(), offsets):
            a.copy_(h + o)
    algorithm.project_adversary()
    shrink = min(1.0, 1.0 / scale)
    for a, h, o in zip(algorithm.adv_classifier.parameters(), algorithm.classifier.parameters(), offsets):
        expected = h + shrink * o
        assert torch.allclose(a, expected, rtol=0, atol=1e-14)
        if scale < 1:
            assert torch.equal(a, h + o)


def replay(algorithm: Transfer, steps: int) -> None:
    """``steps`` updates recomputed on copies: Adam for the featurizer (two steps per update) and the head
    (one: it has no gradient in the gap step), SGD and projection by hand for the adversarial head."""
    hp = algorithm.hparams
    featurizer, head = copy.deepcopy(algorithm.featurizer), copy.deepcopy(algorithm.classifier)
    phi_names = [n for n, _ in featurizer.named_parameters()]
    h_names = [n for n, _ in head.named_parameters()]
    phi_adam = HandAdam(list(featurizer.parameters()), lr=hp["lr"])
    h_adam = HandAdam(list(head.parameters()), lr=hp["lr"])
    adversary = [p.detach().clone() for p in head.parameters()]

    def phi(params: list[Tensor], x: Tensor) -> Tensor:
        return functional_call(featurizer, dict(zip(phi_names, params)), (x,))

    def h(params: list[Tensor], z: Tensor) -> Tensor:
        return functional_call(head, dict(zip(h_names, params)), (z,))

    def gap(features: list[Tensor], labels: list[Tensor], params: list[Tensor]) -> Tensor:
        risks = [F.cross_entropy(h(params, z), y) for z, y in zip(features, labels)]
        return hp["t_lambda"] * (max(risks) - min(risks))

    for step in range(steps):
        batch = domain_batches(step)
        xs, ys = [x for x, _ in batch], [y for _, y in batch]
        phi_params = [p.detach().requires_grad_() for p in phi_adam.params]
        h_params = [p.detach().requires_grad_() for p in h_adam.params]
        loss = F.cross_entropy(h(h_params, phi(phi_params, torch.cat(xs))), torch.cat(ys))
        grads = torch.autograd.grad(loss, phi_params + h_params)
        phi_adam.step([g.detach() for g in grads[:len(phi_params)]])
        h_adam.step([g.detach() for g in grads[len(phi_params):]])

        phi_params = [p.detach().requires_grad_() for p in phi_adam.params]
        descent_gap = gap([phi(phi_params, x) for x in xs], ys, adversary)
        phi_adam.step([g.detach() for g in torch.autograd.grad(descent_gap, phi_params)])

        with torch.no_grad():
            features = [phi(phi_adam.params, x) for x in xs]
        adversary = [p.clone() for p in h_adam.params]
        for _ in range(hp["d_steps_per_g"]):
            params = [p.detach().requires_grad_() for p in adversary]
            ascent_gap = gap(features, ys, params)
            grads = torch.autograd.grad(ascent_gap, params)
            adversary = [p.detach() + hp["lr_d"] * g for p, g in zip(params, grads)]
            offset = [a - c for a, c in zip(adversary, h_adam.params)]
            length = sum(o.pow(2).sum() for o in offset).sqrt()
            if length > hp["delta"]:
                adversary = [c + hp["delta"] / length * o for c, o in zip(h_adam.params, offset)]

        losses = algorithm.update(batch)
        assert torch.allclose(losses["loss"], loss.detach(), rtol=0, atol=1e-12)
        assert torch.allclose(losses["gap"], ascent_gap.detach(), rtol=0, atol=1e-12)
        for module, expected in ((algorithm.featurizer, phi_adam.params), (algorithm.classifier, h_adam.params),
                                 (algorithm.adv_classifier, adversary)):
            for p, q in zip(module.parameters(), expected, strict=True):
                assert torch.allclose(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("delta", [0.05, 100.0])
def test_two_updates_replay_descent_and_projected_ascent(delta):
    """delta 0.05: the ascent leaves the ball at every step (the projection acts); 100: it never does."""
    algorithm = make(delta=delta, d_steps_per_g=3, t_lambda=0.7, lr_d=0.5, lr=0.01)
    replay(algorithm, 2)
    distance = torch.stack([(a - h).pow(2).sum() for a, h in zip(algorithm.adv_classifier.parameters(),
                                                                   algorithm.classifier.parameters())]).sum().sqrt()
    assert (distance.item() == pytest.approx(delta)) == (delta < 1)


def test_gda_takes_plain_sgd_steps_on_featurizer_and_head():
    algorithm = make(gda=True, lr=0.1, d_steps_per_g=1, t_lambda=2.0)
    network = copy.deepcopy(algorithm.network)
    adversary = copy.deepcopy(algorithm.adv_classifier)
    batch = domain_batches(0)
    x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
    loss = F.cross_entropy(network(x), y)
    grads = torch.autograd.grad(loss, list(network.parameters()))
    with torch.no_grad():
        for p, g in zip(network.parameters(), grads):
            p -= 0.1 * g
    features = [network[0](x_d) for x_d, _ in batch]
    risks = torch.stack([F.cross_entropy(adversary(z), y_d) for z, (_, y_d) in zip(features, batch)])
    featurizer_grads = torch.autograd.grad(2.0 * (risks.max() - risks.min()), list(network[0].parameters()))
    with torch.no_grad():
        for p, g in zip(network[0].parameters(), featurizer_grads):
            p -= 0.1 * g
    algorithm.update(batch)
    for p, q in zip(algorithm.network.parameters(), network.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)


def test_resumed_checkpoint_continues_like_the_uninterrupted_run():
    algorithm = make(delta=0.05, d_steps_per_g=2, lr_d=0.5)
    algorithm.update(domain_batches(0))
    state = copy.deepcopy(algorithm.checkpoint_state())
    resumed = make(delta=0.05, d_steps_per_g=2, lr_d=0.5, mlp_width=6)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in resumed.parameters():
            p.normal_()
    resumed.load_checkpoint_state(state)
    algorithm.update(domain_batches(1))
    resumed.update(domain_batches(1))
    for p, q in zip(algorithm.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
