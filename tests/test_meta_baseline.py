"""Meta-Baseline (Chen et al. 2021): the official configuration (SGD, lr 1e-3, weight decay 5e-4, temperature 10,
5-way 1-shot 15-query, 4 episodes a step), logits = temperature * cosine(query, class mean) by hand, two updates
replayed by hand (one forward pass over the meta-batch, SGD with momentum over the backbone and the temperature),
the temperature's gradient in closed form, and the stage-2 start from a FewShotPretrain run (--init-from)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from dg_meta.algorithms.fewshot_pretrain import FewShotPretrain
from dg_meta.algorithms.meta_baseline import MetaBaseline
from episode_checks import build_double, random_episode
from search_space import bounds, drawn
from torch import nn

from dg_meta.hparams import declared_hparams, resolve
from dg_meta.init_from import init_from_run
from dg_meta.samplers import Episode

SHAPE = (1, 16, 16)


def make(**overrides) -> MetaBaseline:
    return build_double(MetaBaseline, SHAPE, overrides)


def episode(seed: int, n_way: int = 2, shot: int = 2, query: int = 2) -> Episode:
    return random_episode(seed, n_way, shot, query, SHAPE)


def hand_logits(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, tau: torch.Tensor,
                n_way: int) -> torch.Tensor:
    """``tau * <q / ||q||, c_k / ||c_k||>`` with ``c_k`` the mean of class ``k``'s support rows, written out."""
    centres = torch.stack([support[support_y == k].mean(0) for k in range(n_way)])
    centres = centres / centres.pow(2).sum(1, keepdim=True).sqrt()
    return tau * (query / query.pow(2).sum(1, keepdim=True).sqrt()) @ centres.t()


def test_defaults_are_the_official_configuration_and_the_search_space():
    declared = declared_hparams(MetaBaseline)
    hp = resolve(declared)
    assert {k: hp[k] for k in ("lr", "weight_decay", "temperature", "n_way", "k_shot", "n_query", "meta_batch_size",
                               "backbone")} == {"lr": 1e-3, "weight_decay": 5e-4, "temperature": 10.0, "n_way": 5,
                                                "k_shot": 1, "n_query": 15, "meta_batch_size": 4, "backbone": "conv4"}
    assert bounds(declared["lr"]) == pytest.approx((1e-4, 1e-2), rel=1e-12)
    assert bounds(declared["weight_decay"]) == pytest.approx((1e-6, 1e-2), rel=1e-12)
    assert drawn(declared["temperature"]) == {1.0, 10.0, 30.0}
    algorithm = make()
    assert isinstance(algorithm.temperature, nn.Parameter) and algorithm.temperature.item() == 10.0
    (group,) = algorithm.optimizer.param_groups
    assert isinstance(algorithm.optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"], group["dampening"]) == (1e-3, 0.9, 5e-4, 0)
    assert [id(p) for p in group["params"]] == [id(p) for p in algorithm.parameters()]
    assert "temperature" in algorithm.state_dict()
    assert make(temperature=3.0).temperature.item() == 3.0


def test_episode_logits_are_temperature_times_cosine_to_the_class_means():
    algorithm = make(temperature=2.0)
    support = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    query = torch.tensor([[3.0, 4.0], [-1.0, 0.0]], dtype=torch.float64)
    logits = algorithm.episode_logits(support, torch.tensor([0, 0, 1, 1]), query, 2)
    # class means (2, 0) and (0.5, 1): unit (1, 0) and (1, 2) / sqrt(5)
    expected = [[2 * 0.6, 2 * (0.6 + 1.6) / math.sqrt(5)], [-2.0, -2 / math.sqrt(5)]]
    assert torch.allclose(logits, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_adapt_scores_queries_by_the_same_logits_on_frozen_features():
    algorithm = make().eval()
    e = episode(3, n_way=3)
    logits = algorithm.adapt(e.support_x, e.support_y)(e.query_x)
    with torch.no_grad():
        expected = hand_logits(algorithm.featurizer(e.support_x), e.support_y, algorithm.featurizer(e.query_x),
                               torch.tensor(10.0, dtype=torch.float64), 3)
    assert torch.allclose(logits, expected, rtol=0, atol=1e-12) and not logits.requires_grad


def test_two_updates_are_sgd_steps_on_the_meta_batch_cross_entropy_with_a_learned_temperature():
    algorithm = make(lr=0.01, weight_decay=1e-3)
    net = copy.deepcopy(algorithm.featurizer)
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach().clone() for p in [*net.parameters(), algorithm.temperature]]
    bufs: list[torch.Tensor | None] = [None] * len(params)
    for step in range(2):
        batch = [episode(10 * step + i, n_way=3 - i, shot=1 + i) for i in range(2)]  # 3-way 1-shot, 2-way 2-shot
        x = torch.cat([e.support_x for e in batch] + [e.query_x for e in batch])  # one pass: shared BN statistics
        p = [q.requires_grad_() for q in params]
        z = torch.func.functional_call(net, dict(zip(names, p[:-1])), (x,))
        support, query = z[:7].split([3, 4]), z[7:].split([6, 4])
        logits = [hand_logits(s, e.support_y, q, p[-1], e.n_way) for s, q, e in zip(support, query, batch)]
        nll = [-F.log_softmax(lg, 1)[torch.arange(len(lg)), e.query_y] for lg, e in zip(logits, batch)]
        expected = torch.cat(nll).mean()  # averaged over all ten queries of the meta-batch
        grads = torch.autograd.grad(expected, p)
        tau_grad = sum(((F.softmax(lg, 1) - F.one_hot(e.query_y, e.n_way)) * lg / p[-1]).sum()
                       for lg, e in zip(logits, batch)) / 10  # d loss / d tau = mean_q sum_k (p_k - y_k) cos_k
        assert grads[-1].item() == pytest.approx(tau_grad.item(), rel=1e-10)
        for i, g in enumerate(grads):
            g = g + 1e-3 * params[i].detach()
            bufs[i] = g if bufs[i] is None else 0.9 * bufs[i] + g
        params = [q.detach() - 0.01 * b for q, b in zip(params, bufs)]
        losses = algorithm.update(batch)
        assert torch.allclose(losses["loss"], expected.detach(), rtol=0, atol=1e-12)
        assert losses["temperature"].item() == pytest.approx(params[-1].item(), rel=1e-12)
        assert not any(v.requires_grad for v in losses.values())
        for ours, hand in zip([*algorithm.featurizer.parameters(), algorithm.temperature], params, strict=True):
            assert torch.allclose(ours, hand, rtol=0, atol=1e-10)
    assert algorithm.temperature.item() != 10.0


def test_stage_two_starts_from_a_fewshot_pretrain_run_with_the_initial_temperature(tmp_path):
    torch.manual_seed(5)
    pretrain = FewShotPretrain(SHAPE, 4, 1, resolve(declared_hparams(FewShotPretrain)))
    (tmp_path / "pretrain").mkdir()
    torch.save({"algorithm": pretrain.checkpoint_state()}, tmp_path / "pretrain" / "checkpoint.pt")
    torch.manual_seed(0)
    algorithm = MetaBaseline(SHAPE, 4, 1, resolve(declared_hparams(MetaBaseline)))
    report = init_from_run(algorithm, tmp_path / "pretrain")
    assert report.endswith("not loaded (absent or shape differs): temperature")
    assert all(torch.equal(v, algorithm.featurizer.state_dict()[k]) for k, v in pretrain.featurizer.state_dict().items()
               if v.is_floating_point())
    assert algorithm.temperature.item() == 10.0
