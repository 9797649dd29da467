"""MatchingNet: the full context embeddings and the episode logits against the paper's equations, by hand.

The reference below re-implements appendix A of Vinyals et al. (2016) one vector at a time with explicit
LSTM gate equations, reading the weights of the module under test: A.2 ``g(x_i, S) = h_fwd_i + h_bwd_i +
g'(x_i)``; A.1 ``h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})``, ``h_k = h^_k + f'(x)``,
``r_{k-1} = sum_i softmax_i(h_{k-1} . g(x_i)) g(x_i)``, ``f = h_K``; and Eqs. 1-2 (cosine attention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from dg_meta.algorithms.matchingnet import FullContextEmbedding
from torch import Tensor, nn

from dg_meta import registry
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.samplers import Episode

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
