"""FEAT: the official ConvNet defaults, the set-to-set Transformer (by hand on a tiny width, its initialisation, its
permutation equivariance over classes), the contrastive regulariser by hand, evaluation logits, two updates
replayed by hand (dropout masks drawn in the same order, two Adam learning rates, the halving schedule), and
initialisation from a FewShotPretrain run."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.feat import FEAT, SetAttention
from dg_meta.algorithms.fewshot_pretrain import FewShotPretrain
from episode_checks import build_double, random_episode
from search_space import bounds, drawn

from dg_meta.hparams import declared_hparams, resolve
from dg_meta.init_from import init_from_run
from dg_meta.samplers import Episode

SHAPE = (1, 16, 16)


def make(**overrides) -> FEAT:
    return build_double(FEAT, SHAPE, overrides)


def episode(seed: int, n_way: int = 3, shot: int = 2, query: int = 2) -> Episode:
    return random_episode(seed, n_way, shot, query, SHAPE)


def hand_attention(p: dict, x: torch.Tensor, training: bool) -> torch.Tensor:
    """The official MultiHeadAttention with one head written out on a batch of sets ``x`` ([B, n, d]); in training,
    dropout 0.1 on the attention weights, then 0.5 on fc's output, drawn in that order."""
    q, k, v = x @ p["w_q.weight"].t(), x @ p["w_k.weight"].t(), x @ p["w_v.weight"].t()
    scores = torch.einsum("bid,bjd->bij", q, k) / math.sqrt(x.shape[-1])
    weights = torch.exp(scores - scores.amax(2, keepdim=True))
    weights = weights / weights.sum(2, keepdim=True)
    if training:
        weights = F.dropout(weights, 0.1, training=True)
    out = torch.einsum("bij,bjd->bid", weights, v) @ p["fc.weight"].t() + p["fc.bias"]
    if training:
        out = F.dropout(out, 0.5, training=True)
    y = x + out
    mean, var = y.mean(-1, keepdim=True), ((y - y.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True)
    return (y - mean) / (var + 1e-5).sqrt() * p["layer_norm.weight"] + p["layer_norm.bias"]


def sq_dist_logits(x: torch.Tensor, centres: torch.Tensor, temperature: float) -> torch.Tensor:
    return -((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1) / temperature


def test_defaults_are_the_official_convnet_1shot_command_and_the_search_space():
    hp = resolve(declared_hparams(FEAT))
    assert (hp["lr"], hp["lr_mul"], hp["temperature"], hp["temperature2"], hp["balance"], hp["lr_halve_every"],
            hp["n_query"], hp["meta_batch_size"], hp["weight_decay"], hp["backbone"]) == \
        (1e-4, 10.0, 64.0, 16.0, 1.0, 2000, 15, 1, 0.0, "conv4")
    space = declared_hparams(FEAT)
    assert bounds(space["lr"]) == pytest.approx((10 ** -4.5, 1e-3), rel=1e-12)
    assert bounds(space["n_query"]) == (5, 15)
    assert drawn(space["lr_mul"]) == {1.0, 10.0}
    assert drawn(space["temperature"]) == drawn(space["temperature2"]) == {1.0, 16.0, 32.0, 64.0}
    assert drawn(space["balance"]) == {0.0, 0.01, 0.1, 1.0}


def test_attention_by_hand_on_width_two():
    attention = SetAttention(2).double().eval()
    weights = {"w_q.weight": [[1.0, 0.5], [-0.5, 2.0]], "w_k.weight": [[0.3, -1.0], [1.5, 0.2]],
               "w_v.weight": [[2.0, 0.0], [1.0, -1.0]], "fc.weight": [[0.5, -0.25], [0.75, 1.0]],
               "fc.bias": [0.1, -0.2], "layer_norm.weight": [1.5, 0.5], "layer_norm.bias": [0.25, -0.5]}
    attention.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in weights.items()})
    xs = [[1.0, 2.0], [-1.0, 0.5], [0.0, -1.5]]

    def mat(m, v):
        return [sum(a * b for a, b in zip(row, v)) for row in m]

    q, k, v = ([mat(weights[w], x) for x in xs] for w in ("w_q.weight", "w_k.weight", "w_v.weight"))
    expected = []
    for i in range(3):
        scores = [sum(a * b for a, b in zip(q[i], k[j])) / math.sqrt(2) for j in range(3)]
        a = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
        read = [sum(a[j] * v[j][c] for j in range(3)) for c in range(2)]
        y = [xs[i][c] + o + b for c, (o, b) in enumerate(zip(mat(weights["fc.weight"], read), weights["fc.bias"]))]
        mean = sum(y) / 2
        std = math.sqrt(sum((t - mean) ** 2 for t in y) / 2 + 1e-5)
        expected.append([(t - mean) / std * g + b
                         for t, g, b in zip(y, weights["layer_norm.weight"], weights["layer_norm.bias"])])
    with torch.no_grad():
        out = attention(torch.tensor([xs], dtype=torch.float64))
    assert torch.allclose(out[0], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_attention_initialisation_is_the_official_one():
    torch.manual_seed(0)
    attention = SetAttention(64)
    for layer in (attention.w_q, attention.w_k, attention.w_v, attention.fc):  # 4096 weights: sample std within 4%
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / (64 + 64)), rel=0.04)
    assert (attention.w_q.bias, attention.w_k.bias, attention.w_v.bias) == (None, None, None)
    assert attention.fc.bias is not None
    assert (attention.attention_dropout.p, attention.dropout.p) == (0.1, 0.5)


