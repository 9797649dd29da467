"""Baseline (Chen et al. 2019): the official training setting (Adam, no weight decay, zero-bias linear head), two
updates replayed with a hand-written Adam, and the test-time head: a new linear head fitted on the frozen support
features only, its 100 epochs of SGD replayed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms import baseline as baseline_module
from dg_meta.algorithms.baseline import Baseline
from search_space import bounds
from support_head_reference import linear_ce_gradient, replay_finetune
from torch import nn

from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.networks import Conv4

SHAPE = (1, 16, 16)


def make(**overrides) -> Baseline:
    torch.manual_seed(0)
    return Baseline(SHAPE, 3, 2, resolve(declared_hparams(Baseline), 0, overrides)).double()


def domain_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, *SHAPE, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g))
            for _ in range(2)]


def episode(seed: int, n_way: int = 3, shot: int = 2, query: int = 2):
    g = torch.Generator().manual_seed(seed)
    support_x = torch.randn(n_way * shot, *SHAPE, generator=g, dtype=torch.float64)
    query_x = torch.randn(n_way * query, *SHAPE, generator=g, dtype=torch.float64)
    return support_x, torch.arange(n_way).repeat_interleave(shot), query_x


def test_defaults_are_the_official_training_setting_and_the_search_space():
    hp = resolve(declared_hparams(Baseline))
    assert (hp["lr"], hp["weight_decay"], hp["backbone"], hp["nonlinear_classifier"]) == (1e-3, 0.0, "conv4", False)
    assert bounds(declared_hparams(Baseline)["weight_decay"]) == pytest.approx((1e-6, 1e-2), rel=1e-12)
    with pytest.raises(UsageError, match=r"^hparam 'nonlinear_classifier' = True is invalid: it must be false "):
        resolve(declared_hparams(Baseline), 0, {"nonlinear_classifier": True})


def test_training_head_is_a_zero_bias_linear_layer_trained_with_the_backbone_by_adam():
    algorithm = make()
    assert isinstance(algorithm.featurizer, Conv4) and type(algorithm.classifier) is nn.Linear
    assert (algorithm.classifier.in_features, algorithm.classifier.out_features) == (64, 3)
    assert torch.equal(algorithm.classifier.bias, torch.zeros(3, dtype=torch.float64))
    assert algorithm.classifier.weight.abs().sum() > 0
    assert list(algorithm.network) == [algorithm.featurizer, algorithm.classifier]
    assert isinstance(algorithm.optimizer, torch.optim.Adam)
    (group,) = algorithm.optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in algorithm.network.parameters()]
    assert (group["lr"], group["weight_decay"]) == (1e-3, 0.0)


def test_two_updates_are_adam_steps_on_the_pooled_cross_entropy():
    algorithm = make()
    net = nn.Sequential(copy.deepcopy(algorithm.featurizer), copy.deepcopy(algorithm.classifier))
    names = [n for n, _ in net.named_parameters()]
    hand = HandAdam(list(net.parameters()), lr=1e-3)
    for step in range(2):
        batch = domain_batches(step)
        x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
        params = [p.detach().requires_grad_() for p in hand.params]
        expected = F.cross_entropy(torch.func.functional_call(net, dict(zip(names, params)), (x,)), y)
        hand.step(torch.autograd.grad(expected, params))
        losses = algorithm.update(batch)
        assert torch.allclose(losses["loss"], expected.detach(), rtol=0, atol=1e-10)
        for p, q in zip(algorithm.network.parameters(), hand.params, strict=True):
            assert torch.allclose(p, q, rtol=0, atol=1e-8)


def test_adapt_fits_a_new_linear_head_on_the_support_features_by_the_official_sgd_loop():
    algorithm = make().eval()
    support_x, support_y, query_x = episode(1)
    torch.manual_seed(3)
    logits = algorithm.adapt(support_x, support_y)(query_x)
    with torch.no_grad():
        support_z, query_z = algorithm.featurizer(support_x), algorithm.featurizer(query_x)
    torch.manual_seed(3)
    fresh = nn.Linear(64, 3).double()  # the new head: PyTorch's initialisation, drawn first
    (weight, bias), batches = replay_finetune([fresh.weight, fresh.bias], linear_ce_gradient, support_z, support_y)
    assert len(batches) == 200 and sorted(batches[0] + batches[1]) == list(range(6))
    assert logits.shape == (6, 3) and not logits.requires_grad
    assert torch.allclose(logits, query_z @ weight.t() + bias, rtol=0, atol=1e-10)


def test_the_head_is_fitted_once_on_the_support_set_only(monkeypatch):
    algorithm = make().eval()
    fits = []
    original = baseline_module.fit_support_head
    monkeypatch.setattr(baseline_module, "fit_support_head", lambda head, z, y: fits.append((head, z, y)) or
                        original(head, z, y))
    state = {k: v.clone() for k, v in algorithm.state_dict().items()}
    support_x, support_y, query_x = episode(2, n_way=2)
    predict = algorithm.adapt(support_x, support_y)
    (head, z, y), = fits
    assert type(head) is nn.Linear and (head.in_features, head.out_features) == (64, 2)
    assert head.weight.dtype == torch.float64
    with torch.no_grad():
        assert torch.equal(z, algorithm.featurizer(support_x)) and torch.equal(y, support_y)
    first = predict(query_x)
    other = predict(torch.cat([query_x[:1], torch.randn(3, *SHAPE, dtype=torch.float64)]))
    assert torch.equal(first[:1], other[:1]) and torch.equal(predict(query_x), first)
    assert len(fits) == 1
    with torch.no_grad():
        assert torch.allclose(first, head(algorithm.featurizer(query_x)), rtol=0, atol=0)
    assert all(torch.equal(v, algorithm.state_dict()[k]) for k, v in state.items())  # the embedding is frozen
