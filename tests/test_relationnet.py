"""RelationNet: the official scripts' defaults and architecture, class feature maps as per-class sums, relation
scores from a hand-written relation module on pairs built in the test, and two updates replayed by hand (MSE to
one-hot labels, per-network gradient clipping, Adam with the step schedule)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from adam_reference import HandAdam
from dg_meta.algorithms.relationnet import RelationNet
from episode_checks import random_episode
from search_space import bounds, drawn
from torch import nn

from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.samplers import Episode

SHAPE = (1, 16, 16)


def make(shape: tuple[int, ...] = SHAPE, **overrides) -> RelationNet:
    torch.manual_seed(0)
    return RelationNet(shape, 4, 1, resolve(declared_hparams(RelationNet), 0, overrides)).double()


def episode(seed: int, n_way: int = 3, shot: int = 2, query: int = 2) -> Episode:
    return random_episode(seed, n_way, shot, query, SHAPE)


def hand_batch_norm(x: torch.Tensor, p: dict, name: str, training: bool, stats: dict) -> torch.Tensor:
    if training:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    else:
        mean, var = stats[f"{name}.running_mean"], stats[f"{name}.running_var"]
    shape = (1, -1, 1, 1)
    return (x - mean.view(shape)) / (var.view(shape) + 1e-5).sqrt() * p[f"{name}.weight"].view(shape) + \
        p[f"{name}.bias"].view(shape)


def hand_relation(p: dict, pairs: torch.Tensor, padding: int, training: bool, stats: dict | None = None):
    """Sung et al.'s g written out: 2 x (conv3x3, batch norm, ReLU, 2x2 max-pool), fc1 + ReLU, fc2 + sigmoid."""
    x = pairs
    for conv, bn in (("blocks.0", "blocks.1"), ("blocks.4", "blocks.5")):
        x = torch.nn.functional.conv2d(x, p[f"{conv}.weight"], p[f"{conv}.bias"], padding=padding)
        x = torch.nn.functional.max_pool2d(hand_batch_norm(x, p, bn, training, stats or {}).clamp(min=0), 2)
    x = (x.flatten(1) @ p["fc1.weight"].t() + p["fc1.bias"]).clamp(min=0)
    return 1 / (1 + torch.exp(-(x @ p["fc2.weight"].t() + p["fc2.bias"]).squeeze(1)))


def hand_pairs(support_maps: torch.Tensor, support_y: torch.Tensor, query_maps: torch.Tensor, n_way: int):
    """Every (query, class) pair in that order: the class's summed support maps, then the query's maps."""
    sums = [sum(support_maps[i] for i in range(len(support_y)) if support_y[i] == n) for n in range(n_way)]
    return torch.stack([torch.cat([sums[n], query_maps[q]]) for q in range(len(query_maps)) for n in range(n_way)])


def test_defaults_are_the_official_scripts_and_the_search_space():
    hp = resolve(declared_hparams(RelationNet))
    assert (hp["lr"], hp["lr_step"], hp["lr_gamma"], hp["max_grad_norm"], hp["relation_dim"],
            hp["relation_padding"], hp["n_query"], hp["meta_batch_size"], hp["weight_decay"]) == \
        (1e-3, 100000, 0.5, 0.5, 8, 1, 15, 1, 0.0)
    space = declared_hparams(RelationNet)
    assert bounds(space["lr"]) == pytest.approx((1e-4, 10 ** -2.5), rel=1e-12)
    assert bounds(space["n_query"]) == (5, 19)
    assert drawn(space["lr_step"]) == {50000, 100000}
    assert drawn(space["lr_gamma"]) == {0.1, 0.5}
    assert drawn(space["max_grad_norm"]) == {0.5, 1.0, 5.0}
    assert drawn(space["relation_dim"]) == {8, 16}
    assert drawn(space["relation_padding"]) == {1}
    with pytest.raises(UsageError, match="relation_padding' = 2 is invalid: it must be 0 or 1"):
        resolve(space, 0, {"relation_padding": 2})
    with pytest.raises(UsageError, match=r"lr_gamma' = 0.0 is invalid: it must be in \(0, 1\]"):
        resolve(space, 0, {"lr_gamma": 0.0})
    with pytest.raises(UsageError, match=r"lr_gamma' = 1.5 is invalid: it must be in \(0, 1\]"):
        resolve(space, 0, {"lr_gamma": 1.5})
    assert resolve(space, 0, {"lr_gamma": 1.0})["lr_gamma"] == 1.0


