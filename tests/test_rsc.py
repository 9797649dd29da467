"""RSC: the masks on hand examples, DomainBed's hparams, and two updates replayed with numpy's percentiles."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.rsc import RSC, example_keep_mask, feature_keep_mask
from search_space import bounds

from dg_meta.hparams import declared_hparams, resolve


def make(**overrides) -> RSC:
    torch.manual_seed(0)
    hparams = {**resolve(declared_hparams(RSC)), "mlp_width": 6, "mlp_depth": 2, **overrides}
    return RSC((3,), 3, 2, hparams).double()


def domain_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
            for _ in range(2)]


def test_defaults_and_random_search_are_domainbeds():
    hp = resolve(declared_hparams(RSC))
    assert hp["rsc_f_drop_factor"] == 1 / 3 and hp["rsc_b_drop_factor"] == 1 / 3
    assert bounds(RSC.HPARAMS["rsc_f_drop_factor"]) == (0.0, 0.5)
    assert bounds(RSC.HPARAMS["rsc_b_drop_factor"]) == (0.0, 0.5)


def test_feature_mask_mutes_the_top_gradients_of_each_row():
    grads = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                          [4.0, 3.0, 2.0, 1.0],
                          [0.0, 5.0, 5.0, 1.0]])
    # f = 1/4: the 0.75-quantile of [1, 2, 3, 4] is 3 + 0.25 * (4 - 3) = 3.25; of [0, 1, 5, 5] it is 5,
    # and a feature equal to the threshold is muted (strictly below is kept)
    expected = torch.tensor([[True, True, True, False],
                             [False, True, True, True],
                             [True, False, False, True]])
    assert torch.equal(feature_keep_mask(grads, 0.25), expected)
    # f = 1/2: the medians 2.5, 2.5 and 3 mute two features in each row
    assert feature_keep_mask(grads, 0.5).sum(1).tolist() == [2, 2, 2]


def test_example_mask_challenges_the_largest_confidence_drops():
    drop = torch.tensor([0.1, 0.4, 0.2, 0.3])
    # b = 1/2: the median of the drops is 0.25; examples 1 and 3 (drops 0.4 and 0.3) are challenged
    assert example_keep_mask(drop, 0.5).tolist() == [True, False, True, False]
    # b = 1/4: the 0.75-quantile is 0.3 + 0.25 * 0.1 = 0.325: only example 1
    assert example_keep_mask(drop, 0.25).tolist() == [True, False, True, True]
    # b = 1/2 on five drops: the median is the drop 0.3 itself, which is challenged (strictly below is kept)
    five = torch.tensor([0.5, 0.1, 0.3, 0.4, 0.2])
    assert example_keep_mask(five, 0.5).tolist() == [False, True, False, False, True]


def reference_loss(net: torch.nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   f: float, b: float) -> torch.Tensor:
    """DomainBed's RSC loss, written again: the gradient of the correct-class logits, numpy's percentiles."""
    names = [n for n, _ in net.named_parameters()]
    weights = dict(zip(names, params))
    featurizer, classifier = net[0], net[1]
    feat_params = {n[2:]: p for n, p in weights.items() if n.startswith("0.")}
    head_params = {n[2:]: p for n, p in weights.items() if n.startswith("1.")}
    z = torch.func.functional_call(featurizer, feat_params, (x,))
    head = lambda v: torch.func.functional_call(classifier, head_params, (v,))  # noqa: E731
    logits = head(z)
    correct = logits.gather(1, y[:, None]).sum()
    g = torch.autograd.grad(correct, z, retain_graph=True)[0].numpy()
    keep_f = torch.from_numpy(g < np.percentile(g, (1 - f) * 100, axis=1)[:, None])
    probs = F.softmax(logits, 1).gather(1, y[:, None])[:, 0]
    muted = F.softmax(head(z * keep_f), 1).gather(1, y[:, None])[:, 0]
    drop = (probs - muted).detach().numpy()
    keep_b = torch.from_numpy(drop < np.percentile(drop, (1 - b) * 100))
    mask = (keep_f | keep_b[:, None]).double()
    assert 0 < mask.sum() < mask.numel() and not mask.all(1).all(), "the example must mute something"
    return F.cross_entropy(head(z * mask), y)


@pytest.mark.parametrize("f, b", [(1 / 3, 1 / 3), (0.2, 0.45)])
def test_two_updates_equal_an_independent_reimplementation(f, b):
    algorithm = make(rsc_f_drop_factor=f, rsc_b_drop_factor=b)
    net = copy.deepcopy(algorithm.network)
    hand = HandAdam(list(net.parameters()), lr=1e-3)
    for step in range(2):
        batch = domain_batches(step)
        x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
        params = [p.detach().requires_grad_() for p in hand.params]
        expected = reference_loss(net, params, x, y, f, b)
        hand.step([g.detach() for g in torch.autograd.grad(expected, params)])
        losses = algorithm.update(batch)
        assert torch.allclose(losses["loss"], expected.detach(), rtol=0, atol=1e-12)
        for p, q in zip(algorithm.network.parameters(), hand.params):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)