def test_adapted_prototypes_permute_with_the_classes_and_depend_on_every_class():
    algo = make().eval()
    g = torch.Generator().manual_seed(2)
    support_z = torch.randn(6, 64, generator=g, dtype=torch.float64)
    support_y = torch.tensor([0, 1, 2, 0, 1, 2])
    perm = torch.tensor([2, 0, 1])  # class n becomes class perm[n]
    with torch.no_grad():
        adapted = algo.adapted_prototypes(support_z, support_y, 3)
        permuted = algo.adapted_prototypes(support_z, perm[support_y], 3)
        assert torch.allclose(permuted[perm], adapted, rtol=0, atol=1e-12)
        shifted = support_z.clone()
        shifted[0] += 1.0  # moves class 0's prototype only
        moved = algo.adapted_prototypes(shifted, support_y, 3)
    assert not torch.allclose(moved[1:], adapted[1:], rtol=0, atol=1e-6)
    means = torch.stack([support_z[support_y == n].mean(0) for n in range(3)])
    expected = hand_attention(dict(algo.attention.state_dict()), means.unsqueeze(0), training=False)[0]
    assert torch.allclose(adapted, expected, rtol=0, atol=1e-12)


def test_evaluation_logits_are_negative_squared_distances_to_adapted_prototypes_over_temperature():
    algo = make(temperature=8.0).eval()  # episode_accuracy evaluates in eval mode
    e = episode(5)
    predict = algo.adapt(e.support_x, e.support_y)
    logits = predict(e.query_x)
    assert torch.equal(logits, predict(e.query_x))  # no dropout in eval mode
    with torch.no_grad():
        support, query = algo.featurizer(e.support_x), algo.featurizer(e.query_x)
        means = torch.stack([support[e.support_y == n].mean(0) for n in range(3)])
        prototypes = hand_attention(dict(algo.attention.state_dict()), means.unsqueeze(0), training=False)[0]
    assert torch.allclose(logits, sq_dist_logits(query, prototypes, 8.0), rtol=0, atol=1e-9)