@pytest.mark.parametrize(("shape", "padding", "maps", "fc1_inputs"),
                         [((1, 16, 16), 1, (4, 4), 64), ((1, 28, 28), 1, (7, 7), 64),
                          ((3, 84, 84), 0, (21, 21), 64 * 3 * 3), ((3, 84, 84), 1, (21, 21), 64 * 5 * 5),
                          ((1, 16, 20), 1, (4, 5), 64)])
def test_embedding_keeps_feature_maps_and_the_relation_module_pools_them_twice(shape, padding, maps, fc1_inputs):
    algo = make(shape, relation_padding=padding)
    pools = [m for m in algo.featurizer.body if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 2 and algo.featurizer.body[3] is pools[0] and algo.featurizer.body[7] is pools[1]
    assert algo.map_shape == (64, *maps)
    assert algo.featurizer.n_outputs == 64 * maps[0] * maps[1]
    convs = [m for m in algo.relation.blocks if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == \
        [(128, 64, (3, 3), (padding, padding)), (64, 64, (3, 3), (padding, padding))]
    assert (algo.relation.fc1.in_features, algo.relation.fc1.out_features) == (fc1_inputs, 8)
    assert (algo.relation.fc2.in_features, algo.relation.fc2.out_features) == (8, 1)


def test_maps_that_the_relation_module_would_pool_away_are_a_usage_error():
    with pytest.raises(UsageError, match=r"^RelationNet: the relation module \(relation_padding 0\) reduces the "
                                         r"embedding's 4x4 feature maps to nothing: use larger images or "
                                         r"relation_padding 1$"):
        make(relation_padding=0)
    with pytest.raises(UsageError, match=r"reduces the embedding's 2x2 feature maps to nothing: use larger images$"):
        make((1, 8, 8))
    with pytest.raises(UsageError, match=r"reduces the embedding's 4x2 feature maps to nothing"):
        make((1, 16, 8))  # the width alone vanishes


def test_initialisation_is_the_official_weights_init():
    algo = make((3, 84, 84))
    convs = [m for m in algo.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6
    for conv in convs[1:]:  # 64 * 64 * 9 weights each: the sample std is within 2% of sqrt(2 / (3 * 3 * 64))
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.02)
    for conv in convs:
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    assert algo.relation.fc1.weight.std().item() == pytest.approx(0.01, rel=0.03)  # 1600 * 8 weights
    for fc in (algo.relation.fc1, algo.relation.fc2):
        assert torch.equal(fc.bias, torch.ones_like(fc.bias))
    for bn in [m for m in algo.modules() if isinstance(m, nn.BatchNorm2d)]:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_class_feature_maps_are_the_per_class_sums_of_the_support_maps():
    algo = make()
    g = torch.Generator().manual_seed(3)
    support_y = torch.tensor([2, 0, 1, 2, 0, 2])  # 2, 1 and 3 shots, in no particular order
    support_z = torch.randn(6, 64 * 16, generator=g, dtype=torch.float64)
    maps = support_z.view(6, 64, 4, 4)
    expected = torch.stack([maps[1] + maps[4], maps[2], maps[0] + maps[3] + maps[5]])
    assert torch.allclose(algo.class_maps(support_z, support_y, 3), expected, rtol=0, atol=1e-12)


def test_relation_scores_are_the_relation_module_on_class_then_query_maps_in_eval_mode():
    algo = make()
    with torch.no_grad():  # running statistics that differ from a fresh module's, so using them is visible
        for bn in [m for m in algo.relation.modules() if isinstance(m, nn.BatchNorm2d)]:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        algo.relation.fc1.bias.copy_(torch.linspace(-0.1, 0.1, 8))  # official init: every fc1 unit active (bias 1)
    algo.eval()
    e = episode(1)
    support_y = torch.tensor([1, 0, 2, 2, 0, 1])
    scores = algo.adapt(e.support_x, support_y)(e.query_x)
    with torch.no_grad():
        support_maps = algo.featurizer(e.support_x).view(6, 64, 4, 4)
        query_maps = algo.featurizer(e.query_x).view(6, 64, 4, 4)
        pairs = hand_pairs(support_maps, support_y, query_maps, 3)
        state = dict(algo.relation.state_dict())
        expected = hand_relation(state, pairs, 1, training=False, stats=state).view(6, 3)
    assert scores.shape == (6, 3)
    assert torch.allclose(scores, expected, rtol=0, atol=1e-12)
    assert ((scores > 0) & (scores < 1)).all()
    with torch.no_grad():
        hidden = algo.relation.fc1(algo.relation.blocks(pairs).flatten(1))
    assert (hidden < 0).any() and (hidden > 0).any()  # the ReLU after fc1 matters


def hand_loss(encoder: nn.Module, names: list[str], params: list[torch.Tensor], n_encoder: int,
              e: Episode) -> torch.Tensor:
    """Support and query embedded in separate passes, pairs built by hand, MSE to one-hot by hand."""
    weights = {n[len("featurizer."):]: p for n, p in zip(names[:n_encoder], params[:n_encoder])}
    support = torch.func.functional_call(encoder, weights, (e.support_x,)).view(len(e.support_x), 64, 4, 4)
    query = torch.func.functional_call(encoder, weights, (e.query_x,)).view(len(e.query_x), 64, 4, 4)
    relation = {n[len("relation."):]: p for n, p in zip(names[n_encoder:], params[n_encoder:])}
    scores = hand_relation(relation, hand_pairs(support, e.support_y, query, e.n_way), 1, training=True)
    targets = torch.tensor([float(e.query_y[q] == n) for q in range(len(query)) for n in range(e.n_way)],
                           dtype=torch.float64)
    return ((scores - targets) ** 2).sum() / (len(query) * e.n_way)


def clipped(grads: list[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], float]:
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    return [g * min(1.0, max_norm / (norm + 1e-6)) for g in grads], norm


def test_two_updates_clip_each_network_then_take_scheduled_adam_steps_on_the_mean_squared_error():
    algo = make(lr_step=1, lr_gamma=0.25, max_grad_norm=0.007)
    encoder = copy.deepcopy(algo.featurizer)
    names = [f"featurizer.{n}" for n, _ in algo.featurizer.named_parameters()] + \
        [f"relation.{n}" for n, _ in algo.relation.named_parameters()]
    n_encoder = len(list(algo.featurizer.parameters()))
    assert names == [n for n, _ in algo.named_parameters()]
    hand = HandAdam(list(algo.parameters()), lr=1e-3)
    for step in range(2):
        batch = [episode(2 * step), episode(2 * step + 1)][: step + 1]  # meta-batches of one, then two episodes
        params = [p.detach().requires_grad_() for p in hand.params]
        expected = torch.stack([hand_loss(encoder, names, params, n_encoder, e) for e in batch]).mean()
        grads = list(torch.autograd.grad(expected, params))
        encoder_grads, encoder_norm = clipped(grads[:n_encoder], 0.007)
        relation_grads, relation_norm = clipped(grads[n_encoder:], 0.007)
        # the relation module is clipped at both steps, the embedding at the first only (norms ~0.0097, 0.0054)
        assert relation_norm > 0.1 and (encoder_norm > 0.008 if step == 0 else encoder_norm < 0.006)
        hand.lr = 1e-3 * 0.25 ** step
        hand.step(encoder_grads + relation_grads)
        losses = algo.update(batch)
        assert torch.allclose(losses["loss"], expected.detach(), rtol=0, atol=1e-12)
        assert not losses["loss"].requires_grad
        for p, q in zip(algo.parameters(), hand.params, strict=True):
            assert torch.allclose(p, q, rtol=0, atol=1e-8)
    assert int(algo.steps_done) == 2
    assert algo.optimizer.param_groups[0]["lr"] == 1e-3 * 0.25
    assert "steps_done" in algo.state_dict()


@pytest.mark.parametrize(("step", "gamma", "steps_done", "factor"),
                         [(100000, 0.5, 0, 1.0), (100000, 0.5, 99999, 1.0), (100000, 0.5, 100000, 0.5),
                          (100000, 0.5, 250000, 0.25), (3, 0.1, 7, 0.01)])
def test_learning_rate_follows_steplr_at_the_step_count(step, gamma, steps_done, factor):
    algo = make(lr_step=step, lr_gamma=gamma)
    algo.steps_done.fill_(steps_done)
    algo.set_learning_rate()
    assert algo.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * factor, rel=1e-12)
    assert {id(p) for p in algo.optimizer.param_groups[0]["params"]} == {id(p) for p in algo.parameters()}
