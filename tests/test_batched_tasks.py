"""The task engines (batched fold, task-parallel threads) against the per-task loop: meta-gradients, adaptation,
evaluation, and the layers the fold refuses."""

from __future__ import annotations

import pytest
import test_imaml
import torch
import torch.nn.functional as F
from dg_meta.algorithms.imaml import implicit_meta_gradient, summed_task_cross_entropy
from test_maml import episode, make, max_diff, meta_grads
from torch import nn

from dg_meta.batched_tasks import batched_forward, fold_network, resolve_engine, stack_params, task_losses
from dg_meta.errors import UsageError
from dg_meta.evaluation import episode_accuracy, mean_ci95
from dg_meta.functional import flat, functional_forward, parameters_of, unflat
from dg_meta.task_threads import TaskThreads, sum_in_order

SMALL = (1, 16, 16)
ENGINES = ["threads", "batched"]


def episodes_f64(n: int, seed: int = 2, **kw) -> list:
    g = torch.Generator().manual_seed(seed)
    return [episode(g, dtype=torch.float64, shape=SMALL, **kw) for _ in range(n)]


@pytest.fixture(autouse=True)
def two_threads(request):
    """The threads engine deals tasks to torch.get_num_threads() workers: make it 2 whatever the runner's. Not for
    the loop's and the batched engine's cases: there it would only add an intra-op thread, and beside the other
    pytest-xdist worker two such threads oversubscribe two cores (measured: 31-65 s per case instead of 1.5 s)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("engine") in ("loop", "batched"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 5])
def test_maml_meta_gradient_equals_the_loop_in_float64(engine, first_order, steps):
    episodes = episodes_f64(2)
    hp = {"shape": SMALL, "inner_steps": steps, "inner_lr": 0.1, "first_order": first_order}
    loop = meta_grads(make(engine="loop", **hp).double(), episodes)
    assert max_diff(loop, meta_grads(make(engine=engine, **hp).double(), episodes)) < 1e-10


@pytest.mark.parametrize("engine", ENGINES)
def test_maml_meta_gradient_equals_the_loop_in_float32(engine):
    g = torch.Generator().manual_seed(3)
    episodes = [episode(g, shape=SMALL, shot=2) for _ in range(4)]
    hp = {"shape": SMALL, "inner_steps": 2, "inner_lr": 0.1}
    assert max_diff(meta_grads(make(engine="loop", **hp), episodes), meta_grads(make(engine=engine, **hp), episodes)) \
        < 1e-5


def test_threads_engine_equals_the_loop_bit_for_bit_and_repeats():
    episodes = episodes_f64(5)
    loop = meta_grads(make(shape=SMALL, engine="loop").double(), episodes)
    for _ in range(2):
        threads = meta_grads(make(shape=SMALL, engine="threads").double(), episodes)
        assert all(torch.equal(loop[k], threads[k]) for k in loop)


@pytest.mark.parametrize("engine", ENGINES)
def test_unicorn_maml_meta_gradient_equals_the_loop(engine):
    """The head's shared row is repeated inside the graph: its gradient sums the rows' through every engine."""
    episodes = episodes_f64(2)
    hp = {"shape": SMALL, "first_order": False, "inner_steps": 2}
    loop = meta_grads(make("UnicornMAML", engine="loop", **hp).double(), episodes)
    assert max_diff(loop, meta_grads(make("UnicornMAML", engine=engine, **hp).double(), episodes)) < 1e-10


@pytest.mark.parametrize("engine", ENGINES)
def test_update_returns_the_mean_query_loss_of_the_loop(engine):
    episodes = episodes_f64(3)
    loop = make(shape=SMALL, engine="loop").double().update(episodes)["loss"]
    other = make(shape=SMALL, engine=engine).double().update(episodes)["loss"]
    assert torch.allclose(loop, other, rtol=0, atol=1e-12) and not other.requires_grad


@pytest.mark.parametrize("name", ["MAML", "UnicornMAML"])
@pytest.mark.parametrize("engine", ENGINES)
def test_adapt_episodes_equals_adapt_one_at_a_time(name, engine):
    algorithm = make(name, shape=SMALL, engine=engine).double().eval()
    episodes = episodes_f64(3, seed=5)
    support_x, support_y = torch.stack([e.support_x for e in episodes]), torch.stack([e.support_y for e in episodes])
    logits = algorithm.adapt_episodes(support_x, support_y)(torch.stack([e.query_x for e in episodes]))
    assert logits.shape == (3, 15, 5) and not logits.requires_grad
    for row, e in zip(logits, episodes):
        assert torch.allclose(row, algorithm.adapt(e.support_x, e.support_y)(e.query_x), rtol=0, atol=1e-10)


class ListSampler:
    def __init__(self, episodes):
        self.episodes = iter(episodes)

    def __next__(self):
        return next(self.episodes)


@pytest.mark.parametrize("engine", ["loop", *ENGINES])
def test_episode_accuracy_in_chunks_is_the_accuracy_one_episode_at_a_time(engine):
    algorithm = make(shape=SMALL, engine=engine, inner_lr=0.1)
    g = torch.Generator().manual_seed(6)
    episodes = [episode(g, shape=SMALL) for _ in range(5)]
    by_hand = []
    for e in episodes:
        predicted = algorithm.adapt(e.support_x, e.support_y)(e.query_x).argmax(1)
        by_hand.append(float((predicted == e.query_y).float().mean()))
    assert episode_accuracy(algorithm, ListSampler(episodes), 5, episodes_at_once=2) == mean_ci95(by_hand)
    assert len(set(by_hand)) > 1  # the episodes differ: order matters


def test_auto_engine_is_batched_on_cuda_and_threads_on_the_cpu():
    assert resolve_engine("auto", torch.device("cuda")) == "batched"
    assert resolve_engine("auto", torch.device("cpu")) == "threads"
    assert resolve_engine("loop", torch.device("cuda")) == "loop"


def test_folded_forward_is_each_tasks_forward_with_its_own_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, groups=1), nn.BatchNorm2d(3, track_running_stats=False),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 4),
                        nn.BatchNorm1d(4, track_running_stats=False)).double()
    params = parameters_of(net)
    stacked = {k: torch.stack([v + 0.1 * i * torch.randn_like(v) for i in range(3)]) for k, v in params.items()}
    x = torch.randn(3, 5, 2, 4, 4, dtype=torch.float64)
    out = batched_forward(fold_network(net), stacked, x)
    for i in range(3):
        own = functional_forward(net, {k: v[i] for k, v in stacked.items()}, x[i])
        assert torch.allclose(out[i], own, rtol=0, atol=1e-12)


def test_stacked_parameters_send_the_sum_of_task_gradients_to_theta():
    theta = torch.randn(3, requires_grad=True)
    stacked = stack_params({"w": theta}, 4)["w"]
    (stacked * torch.arange(4.0).unsqueeze(1)).sum().backward()
    assert torch.equal(theta.grad, torch.full((3,), 6.0))


def test_task_losses_apply_the_loss_to_each_task():
    logits, y = torch.randn(3, 4, 5), torch.randint(0, 5, (3, 4))
    expected = torch.stack([F.cross_entropy(logits[i], y[i]) for i in range(3)])
    assert torch.allclose(task_losses(F.cross_entropy, logits, y), expected)


def test_fold_refuses_layers_it_cannot_make_per_task():
    with pytest.raises(UsageError, match=r"cannot fold GroupNorm \('1'\).*choose hparam engine loop"):
        fold_network(nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4)))
    with pytest.raises(UsageError, match=r"cannot fold BatchNorm2d \('1'\): only batch norm with "
                                         r"track_running_stats=False"):
        fold_network(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(UsageError, match=r"cannot fold Embedding \('0'\)"):
        fold_network(nn.Sequential(nn.Embedding(3, 2)))
    with pytest.raises(UsageError, match="padding_mode='reflect'"):
        fold_network(nn.Conv2d(1, 2, 3, padding_mode="reflect"))
    assert parameters_of(fold_network(make().network)).keys() == parameters_of(make().network).keys()


def test_threads_engine_refuses_networks_with_buffers():
    with pytest.raises(UsageError, match="the threads engine needs a network without buffers"):
        TaskThreads(nn.BatchNorm1d(3))


def test_task_threads_return_results_in_task_order_with_grad_mode_kept():
    network = nn.Linear(2, 2)  # the threads hold it weakly: keep it alive
    threads = TaskThreads(network)
    with torch.no_grad():
        out = threads.map(lambda net, i: (i, torch.is_grad_enabled(), torch.get_num_threads()), list(range(5)))
    assert [o[0] for o in out] == list(range(5)) and not any(o[1] for o in out)
    assert {o[2] for o in out} == {1} and torch.get_num_threads() == 2
    assert sum_in_order([[torch.tensor(1.0), None], [torch.tensor(2.0), torch.tensor(3.0)]]) == \
        [torch.tensor(3.0), torch.tensor(3.0)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("steps", [1, 5])
def test_imaml_update_equals_the_loop_in_float64(engine, steps):
    """The implicit meta-gradient (inner loop, Hessian-vector products, conjugate gradient) of every task at once."""
    episodes = [test_imaml.episode(seed) for seed in (1, 2, 3)]
    loop = test_imaml.make(engine="loop", inner_steps=steps, cg_steps=3)
    other = test_imaml.make(engine=engine, inner_steps=steps, cg_steps=3)
    loss_loop, loss_other = loop.update(episodes)["loss"], other.update(episodes)["loss"]
    assert abs(float(loss_loop) - float(loss_other)) < 1e-12
    assert max_diff({k: p.grad for k, p in loop.network.named_parameters()},
                    {k: p.grad for k, p in other.network.named_parameters()}) < 1e-10
    assert max_diff({k: p.detach() for k, p in loop.network.named_parameters()},
                    {k: p.detach() for k, p in other.network.named_parameters()}) < 1e-10


@pytest.mark.parametrize("engine", ENGINES)
def test_imaml_adapt_episodes_equals_adapt_one_at_a_time(engine):
    algorithm = test_imaml.make(engine=engine, inner_steps_test=3).eval()
    episodes = [test_imaml.episode(seed) for seed in (4, 5, 6)]
    support_x, support_y = torch.stack([e.support_x for e in episodes]), torch.stack([e.support_y for e in episodes])
    logits = algorithm.adapt_episodes(support_x, support_y)(torch.stack([e.query_x for e in episodes]))
    assert logits.shape == (3, 10, 5) and not logits.requires_grad
    for row, e in zip(logits, episodes):
        assert torch.allclose(row, algorithm.adapt(e.support_x, e.support_y)(e.query_x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("engine,called", [("loop", set()), ("threads", {"threads_for"}),
                                           ("batched", {"folded_copy"}), ("vmap", {"folded_copy"})])
def test_imaml_engine_hparam_routes_update_and_adapt_episodes(engine, called, monkeypatch):
    """A spy on each path's entry point (the loop and its threaded run give identical numbers, so only this tells
    them apart)."""
    import dg_meta.algorithms.imaml as imaml_module

    calls = []
    for name in ("threads_for", "folded_copy"):
        original = getattr(imaml_module, name)
        monkeypatch.setattr(imaml_module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    algorithm = test_imaml.make(engine=engine, inner_steps=1, cg_steps=2, inner_steps_test=1)
    episodes = [test_imaml.episode(s) for s in (1, 2)]
    algorithm.update(episodes)
    assert set(calls) == called
    calls.clear()
    predict = algorithm.adapt_episodes(torch.stack([e.support_x for e in episodes]),
                                       torch.stack([e.support_y for e in episodes]))
    assert predict(torch.stack([e.query_x for e in episodes])).shape[:2] == (2, len(episodes[0].query_y))
    assert set(calls) == called


def test_batched_implicit_gradients_solve_each_tasks_system_exactly():
    """Against the explicit inverse (I + H_i/lam)^-1 g_i of each of two tasks, solved as one [2, P] system."""
    model, x, y, qx, qy = test_imaml.toy_task(0)
    _, x2, y2, qx2, qy2 = test_imaml.toy_task(1)
    lam, folded = 2.0, fold_network(model)
    theta = parameters_of(model)
    stacked = {k: torch.stack([v.detach(), v.detach() + 0.3]).requires_grad_() for k, v in theta.items()}
    sx, sy, qxs, qys = torch.stack([x, x2]), torch.stack([y, y2]), torch.stack([qx, qx2]), torch.stack([qy, qy2])
    size = sum(v.numel() for v in theta.values())
    solved = implicit_meta_gradient(lambda p, inputs: batched_forward(folded, p, inputs), stacked, sx, sy, qxs, qys,
                                    lam, size, summed_task_cross_entropy, batch_dims=1)
    for i in range(2):
        phi = {k: v[i].detach().clone().requires_grad_() for k, v in stacked.items()}
        names, leaves = list(phi), list(phi.values())

        def support_loss(vector, i=i, names=names, leaves=leaves):
            return F.cross_entropy(functional_forward(model, dict(zip(names, unflat(vector, leaves))), sx[i]), sy[i])

        hessian = torch.autograd.functional.hessian(support_loss, flat([v.detach() for v in leaves]))
        g = flat(torch.autograd.grad(F.cross_entropy(functional_forward(model, phi, qxs[i]), qys[i]), leaves))
        explicit = torch.linalg.solve(torch.eye(size, dtype=torch.float64) + hessian / lam, g)
        assert torch.allclose(solved[i], explicit, rtol=0, atol=1e-8)


def reptile(**overrides):
    import test_reptile

    return test_reptile.make(**overrides).double()


@pytest.mark.parametrize("steps,seeds", [(1, (1, 2, 3)), (5, (1, 2, 3)), (2, (1,))])  # a meta-batch of one too
def test_reptile_batched_inner_sgd_equals_the_loop_in_float64(steps, seeds):
    import test_reptile

    episodes = [test_reptile.episode(seed, query=2, dtype=torch.float64) for seed in seeds]
    results = {}
    for engine in ("loop", "batched"):
        algorithm = reptile(engine=engine, inner_optimizer="sgd", inner_steps=steps, inner_batch_size=5, lr=0.1)
        torch.manual_seed(7)
        loss = algorithm.update(episodes)["loss"]
        results[engine] = (float(loss), {k: p.detach() for k, p in algorithm.network.named_parameters()})
    assert abs(results["loop"][0] - results["batched"][0]) < 1e-12
    assert max_diff(results["loop"][1], results["batched"][1]) < 1e-10


@pytest.mark.parametrize("engine,optimizer", [("threads", "adam"), ("threads", "sgd"), ("batched", "sgd")])
def test_reptile_adapts_to_many_episodes_as_one_by_one(engine, optimizer):
    """Same minibatches (drawn in the loop's order) and the same inner optimizer state for every episode."""
    import test_reptile

    episodes = [test_reptile.episode(seed, query=2, dtype=torch.float64) for seed in (4, 5, 6)]
    algorithm = reptile(engine=engine, inner_optimizer=optimizer, inner_steps_test=3, lr=0.05)
    torch.manual_seed(1)
    algorithm.update(episodes)  # the inner optimizer now has state that adaptation must start from
    algorithm.eval()
    torch.manual_seed(2)
    together = algorithm.adapt_episodes(torch.stack([e.support_x for e in episodes]),
                                        torch.stack([e.support_y for e in episodes]))(
        torch.stack([e.query_x for e in episodes]))
    torch.manual_seed(2)
    for row, e in zip(together, episodes):
        assert torch.allclose(row, algorithm.adapt(e.support_x, e.support_y)(e.query_x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("engine,optimizer,in_update,in_adapt", [
    ("loop", "sgd", set(), set()), ("threads", "sgd", set(), {"threads_for"}),
    ("batched", "sgd", {"_train_batched"}, {"_train_batched"}), ("batched", "adam", set(), {"threads_for"})])
def test_reptile_engine_and_inner_optimizer_route_update_and_adapt_episodes(engine, optimizer, in_update, in_adapt,
                                                                            monkeypatch):
    """A spy on each path's entry point (the paths give the same numbers, so only this tells them apart): the
    batched fold takes plain SGD only (Adam's moments pass from task to task), the meta-training of the threads
    engine is the loop, and every path averages the adapted weights over processes once."""
    import dg_meta.algorithms.reptile as reptile_module

    calls = []
    for owner, name in ((reptile_module, "threads_for"), (reptile_module.Reptile, "_train_batched"),
                        (reptile_module.distributed, "mean_")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    algorithm = reptile(engine=engine, inner_optimizer=optimizer, inner_steps=2, inner_steps_test=2)
    assert algorithm.engine() == engine
    episodes = reptile_episodes()
    algorithm.update(episodes)
    assert sorted(calls) == sorted([*in_update, "mean_"])
    calls.clear()
    predict = algorithm.adapt_episodes(torch.stack([e.support_x for e in episodes]),
                                       torch.stack([e.support_y for e in episodes]))
    assert predict(torch.stack([e.query_x for e in episodes])).shape == (2, 10, 5)
    assert set(calls) == in_adapt


def reptile_episodes() -> list:
    import test_reptile

    return [test_reptile.episode(seed, query=2, dtype=torch.float64) for seed in (1, 2)]


def test_reptile_auto_engine_is_threads_on_the_cpu():
    assert reptile(engine="auto").engine() == "threads"


@pytest.mark.parametrize("name,engine", [("MAML", "batched"), ("MAML", "threads"), ("iMAML", "batched"),
                                         ("MetaSGD", "batched")])
def test_resume_from_a_checkpoint_equals_uninterrupted(name, engine):
    """Three meta-steps straight, or one, a save and load of the checkpoint state, then two: identical weights."""
    import io

    hp = {"shape": SMALL, "engine": engine, "meta_batch_size": 2}
    if name == "iMAML":
        hp.update(inner_steps=2, cg_steps=2)
    batches = [episodes_f64(2, seed=20 + i) for i in range(3)]
    straight = make(name, **hp).double()
    for b in batches:
        straight.update(b)
    first = make(name, **hp).double()
    first.update(batches[0])
    buffer = io.BytesIO()
    torch.save(first.checkpoint_state(), buffer)
    buffer.seek(0)
    resumed = make(name, **hp).double()
    resumed.load_checkpoint_state(torch.load(buffer, weights_only=True))
    for b in batches[1:]:
        resumed.update(b)
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
