"""MatchingNet: the full context embeddings and the episode logits against the paper's equations, by hand;
the update against an independent re-implementation; the documented hparams.

The reference below re-implements appendix A of Vinyals et al. (2016) one vector at a time with explicit
LSTM gate equations, reading the weights of the module under test: A.2 ``g(x_i, S) = h_fwd_i + h_bwd_i +
g'(x_i)``; A.1 ``h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})``, ``h_k = h^_k + f'(x)``,
``r_{k-1} = sum_i softmax_i(h_{k-1} . g(x_i)) g(x_i)``, ``f = h_K``; and Eqs. 1-2 (cosine attention).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from dg_meta.algorithms import matchingnet as matchingnet_module
from dg_meta.algorithms.matchingnet import FullContextEmbedding
from search_space import bounds, drawn
from torch import Tensor, nn

from dg_meta import registry
from dg_meta.dataset import TensorDomain
from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.samplers import Cell, Episode, EpisodeSampler
from dg_meta.splits import class_cells

WIDTH, STEPS = 3, 3
SUPPORT_Y = torch.tensor([0, 0, 1, 1])


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def lstm_step(w_x: Tensor, w_h: Tensor, bias: Tensor, x: list[float], h: list[float],
              c: list[float]) -> tuple[list[float], list[float]]:
    """One LSTM step in plain Python: gate rows in the order input, forget, cell, output."""
    d = len(c)
    pre = [sum(w_x[r, j].item() * x[j] for j in range(len(x))) + sum(w_h[r, j].item() * h[j] for j in range(len(h)))
           + bias[r].item() for r in range(4 * d)]
    c_new = [sigmoid(pre[d + j]) * c[j] + sigmoid(pre[j]) * math.tanh(pre[2 * d + j]) for j in range(d)]
    return [sigmoid(pre[3 * d + j]) * math.tanh(c_new[j]) for j in range(d)], c_new


def support_by_hand(fce: FullContextEmbedding, z: list[list[float]]) -> list[list[float]]:
    """A.2 with zero initial states: forward LSTM over i = 1..n, backward over i = n..1."""
    lstm, d = fce.support_lstm, len(z[0])

    def run(order: list[int], suffix: str) -> dict[int, list[float]]:
        w_x, w_h = getattr(lstm, "weight_ih_l0" + suffix), getattr(lstm, "weight_hh_l0" + suffix)
        bias = getattr(lstm, "bias_ih_l0" + suffix) + getattr(lstm, "bias_hh_l0" + suffix)
        h, c, out = [0.0] * d, [0.0] * d, {}
        for i in order:
            h, c = lstm_step(w_x, w_h, bias, z[i], h, c)
            out[i] = h
        return out

    fwd, bwd = run(list(range(len(z))), ""), run(list(reversed(range(len(z)))), "_reverse")
    return [[fwd[i][j] + bwd[i][j] + z[i][j] for j in range(d)] for i in range(len(z))]


def query_by_hand(fce: FullContextEmbedding, x: list[float], g: list[list[float]]) -> list[float]:
    """A.1 for one query, starting from h^_0 = 0, c_0 = 0 (so h_0 = f'(x))."""
    cell, d = fce.query_cell, len(x)
    h, c = list(x), [0.0] * d
    for _ in range(fce.steps):
        scores = [sum(h[j] * gi[j] for j in range(d)) for gi in g]
        weights = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
        readout = [sum(w * gi[j] for w, gi in zip(weights, g)) for j in range(d)]
        h_hat, c = lstm_step(cell.input_map.weight, cell.recurrent_map.weight, cell.input_map.bias, x,
                             h + readout, c)
        h = [h_hat[j] + x[j] for j in range(d)]
    return h


def matching_logits_by_hand(f: list[float], g: list[list[float]], labels: list[int], n_way: int) -> list[float]:
    """Eqs. 1-2: log of the summed softmax-of-cosine attention over each class's support examples."""
    def cos(a: list[float], b: list[float]) -> float:
        return sum(u * v for u, v in zip(a, b)) / math.sqrt(sum(u * u for u in a) * sum(v * v for v in b))

    e = [math.exp(cos(f, gi)) for gi in g]
    return [math.log(sum(ei for ei, y in zip(e, labels) if y == k) / sum(e)) for k in range(n_way)]


def toy() -> tuple[FullContextEmbedding, Tensor, Tensor]:
    torch.manual_seed(0)
    fce = FullContextEmbedding(WIDTH, STEPS).double()
    with torch.no_grad():
        for p in fce.parameters():
            p.uniform_(-1.0, 1.0)
    g = torch.Generator().manual_seed(1)
    return fce, torch.randn(4, WIDTH, generator=g, dtype=torch.float64), \
        torch.randn(3, WIDTH, generator=g, dtype=torch.float64)


def test_fce_support_embedding_matches_the_bidirectional_lstm_equations():
    fce, support, _ = toy()
    expected = torch.tensor(support_by_hand(fce, support.tolist()), dtype=torch.float64)
    assert torch.allclose(fce.support(support), expected, atol=1e-12)
    assert not torch.allclose(expected, support, atol=1e-2)


def test_fce_query_embedding_matches_the_attention_lstm_equations():
    fce, support, query = toy()
    g = fce.support(support)
    expected = torch.tensor([query_by_hand(fce, x, g.tolist()) for x in query.tolist()], dtype=torch.float64)
    assert torch.allclose(fce.query(query, g), expected, atol=1e-12)
    fewer = FullContextEmbedding(WIDTH, STEPS - 1).double()
    fewer.load_state_dict(fce.state_dict())
    assert not torch.allclose(fewer.query(query, g), expected, atol=1e-3)


def build(**overrides) -> nn.Module:
    cls = registry.get_algorithm("MatchingNet")
    return cls((1, 16, 16), 4, 1, resolve(declared_hparams(cls), 0, overrides))


def test_episode_logits_and_loss_with_fce_are_the_cosine_attention_over_the_context_embeddings():
    algo = build(fce=True, fce_steps=STEPS, n_way=2, k_shot=2, n_query=2).double()
    fce, support, query = toy()
    algo.featurizer, algo.fce = nn.Flatten(), fce
    g = support_by_hand(fce, support.tolist())
    expected = torch.tensor([matching_logits_by_hand(query_by_hand(fce, x, g), g, SUPPORT_Y.tolist(), 2)
                             for x in query.tolist()], dtype=torch.float64)
    logits = algo.adapt(support, SUPPORT_Y)(query)
    assert torch.allclose(logits, expected, atol=1e-12)

    query_y = torch.tensor([1, 0, 1])
    batch = [Episode(support, SUPPORT_Y, query, query_y, torch.tensor([0, 1]), torch.tensor([0, 0]))]
    algo.optimizer = torch.optim.SGD(algo.parameters(), lr=0.0)
    loss = algo.update(batch)["loss"]
    assert abs(float(loss) - float(F.nll_loss(expected, query_y))) < 1e-12


def test_logits_match_hand_computed_values_on_2way_2shot():
    algo = build()
    algo.featurizer = nn.Flatten()
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    logits = algo.adapt(support, SUPPORT_Y)(torch.tensor([[2.0, 0.0], [0.6, 0.8]]))
    e = math.exp
    # cosines to the four support vectors: (1, 0, -1, 0) and (0.6, 0.8, -0.6, -0.8)
    z1 = e(1) + 2 + e(-1)
    z2 = e(0.6) + e(0.8) + e(-0.6) + e(-0.8)
    expected = torch.tensor([[math.log((e(1) + 1) / z1), math.log((1 + e(-1)) / z1)],
                             [math.log((e(0.6) + e(0.8)) / z2), math.log((e(-0.6) + e(-0.8)) / z2)]])
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.allclose(logits.exp().sum(1), torch.ones(2))


def toy_cells(n_classes: int = 4, per_class: int = 8, seed: int = 0) -> list[Cell]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = torch.rand(len(labels), 1, 16, 16, generator=g) + labels.view(-1, 1, 1, 1) * 0.5
    domain = TensorDomain("toy", x, labels)
    return [Cell(domain, 0, c, idx) for c, idx in class_cells(domain.labels, torch.arange(len(labels))).items()]


@pytest.mark.parametrize("fce", [False, True])
def test_update_trains_every_parameter(fce):
    torch.manual_seed(0)
    algo = build(fce=fce, n_way=2, k_shot=2, n_query=2, fce_steps=2)
    sampler = EpisodeSampler(toy_cells(), 2, 2, 2, seed=0)
    before = [p.detach().clone() for p in algo.parameters()]
    losses = algo.update([next(sampler)])
    assert torch.isfinite(losses["loss"])
    assert all(not torch.equal(a, b) for a, b in zip(before, algo.parameters()))
    assert (algo.fce is not None) == fce


def reference_log_probs(featurizer: nn.Module, episode: Episode) -> Tensor:
    """Eqs. 1-2 as written, ``log sum_i softmax_i(cos(f(x), g(x_i))) y_i``, support and query embedded in one
    batch (one batch-norm batch)."""
    n = len(episode.support_x)
    z = featurizer(torch.cat([episode.support_x, episode.query_x]))
    support, query = z[:n], z[n:]
    cosine = query @ support.t() / (query.norm(dim=1, keepdim=True) * support.norm(dim=1))
    return (torch.softmax(cosine, 1) @ F.one_hot(episode.support_y, episode.n_way).to(cosine.dtype)).log()


def test_two_updates_equal_an_independent_reimplementation(monkeypatch):
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3)).double()
    reference = copy.deepcopy(tiny)
    monkeypatch.setattr(matchingnet_module, "fewshot_backbone", lambda name, shape: tiny)
    algo = build(n_way=2, k_shot=2, n_query=1)
    g = torch.Generator().manual_seed(3)

    def episode() -> Episode:
        return Episode(torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64), SUPPORT_Y,
                       torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64), torch.tensor([1, 0]),
                       torch.tensor([0, 1]), torch.tensor([0, 0]))

    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3)  # documented: Adam, lr 1e-3, no weight decay
    for batch in ([episode(), episode()], [episode()]):  # a step averages the losses of its episodes
        loss = algo.update(batch)["loss"]
        expected = torch.stack([F.nll_loss(reference_log_probs(reference, e), e.query_y) for e in batch]).mean()
        optimizer.zero_grad()
        expected.backward()
        optimizer.step()
        assert abs(float(loss) - float(expected.detach())) < 1e-12
    for name, value in reference.state_dict().items():
        assert torch.allclose(tiny.state_dict()[name], value, atol=1e-10, rtol=0), name


def test_defaults_and_search_space_are_the_documented_ones():
    declared = declared_hparams(registry.get_algorithm("MatchingNet"))
    names = ("lr", "fce", "fce_steps", "meta_batch_size", "backbone")
    # the class docstring: Adam lr 1e-3, one episode per step, K = 5 read steps, FCE off (Table 1 is without it)
    assert {k: resolve(declared, 0)[k] for k in names} == {"lr": 1e-3, "fce": False, "fce_steps": 5,
                                                          "meta_batch_size": 1, "backbone": "conv4"}
    assert drawn(declared["fce"]) == {False, True}
    assert bounds(declared["fce_steps"]) == (1, 10)
    assert drawn(declared["lr"]) == {1e-3} and drawn(declared["meta_batch_size"]) == {1}
    assert drawn(declared["backbone"]) == {"conv4"}
    assert resolve(declared, 0, {"backbone": "resnet12"})["backbone"] == "resnet12"
    with pytest.raises(UsageError, match=r"^hparam 'backbone' = 'vgg' is invalid: it must be conv4 or resnet12$"):
        resolve(declared, 0, {"backbone": "vgg"})
