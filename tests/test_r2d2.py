"""R2D2: the official defaults; the head against the primal ridge closed form written out (bias column, 1/sqrt(n)
scaling, alpha and beta); two updates replayed by hand (embedding, primal ridge solve, cross-entropy, Adam over the
embedding, alpha, beta and a learned lambda, the halved rate); lambda fixed by default; adapt."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.r2d2 import R2D2
from episode_checks import build_double, random_episode
from search_space import bounds, drawn
from torch import Tensor

from dg_meta.hparams import declared_hparams, resolve
from dg_meta.samplers import Episode

SHAPE = (1, 16, 16)
DT = torch.float64


def make(**overrides) -> R2D2:
    return build_double(R2D2, SHAPE, overrides)


def episode(seed: int, n_way: int = 2, shot: int = 2, query: int = 2) -> Episode:
    return random_episode(seed, n_way, shot, query, SHAPE)


def hand_logits(support_z: Tensor, support_y: Tensor, query_z: Tensor, n_way: int, lam: Tensor, alpha: Tensor,
                beta: Tensor) -> Tensor:
    """Bertinetto et al.'s head in its primal form: ``W = (X^T X + lambda I)^-1 X^T Y`` with ``X = [Z, 1] / sqrt(n)``
    and ``Y = onehot / sqrt(n)``; logits ``alpha [Z_q, 1] W + beta``."""
    n, d = support_z.shape
    x = torch.cat([support_z, torch.ones(n, 1, dtype=DT)], 1) / math.sqrt(n)
    y = torch.stack([torch.eye(n_way, dtype=DT)[c] for c in support_y.tolist()]) / math.sqrt(n)
    w = torch.linalg.inv(x.t() @ x + lam * torch.eye(d + 1, dtype=DT)) @ x.t() @ y
    return alpha * (torch.cat([query_z, torch.ones(len(query_z), 1, dtype=DT)], 1) @ w) + beta


def test_defaults_are_the_official_ones_and_the_search_space():
    hp = resolve(declared_hparams(R2D2))
    assert (hp["lr"], hp["lr_halve_every"], hp["weight_decay"], hp["meta_batch_size"], hp["n_query"]) == \
        (5e-3, 2000, 0.0, 1, 14)
    assert (hp["init_lambda"], hp["learn_lambda"], hp["init_scale"], hp["backbone"]) == (50.0, False, 1e-4, "conv4")
    space = declared_hparams(R2D2)
    assert bounds(space["lr"]) == pytest.approx((10 ** -3.5, 1e-2))
    assert bounds(space["init_lambda"]) == pytest.approx((1.0, 10 ** 2.5))
    assert bounds(space["n_query"]) == (5, 15)
    assert drawn(space["learn_lambda"]) == {False, True}
    assert drawn(space["init_scale"]) == {1e-4, 1.0, 10.0}
    algorithm = make()
    assert (algorithm.scale.item(), algorithm.bias.item(), algorithm.ridge_lambda.item()) == pytest.approx(
        (1e-4, 0.0, 50.0))


@pytest.mark.parametrize(("n", "d"), [(4, 9), (10, 3), (6, 5)], ids=["woodbury", "primal", "n-equals-d+1"])
def test_head_is_the_ridge_closed_form_with_bias_column_scaling_alpha_and_beta(n, d):
    algorithm = make(init_lambda=0.3)
    with torch.no_grad():
        algorithm.scale.fill_(1.7)
        algorithm.bias.fill_(-0.4)
    g = torch.Generator().manual_seed(n)
    support_z, query_z = torch.randn(n, d, generator=g, dtype=DT), torch.randn(5, d, generator=g, dtype=DT)
    support_y = torch.arange(n) % 3
    expected = hand_logits(support_z, support_y, query_z, 3, torch.tensor(0.3, dtype=DT), torch.tensor(1.7),
                           torch.tensor(-0.4))
    assert torch.allclose(algorithm.episode_logits(support_z, support_y, query_z, 3), expected, atol=1e-10)


def test_two_updates_are_adam_steps_through_the_ridge_solution_with_a_learned_lambda_and_the_halved_rate():
    algorithm = make(learn_lambda=True, lr_halve_every=1, init_scale=10.0)
    net = copy.deepcopy(algorithm.featurizer)
    names = [n for n, _ in net.named_parameters()]
    head = [algorithm.scale, algorithm.bias, algorithm.ridge_lambda]
    hand = HandAdam([*net.parameters(), *head], lr=5e-3)
    for step in range(2):
        e = episode(step)
        params = [p.detach().requires_grad_() for p in hand.params]
        z = torch.func.functional_call(net, dict(zip(names, params[:-3])), (torch.cat([e.support_x, e.query_x]),))
        scale, bias, lam = params[-3:]
        logits = hand_logits(z[:4], e.support_y, z[4:], 2, lam, scale, bias)
        expected = F.cross_entropy(logits, e.query_y)
        hand.lr = 5e-3 * 0.5 ** step
        hand.step(list(torch.autograd.grad(expected, params)))
        losses = algorithm.update([e])
        assert torch.allclose(losses["loss"], expected.detach(), rtol=0, atol=1e-10)
        assert not losses["loss"].requires_grad
        mine = [*algorithm.featurizer.parameters(), *head]
        for p, q in zip(mine, hand.params):
            assert torch.allclose(p, q, rtol=0, atol=1e-8)  # 1e-8: see test_protonet's note on Adam and rounding
    assert [p.item() for p in head] != pytest.approx([10.0, 0.0, 50.0], abs=1e-4)  # the head moved
    assert int(algorithm.steps_done) == 2


def test_lambda_is_a_fixed_buffer_unless_learned():
    algorithm = make()
    assert "ridge_lambda" in dict(algorithm.named_buffers())
    assert "ridge_lambda" not in dict(algorithm.named_parameters())
    head = {id(p) for group in algorithm.optimizer.param_groups[1:] for p in group["params"]}
    assert head == {id(algorithm.scale), id(algorithm.bias)}
    algorithm.update([episode(0)])
    assert algorithm.ridge_lambda.item() == 50.0
    learned = make(learn_lambda=True)
    assert "ridge_lambda" in dict(learned.named_parameters())
    assert "ridge_lambda" in learned.state_dict() and "ridge_lambda" in algorithm.state_dict()


def test_adapt_is_the_head_on_eval_mode_features_of_support_and_queries():
    algorithm = make(init_scale=2.0)
    algorithm.update([episode(0)])
    e = episode(1, n_way=3, shot=2, query=3)
    algorithm.eval()
    predict = algorithm.adapt(e.support_x, e.support_y)
    with torch.no_grad():
        expected = hand_logits(algorithm.featurizer(e.support_x), e.support_y, algorithm.featurizer(e.query_x), 3,
                               algorithm.ridge_lambda, algorithm.scale, algorithm.bias)
    logits = predict(e.query_x)
    assert logits.shape == (9, 3) and not logits.requires_grad
    assert torch.allclose(logits, expected, atol=1e-10)
