"""Reptile: the update theta + eps (mean phi - theta) in closed form, the inner Adam replayed by hand across
tasks and into adapt, the eps schedule, the defaults and search space, the n_way check."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.reptile import minibatch_indices
from episode_checks import assert_other_way_refused

from dg_meta import registry
from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.samplers import Episode

SHAPE = (1, 16, 16)


def episode(seed: int, query: int = 1, way: int = 5, dtype: torch.dtype = torch.float32) -> Episode:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(way)
    return Episode(torch.randn(way, *SHAPE, generator=g, dtype=dtype), labels,
                   torch.randn(way * query, *SHAPE, generator=g, dtype=dtype), labels.repeat_interleave(query),
                   labels, torch.zeros(way, dtype=torch.long))


def make(**overrides):
    torch.manual_seed(0)
    cls = registry.get_algorithm("Reptile")
    return cls(SHAPE, 10, 3, resolve(declared_hparams(cls), 0, overrides))


def test_defaults_are_nichol_et_al_omniglot():
    """The paper's appendix table of Omniglot hyperparameters (the class docstring says so)."""
    hp = make().hparams
    assert (hp["inner_optimizer"], hp["lr"], hp["inner_steps"], hp["inner_batch_size"], hp["meta_batch_size"],
            hp["outer_lr"], hp["outer_lr_final"], hp["anneal_steps"], hp["inner_steps_test"],
            hp["inner_batch_size_test"]) == ("adam", 1e-3, 5, 10, 5, 1.0, 0.0, 100000, 50, 5)
    assert hp["k_shot"] + hp["n_query"] == 10


def test_random_search_space():
    """What hparams seeds 1..300 draw: every option of each choice, the whole declared ranges."""
    declared = declared_hparams(registry.get_algorithm("Reptile"))

    def drawn(name):
        return [resolve({name: declared[name]}, seed)[name] for seed in range(1, 301)]

    lrs = drawn("lr")
    assert 1e-4 <= min(lrs) < 10 ** -3.9 and 10 ** -2.1 < max(lrs) <= 1e-2
    assert set(drawn("n_query")) == set(range(4, 16))
    assert {name: set(drawn(name)) for name in ("meta_batch_size", "inner_optimizer", "inner_steps",
                                                "inner_batch_size", "inner_steps_test", "inner_batch_size_test",
                                                "outer_lr", "outer_lr_final", "anneal_steps")} == {
        "meta_batch_size": {1, 5, 10}, "inner_optimizer": {"adam", "sgd"}, "inner_steps": {5, 10},
        "inner_batch_size": {5, 10}, "inner_steps_test": {50}, "inner_batch_size_test": {5},
        "outer_lr": {0.5, 1.0}, "outer_lr_final": {0.0}, "anneal_steps": {100000}}


def test_unknown_inner_optimizer_is_refused():
    with pytest.raises(UsageError) as info:
        make(inner_optimizer="rmsprop")
    assert str(info.value) == "hparam 'inner_optimizer' = 'rmsprop' is invalid: it must be adam or sgd"


def test_an_episode_of_another_way_is_refused_in_update_and_adapt():
    assert_other_way_refused(make(), episode(0, way=3), "Reptile")


def test_data_parallel_declarations_refuse_only_the_inner_adam():
    """The inner Adam's moments pass from task to task (one process's order); plain SGD tasks are independent."""
    adam = make(inner_optimizer="adam")
    assert adam.data_parallel_optimizers() == {}  # no optimizer of Reptile's is averaged by the training loop
    assert adam.data_parallel_refusal() == (
        "its inner Adam carries its moments from one task to the next (as the official code does), so the tasks of "
        "a meta-batch cannot run on separate processes; set hparam inner_optimizer to sgd")
    assert make(inner_optimizer="sgd").data_parallel_refusal() is None


@pytest.mark.parametrize("engine", ["loop", "threads", "batched"])
def test_an_episode_of_another_way_is_refused_by_adapt_episodes(engine):
    e = episode(0, way=3)
    with pytest.raises(UsageError) as info:
        make(engine=engine).adapt_episodes(e.support_x.unsqueeze(0), e.support_y.unsqueeze(0))
    assert str(info.value) == ("Reptile's head has n_way=5 outputs but the episode has 3 classes: set --fs-way to "
                               "n_way or hparam n_way to 3")


def test_minibatches_cycle_through_permutations():
    torch.manual_seed(0)
    batches = minibatch_indices(6, 4, 3)
    stream = torch.cat(batches)
    assert [len(b) for b in batches] == [4, 4, 4]
    assert sorted(stream[:6].tolist()) == list(range(6)) and sorted(stream[6:].tolist()) == list(range(6))
    assert [len(b) for b in minibatch_indices(3, 10, 2)] == [3, 3]


