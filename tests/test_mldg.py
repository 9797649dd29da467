"""MLDG: the exact meta-gradient (against ``higher`` and finite differences), the first-order gap, two SGD
steps against a ``torch.func`` re-implementation, the defaults and search space, split seeding, resume."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from search_space import bounds, drawn

from dg_meta import registry
from dg_meta.errors import UsageError
from dg_meta.functional import functional_forward, parameters_of
from dg_meta.hparams import declared_hparams, resolve

MLDG = registry.get_algorithm("MLDG")
SPLIT = ([0, 2], [1])


def tiny(second_order: bool = True, **overrides) -> torch.nn.Module:
    hp = resolve(declared_hparams(MLDG), 0, {"second_order": second_order, "alpha": 0.3, "beta": 0.7, **overrides})
    torch.manual_seed(0)
    return MLDG((4,), 3, 3, {**hp, "mlp_width": 6, "mlp_depth": 2}).double()


def tiny_batch(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g))
            for _ in range(3)]


def meta_gradient(alg, batch) -> list[torch.Tensor]:
    alg.optimizer.zero_grad(set_to_none=True)
    alg.accumulate_meta_gradient(batch, *SPLIT)
    return [p.grad.clone() for p in alg.network.parameters()]


def objective_value(alg, batch) -> float:
    loss_train, loss_test = alg.accumulate_meta_gradient(batch, *SPLIT)
    return float(loss_train + 0.7 * loss_test)


def pooled(batch, domains):
    return torch.cat([batch[d][0] for d in domains]), torch.cat([batch[d][1] for d in domains])


def test_second_order_meta_gradient_matches_higher():
    higher = pytest.importorskip("higher")
    alg, batch = tiny(), tiny_batch()
    ours = meta_gradient(alg, batch)
    (x_tr, y_tr), (x_te, y_te) = pooled(batch, SPLIT[0]), pooled(batch, SPLIT[1])
    net = alg.network
    inner = torch.optim.SGD(net.parameters(), lr=0.3)
    with higher.innerloop_ctx(net, inner, copy_initial_weights=False) as (fnet, diffopt):
        loss_train = F.cross_entropy(fnet(x_tr), y_tr)
        diffopt.step(loss_train)
        objective = loss_train + 0.7 * F.cross_entropy(fnet(x_te), y_te)
        reference = torch.autograd.grad(objective, list(net.parameters()))
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)
    assert max(float(g.abs().max()) for g in ours) > 1e-3


def test_second_order_meta_gradient_matches_finite_differences():
    alg, batch = tiny(), tiny_batch()
    ours = meta_gradient(alg, batch)
    params = list(alg.network.parameters())
    direction = [torch.randn_like(p) for p in params]
    eps = 1e-6

    def objective_at(sign: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
        value = objective_value(alg, batch)
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
        return value

    numeric = (objective_at(1.0) - objective_at(-1.0)) / (2 * eps)
    analytic = float(sum((g * d).sum() for g, d in zip(ours, direction)))
    assert abs(numeric - analytic) < 1e-4 * max(1.0, abs(analytic))


def test_first_order_differs_by_exactly_the_second_order_term():
    batch = tiny_batch()
    exact = meta_gradient(tiny(second_order=True), batch)
    first = meta_gradient(tiny(second_order=False), batch)
    alg = tiny()
    net = alg.network
    params = {k: v.detach() for k, v in parameters_of(net).items()}
    (x_tr, y_tr), (x_te, y_te) = pooled(batch, SPLIT[0]), pooled(batch, SPLIT[1])

    def loss_train(p):
        return F.cross_entropy(functional_forward(net, p, x_tr), y_tr)

    grad_train = torch.func.grad(loss_train)(params)
    adapted = {k: params[k] - 0.3 * grad_train[k] for k in params}
    grad_test = torch.func.grad(lambda p: F.cross_entropy(functional_forward(net, p, x_te), y_te))(adapted)
    _, hvp = torch.func.jvp(torch.func.grad(loss_train), (params,), (grad_test,))  # forward-over-reverse H_F v
    for (name, _), e, f in zip(params.items(), exact, first):
        assert torch.allclose(f - e, 0.3 * 0.7 * hvp[name], atol=1e-12, rtol=0)
    assert max(float(h.abs().max()) for h in hvp.values()) > 1e-4


def test_splits_are_checkpointed():
    batches = [tiny_batch(seed) for seed in range(4)]
    alg = tiny()
    for b in batches[:2]:
        alg.update(b)
    buffer = io.BytesIO()
    torch.save(alg.checkpoint_state(), buffer)
    splits_after = [alg.splitter() for _ in range(3)]
    buffer.seek(0)
    resumed = tiny()
    resumed.load_checkpoint_state(torch.load(buffer, weights_only=True))
    assert [resumed.splitter() for _ in range(3)] == splits_after
    for a, b in zip(alg.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    for train_doms, test_doms in splits_after:
        assert len(test_doms) == 1 and sorted(train_doms + test_doms) == [0, 1, 2]


def test_training_continues_identically_after_resume():
    batches = [tiny_batch(seed) for seed in range(4)]
    straight = tiny()
    for b in batches:
        straight.update(b)
    first = tiny()
    for b in batches[:2]:
        first.update(b)
    buffer = io.BytesIO()
    torch.save(first.checkpoint_state(), buffer)
    buffer.seek(0)
    resumed = tiny()
    resumed.load_checkpoint_state(torch.load(buffer, weights_only=True))
    for b in batches[2:]:
        resumed.update(b)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_too_many_meta_test_domains_is_a_usage_error():
    with pytest.raises(UsageError, match="needs 1 <= n_meta_test < 3 training domains, got n_meta_test=3"):
        tiny(n_meta_test=3)


@pytest.mark.parametrize("algorithm", ["MLDG", "FeatureCritic"])
def test_trainer_resume_equals_uninterrupted(tmp_path, algorithm):
    from dg_meta.train import Trainer, parse_args, resolve_run

    run = resolve_run(parse_args(["--algorithm", algorithm, "--steps", "4", "--hparams", '{"batch_size": 4}']))

    def steps(trainer, n):
        for _ in range(n):
            trainer.algorithm.update(trainer.next_batch())

    straight = Trainer(run, "data", tmp_path, "cpu")
    steps(straight, 4)
    first = Trainer(run, "data", tmp_path, "cpu")
    steps(first, 2)
    buffer = io.BytesIO()
    torch.save(first.state(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)  # a fresh process would start from another global RNG state
    resumed = Trainer(run, "data", tmp_path, "cpu")
    resumed.load(torch.load(buffer, weights_only=True))
    steps(resumed, 2)
    for a, b in zip(straight.algorithm.state_dict().values(), resumed.algorithm.state_dict().values()):
        assert torch.equal(a, b)


def test_defaults_are_the_documented_ones():
    """alpha 0.01 (ours), beta 1 (``run_mldg.sh``: ``--meta_val_beta=1.0``), exact meta-gradient, one
    meta-test domain; the outer optimiser is Adam at ``lr``."""
    hp = resolve(declared_hparams(MLDG))
    assert (hp["alpha"], hp["beta"], hp["second_order"], hp["n_meta_test"]) == (0.01, 1.0, True, 1)
    alg = tiny()
    assert isinstance(alg.optimizer, torch.optim.Adam) and alg.optimizer.defaults["lr"] == alg.hparams["lr"]


def test_random_search_space():
    """alpha ~ 10^U(-3, -1), beta ~ 10^U(-1, 1), both meta-gradients, n_meta_test fixed at its default."""
    hp = MLDG.HPARAMS
    assert bounds(hp["alpha"]) == (pytest.approx(1e-3), pytest.approx(1e-1))
    assert bounds(hp["beta"]) == (pytest.approx(0.1), pytest.approx(10.0))
    assert drawn(hp["second_order"]) == {True, False}
    assert drawn(hp["n_meta_test"]) == {1}


def built_after_global_seed(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MLDG((4,), 3, 3, {**resolve(declared_hparams(MLDG)), "mlp_width": 6, "mlp_depth": 2})


def test_split_generator_is_seeded_by_a_62_bit_draw_of_the_global_rng():
    """The same global seed gives the same split sequence, another seed an unrelated one (62-bit seeds)."""
    seeds = [built_after_global_seed(s).splitter.generator.initial_seed() for s in (0, 0, 1, 2)]
    assert seeds[0] == seeds[1] and len(set(seeds[1:])) == 3
    assert all(2**40 < s < 2**62 for s in seeds)


def reference_step(alg, batch, second_order: bool) -> tuple[dict[str, torch.Tensor], float, float]:
    """``(meta-gradient, F(theta), G(theta'))`` written from the paper's equations with ``torch.func``: the
    gradient of ``F(theta) + beta G(theta - alpha grad F(theta))`` (exact), or ``grad F(theta) + beta grad
    G(theta')`` at the detached ``theta'`` (first order), on the meta-train domains 0, 2 and meta-test 1."""
    alpha, beta = alg.hparams["alpha"], alg.hparams["beta"]
    net = alg.network
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}
    (x_tr, y_tr), (x_te, y_te) = pooled(batch, SPLIT[0]), pooled(batch, SPLIT[1])

    def loss_f(p):
        return F.cross_entropy(torch.func.functional_call(net, p, (x_tr,)), y_tr)

    def loss_g(p):
        return F.cross_entropy(torch.func.functional_call(net, p, (x_te,)), y_te)

    def virtual_step(p):
        g = torch.func.grad(loss_f)(p)
        return {k: p[k] - alpha * g[k] for k in p}

    adapted = virtual_step(theta)
    if second_order:
        meta_grad = torch.func.grad(lambda p: loss_f(p) + beta * loss_g(virtual_step(p)))(theta)
    else:
        g_f, g_g = torch.func.grad(loss_f)(theta), torch.func.grad(loss_g)(adapted)
        meta_grad = {k: g_f[k] + beta * g_g[k] for k in theta}
    return meta_grad, float(loss_f(theta)), float(loss_g(adapted))


@pytest.mark.parametrize("second_order", [True, False])
def test_two_updates_with_sgd_move_the_weights_by_the_reference_meta_gradient(second_order):
    """Plain SGD in place of Adam makes each new weight ``p - lr * g``: the exact size of each step's
    meta-gradient shows, and the second step sees only its own gradient (zeroed in between)."""
    alg = tiny(second_order)
    alg.splitter = lambda: SPLIT
    alg.optimizer = torch.optim.SGD(alg.network.parameters(), lr=0.2)
    for seed in (1, 2):
        batch = tiny_batch(seed)
        before = {k: v.detach().clone() for k, v in alg.network.named_parameters()}
        meta_grad, loss_f, loss_g = reference_step(alg, batch, second_order)
        losses = alg.update(batch)
        for name, p in alg.network.named_parameters():
            assert torch.allclose(p, before[name] - 0.2 * meta_grad[name], atol=1e-12, rtol=0), name
        assert float(losses["meta_train_loss"]) == pytest.approx(loss_f, abs=1e-12)
        assert float(losses["meta_test_loss"]) == pytest.approx(loss_g, abs=1e-12)
        assert float(losses["loss"]) == pytest.approx(loss_f + 0.7 * loss_g, abs=1e-12)
        assert max(float(g.abs().max()) for g in meta_grad.values()) > 1e-3
