"""ProtoNet: the paper's defaults, the halving learning-rate schedule, and two updates replayed by hand
(prototypes, squared distances, query cross-entropy averaged over the meta-batch, Adam)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.protonet import ProtoNet
from episode_checks import build_double, random_episode
from search_space import bounds, drawn

from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.samplers import Episode

SHAPE = (1, 16, 16)


def make(**overrides) -> ProtoNet:
    return build_double(ProtoNet, SHAPE, overrides)


def episode(seed: int, n_way: int = 2, shot: int = 2, query: int = 2) -> Episode:
    return random_episode(seed, n_way, shot, query, SHAPE)


def hand_loss(net: torch.nn.Module, params: dict[str, torch.Tensor], e: Episode) -> torch.Tensor:
    """Snell et al.'s loss written out: class means of the support embeddings, -||f(x) - c_k||^2 logits."""
    z = torch.func.functional_call(net, params, (torch.cat([e.support_x, e.query_x]),))
    support, query = z[: len(e.support_x)], z[len(e.support_x):]
    prototypes = torch.stack([support[e.support_y == k].mean(0) for k in range(e.n_way)])
    logits = -((query[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1)
    return F.cross_entropy(logits, e.query_y)


def test_defaults_are_the_papers_omniglot_ones_and_the_search_space():
    hp = resolve(declared_hparams(ProtoNet))
    assert (hp["lr"], hp["lr_halve_every"], hp["n_query"], hp["meta_batch_size"], hp["backbone"]) == \
        (1e-3, 2000, 5, 1, "conv4")
    space = declared_hparams(ProtoNet)
    assert bounds(space["lr_halve_every"]) == (1000, 4000)
    assert bounds(space["n_query"]) == (5, 15)
    assert drawn(space["backbone"]) == {"conv4"}


def test_backbone_hparam_accepts_resnet12_and_names_the_choices():
    assert resolve(declared_hparams(ProtoNet), 0, {"backbone": "resnet12"})["backbone"] == "resnet12"
    with pytest.raises(UsageError, match=r"^hparam 'backbone' = 'vgg' is invalid: it must be conv4 or resnet12$"):
        resolve(declared_hparams(ProtoNet), 0, {"backbone": "vgg"})


@pytest.mark.parametrize(("every", "steps_done", "factor"),
                         [(2000, 0, 1.0), (2000, 1999, 1.0), (2000, 2000, 0.5), (2000, 3999, 0.5),
                          (2000, 4000, 0.25), (0, 4000, 1.0)])
def test_learning_rate_is_halved_every_lr_halve_every_steps(every, steps_done, factor):
    algorithm = make(lr_halve_every=every)
    algorithm.steps_done.fill_(steps_done)
    algorithm.set_learning_rate()
    assert algorithm.optimizer.param_groups[0]["lr"] == 1e-3 * factor


def test_two_updates_are_adam_steps_on_the_meta_batch_mean_prototype_loss_with_the_halved_rate():
    algorithm = make(lr_halve_every=1)
    net = copy.deepcopy(algorithm.featurizer)
    names = [n for n, _ in net.named_parameters()]
    hand = HandAdam(list(net.parameters()), lr=1e-3)
    for step in range(2):
        batch = [episode(2 * step), episode(2 * step + 1)][: step + 1]  # meta-batches of one, then two episodes
        params = [p.detach().requires_grad_() for p in hand.params]
        expected = torch.stack([hand_loss(net, dict(zip(names, params)), e) for e in batch]).mean()
        hand.lr = 1e-3 * 0.5 ** step
        hand.step(list(torch.autograd.grad(expected, params)))
        losses = algorithm.update(batch)
        assert torch.allclose(losses["loss"], expected.detach(), rtol=0, atol=1e-10)
        assert not losses["loss"].requires_grad
        # 1e-8: a convolution's bias before batch norm has a rounding-noise gradient (~1e-15), which Adam's
        # normalisation turns into steps that differ by ~2e-10 between two implementations
        for p, q in zip(algorithm.featurizer.parameters(), hand.params):
            assert torch.allclose(p, q, rtol=0, atol=1e-8)
    assert int(algorithm.steps_done) == 2
    assert algorithm.optimizer.param_groups[0]["lr"] == 5e-4
    assert "steps_done" in algorithm.state_dict()