def test_update_is_theta_plus_eps_times_mean_displacement_for_sgd():
    """Full-batch SGD, two inner steps: phi_i = 2 gradient steps from theta; theta' = theta + eps (mean phi - theta);
    the reported loss is the mean over tasks of the last minibatch loss (taken before the last step)."""
    lr, eps = 0.05, 0.7
    algorithm = make(inner_optimizer="sgd", lr=lr, inner_steps=2, inner_batch_size=100, outer_lr=eps,
                     outer_lr_final=eps)
    theta = {k: v.detach().clone() for k, v in algorithm.network.named_parameters()}
    episodes = [episode(1), episode(2)]
    phis, last_losses = [], []
    for e in episodes:
        net = copy.deepcopy(algorithm.network)
        x, y = torch.cat([e.support_x, e.query_x]), torch.cat([e.support_y, e.query_y])
        for _ in range(2):
            loss = F.cross_entropy(net(x), y)
            grads = torch.autograd.grad(loss, list(net.parameters()))
            with torch.no_grad():
                for p, g in zip(net.parameters(), grads):
                    p -= lr * g
        last_losses.append(loss.item())
        phis.append({k: v.detach() for k, v in net.named_parameters()})
    losses = algorithm.update(episodes)
    for k, p in algorithm.network.named_parameters():
        expected = theta[k] + eps * ((phis[0][k] + phis[1][k]) / 2 - theta[k])
        assert torch.allclose(p, expected, atol=1e-6), k
    assert float(losses["loss"]) == pytest.approx(sum(last_losses) / 2, abs=1e-6)
    assert int(algorithm.meta_step) == 1


def test_outer_step_size_is_annealed_linearly():
    algorithm = make(outer_lr=2.0, outer_lr_final=0.4, anneal_steps=4)
    sizes = []
    for step in range(6):
        algorithm.meta_step.fill_(step)
        sizes.append(algorithm.outer_step_size())
    assert sizes == pytest.approx([2.0, 1.6, 1.2, 0.8, 0.4, 0.4])


def test_inner_adam_state_carries_across_tasks_and_into_adapt_by_hand():
    """float64 replay with a hand-written Adam (beta1 = 0): its moments and step count run on from task to task
    (official ``Reptile.train_step`` restores only the model variables), eps_0 = 1 makes theta' the mean of the
    phi_i, and adapt continues from a copy of them on the support set; batch norm uses the batch's statistics in
    eval mode too (transductive), and adapt changes neither the model nor the inner optimizer."""
    algorithm = make(n_query=1, inner_steps_test=4).double()
    assert not [k for k in algorithm.state_dict() if "running" in k]
    names = [k for k, _ in algorithm.network.named_parameters()]
    net = copy.deepcopy(algorithm.network).train()

    def forward(params, x):
        return torch.func.functional_call(net, dict(zip(names, params)), (x,))

    def grads_at(params, x, y):
        leaves = [p.detach().requires_grad_() for p in params]
        return torch.autograd.grad(F.cross_entropy(forward(leaves, x), y), leaves)

    theta = [p.detach().clone() for p in algorithm.network.parameters()]
    adam = HandAdam(theta, lr=1e-3, betas=(0.0, 0.999))
    episodes = [episode(3, dtype=torch.float64), episode(4, dtype=torch.float64)]
    phis = []
    for e in episodes:
        adam.params = [t.clone() for t in theta]
        x, y = torch.cat([e.support_x, e.query_x]), torch.cat([e.support_y, e.query_y])
        for _ in range(5):
            adam.step(grads_at(adam.params, x, y))
        phis.append(adam.params)
    algorithm.update(episodes)
    new_theta = [(a + b) / 2 for a, b in zip(*phis)]
    for p, expected in zip(algorithm.network.parameters(), new_theta):
        assert torch.allclose(p, expected, atol=1e-10)

    state = copy.deepcopy(algorithm.state_dict())
    inner = copy.deepcopy(algorithm.inner_optimizer.state_dict())
    e = episode(5, query=2, dtype=torch.float64)
    adam.params = [t.clone() for t in new_theta]
    for _ in range(4):
        adam.step(grads_at(adam.params, e.support_x, e.support_y))
    with torch.no_grad():
        expected_logits = forward(adam.params, e.query_x)
    algorithm.eval()
    with torch.no_grad():
        logits = algorithm.adapt(e.support_x, e.support_y)(e.query_x)
    assert logits.shape == (10, 5) and torch.allclose(logits, expected_logits, atol=1e-8)
    assert all(torch.equal(state[k], v) for k, v in algorithm.state_dict().items())
    after = algorithm.inner_optimizer.state_dict()["state"]
    assert all(torch.equal(inner["state"][i][m], after[i][m]) for i in inner["state"]
               for m in ("step", "exp_avg", "exp_avg_sq"))