def test_regulariser_classifies_unadapted_embeddings_by_centres_of_each_class_adapted_alone():
    algo = make(temperature2=3.0)
    algo.attention = SetAttention(2).double().eval()  # random weights of width 2
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5], [2.0, 1.0], [-1.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([1, 0, 1, 0, 0, 1])
    reg = algo.regulariser(z, y, 2)
    state = dict(algo.attention.state_dict())
    centres = [hand_attention(state, z[y == n].unsqueeze(0), training=False)[0].mean(0) for n in range(2)]
    expected = 0.0
    for i in range(6):
        logits = [-float(((z[i] - c) ** 2).sum()) / 3.0 for c in centres]
        expected -= logits[y[i]] - math.log(sum(math.exp(t) for t in logits))
    assert reg.item() == pytest.approx(expected / 6, rel=1e-12)


def test_learning_rates_of_the_two_groups_halve_together():
    algo = make()
    assert [len(g["params"]) for g in algo.optimizer.param_groups] == \
        [len(list(algo.featurizer.parameters())), len(list(algo.attention.parameters()))]
    assert algo.optimizer.param_groups[1]["params"][0] is algo.attention.w_q.weight
    assert [g["lr"] for g in algo.optimizer.param_groups] == pytest.approx([1e-4, 1e-3], rel=1e-12)  # from the start
    for steps, factor in ((0, 1.0), (1999, 1.0), (2000, 0.5), (4000, 0.25)):
        algo.steps_done.fill_(steps)
        algo.set_learning_rate()
        assert [g["lr"] for g in algo.optimizer.param_groups] == pytest.approx([1e-4 * factor, 1e-3 * factor],
                                                                                rel=1e-12)


def hand_episode_loss(net, names, params, n_encoder, e: Episode, balance, t1, t2):
    encoder = {n[len("featurizer."):]: p for n, p in zip(names[:n_encoder], params[:n_encoder])}
    attention = {n[len("attention."):]: p for n, p in zip(names[n_encoder:], params[n_encoder:])}
    z = torch.func.functional_call(net, encoder, (torch.cat([e.support_x, e.query_x]),))
    support, query = z[: len(e.support_x)], z[len(e.support_x):]
    means = torch.stack([support[e.support_y == n].mean(0) for n in range(e.n_way)])
    prototypes = hand_attention(attention, means.unsqueeze(0), training=True)[0]
    ce = F.cross_entropy(sq_dist_logits(query, prototypes, t1), e.query_y)
    y = torch.cat([e.support_y, e.query_y])
    sets = torch.stack([z[y == n] for n in range(e.n_way)])
    centres = hand_attention(attention, sets, training=True).mean(1)
    reg = F.cross_entropy(sq_dist_logits(z, centres, t2), y)
    return ce + balance * reg, ce, reg


def test_two_updates_replayed_by_hand_with_dropout_two_learning_rates_and_the_halving_schedule():
    algo = make(balance=0.5, temperature=2.0, temperature2=3.0, lr_halve_every=1, lr_mul=4.0)
    net = copy.deepcopy(algo.featurizer)
    names = [n for n, _ in algo.named_parameters()]
    n_encoder = len(list(algo.featurizer.parameters()))
    assert all(n.startswith("featurizer.") for n in names[:n_encoder])
    encoder_adam = HandAdam(list(algo.featurizer.parameters()), lr=1e-4)
    attention_adam = HandAdam(list(algo.attention.parameters()), lr=4e-4)
    for step in range(2):
        batch = [episode(2 * step), episode(2 * step + 1)][: step + 1]  # meta-batches of one, then two episodes
        params = [p.detach().requires_grad_() for p in encoder_adam.params + attention_adam.params]
        torch.manual_seed(10 + step)
        parts = [hand_episode_loss(net, names, params, n_encoder, e, 0.5, 2.0, 3.0) for e in batch]
        expected = [torch.stack(t).mean() for t in zip(*parts)]
        grads = torch.autograd.grad(expected[0], params)
        encoder_adam.lr, attention_adam.lr = 1e-4 * 0.5 ** step, 4e-4 * 0.5 ** step
        encoder_adam.step(list(grads[:n_encoder]))
        attention_adam.step(list(grads[n_encoder:]))
        torch.manual_seed(10 + step)
        losses = algo.update(batch)
        for key, value in zip(("loss", "ce", "reg"), expected):
            assert torch.allclose(losses[key], value.detach(), rtol=0, atol=1e-10), key
            assert not losses[key].requires_grad
        # 1e-8: a convolution's bias before batch norm has a rounding-noise gradient that Adam normalises
        for p, q in zip(algo.parameters(), encoder_adam.params + attention_adam.params, strict=True):
            assert torch.allclose(p, q, rtol=0, atol=1e-8)
    assert int(algo.steps_done) == 2


def test_featurizer_is_initialised_from_a_fewshot_pretrain_run(tmp_path):
    hparams = resolve(declared_hparams(FewShotPretrain))
    torch.manual_seed(1)
    pretrain = FewShotPretrain(SHAPE, 4, 5, hparams)
    run = {"algorithm": "FewShotPretrain", "dataset": "RotatedDigits", "test_envs": [0], "hparams": hparams}
    (tmp_path / "args.json").write_text(json.dumps({"run": run}))
    torch.save({"algorithm": pretrain.checkpoint_state()}, tmp_path / "checkpoint.pt")
    algo = FEAT(SHAPE, 4, 1, resolve(declared_hparams(FEAT)))
    attention = copy.deepcopy(algo.attention.state_dict())
    report = init_from_run(algo, tmp_path)
    for name, tensor in pretrain.featurizer.state_dict().items():
        if tensor.is_floating_point():
            assert torch.equal(algo.featurizer.state_dict()[name], tensor), name
    assert all(torch.equal(v, algo.attention.state_dict()[k]) for k, v in attention.items())
    assert f"loaded {len([t for t in pretrain.featurizer.state_dict().values() if t.is_floating_point()])} tensors" \
        in report
