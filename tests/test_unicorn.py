"""UnicornMAML: one head row duplicated into N, outer gradient summed over rows, temperature, any way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from search_space import drawn

from dg_meta import registry
from dg_meta.functional import functional_forward, parameters_of
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.samplers import Episode

SHAPE = (1, 16, 16)


def episode(seed: int, n_way: int = 5, query: int = 3, dtype: torch.dtype = torch.float32) -> Episode:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_way)
    return Episode(torch.randn(n_way, *SHAPE, generator=g, dtype=dtype), labels,
                   torch.randn(n_way * query, *SHAPE, generator=g, dtype=dtype),
                   labels.repeat_interleave(query), labels, torch.zeros(n_way, dtype=torch.long))


def make(**overrides):
    torch.manual_seed(0)
    cls = registry.get_algorithm("UnicornMAML")
    return cls(SHAPE, 10, 3, resolve(declared_hparams(cls), 0, overrides))


def test_defaults_and_search_space():
    hp = make().hparams
    assert (hp["temperature"], hp["first_order"], hp["inner_lr"], hp["inner_steps"], hp["inner_steps_test"]) == \
        (0.5, True, 0.1, 5, 10)
    space = declared_hparams(registry.get_algorithm("UnicornMAML"))
    assert drawn(space["temperature"]) == {0.25, 0.5, 1.0}
    assert drawn(space["inner_steps"]) == {5, 10, 15, 20}
    assert drawn(space["inner_steps_test"]) == {10, 20}
    assert drawn(space["inner_lr"]) == {0.05, 0.1, 0.2}


def test_inner_loop_starts_with_every_row_equal_to_w():
    algorithm = make()
    w, b = algorithm.classifier.weight, algorithm.classifier.bias
    assert w.shape == (1, algorithm.featurizer.n_outputs)
    for n_way in (2, 5, 7):
        params = algorithm.initial_params(n_way)
        assert params["1.weight"].shape == (n_way, w.shape[1])
        assert torch.equal(params["1.weight"], w.expand(n_way, -1))
        assert torch.equal(params["1.bias"], b.expand(n_way))


def rows_and_w_gradients(first_order: bool, outer_loss=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w.grad, sum of the rows' gradients, the rows' gradients) after one real ``update`` in float64."""
    algorithm = make(first_order=first_order).double()
    if outer_loss is not None:
        algorithm.outer_loss = outer_loss
    captured = []
    initial_params = algorithm.initial_params

    def spy(n_way):
        params = initial_params(n_way)
        params["1.weight"].retain_grad()
        captured.append(params)
        return params

    algorithm.initial_params = spy
    algorithm.update([episode(1, dtype=torch.float64), episode(2, dtype=torch.float64)])
    rows = torch.stack([p["1.weight"].grad for p in captured])
    return algorithm.classifier.weight.grad[0], rows.sum((0, 1)), rows


@pytest.mark.parametrize("first_order", [True, False])
def test_outer_gradient_of_w_is_the_sum_of_the_rows_gradients(first_order):
    def squared_logits(logits, y):
        return logits.pow(2).mean()

    w_grad, row_sum, rows = rows_and_w_gradients(first_order, squared_logits)
    assert row_sum.abs().max() > 1e-3
    assert torch.allclose(w_grad, row_sum, atol=1e-12)


@pytest.mark.parametrize("first_order", [True, False])
def test_with_cross_entropy_the_rows_gradients_cancel(first_order):
    """Softmax is shift-invariant and the shared row adds w.z to every logit, so the loss does not depend on w:
    the rows' gradients are non-zero but sum to zero (the head acts as a zero-initialised one)."""
    w_grad, row_sum, rows = rows_and_w_gradients(first_order)
    assert rows.abs().max() > 1e-3
    assert row_sum.abs().max() < 1e-10 and w_grad.abs().max() < 1e-10


def test_query_logits_are_divided_by_the_temperature():
    """On logits that differ across classes: at ``initial_params`` every class has the same logit, and any
    scaling of equal logits gives the same loss."""
    algorithm = make(inner_steps=1)
    e = episode(3)
    params = algorithm.initial_params(5)
    rows = torch.randn(params["1.weight"].shape, generator=torch.Generator().manual_seed(0))
    params["1.weight"] = params["1.weight"] + rows
    raw = functional_forward(algorithm.network, params, e.query_x)
    assert (raw.max(1).values - raw.min(1).values).min() > 0.1
    assert torch.allclose(algorithm.outer_loss(raw, e.query_y), F.cross_entropy(raw / 0.5, e.query_y))


def test_adapt_works_for_any_way_in_eval_mode():
    algorithm = make()
    algorithm.eval()
    e = episode(4, n_way=3)
    theta = {k: v.clone() for k, v in parameters_of(algorithm.network).items()}
    with torch.no_grad():
        logits = algorithm.adapt(e.support_x, e.support_y)(e.query_x)
    assert logits.shape == (9, 3)
    assert all(torch.equal(theta[k], v) for k, v in parameters_of(algorithm.network).items())
