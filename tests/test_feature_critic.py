"""FeatureCritic: one whole update against an independent re-implementation, the reward on meta-test data
only, the critic learns and is the documented MLP, the returned losses, the defaults and search space, split
seeding, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from dg_meta.algorithms.feature_critic import Critic
from search_space import bounds, drawn
from torch.func import functional_call, grad

from dg_meta import registry
from dg_meta.functional import functional_forward, parameters_of
from dg_meta.hparams import declared_hparams, resolve

FeatureCritic = registry.get_algorithm("FeatureCritic")


def tiny(**overrides) -> torch.nn.Module:
    hp = resolve(declared_hparams(FeatureCritic), 0, overrides)
    torch.manual_seed(0)
    return FeatureCritic((4,), 3, 3, {**hp, "mlp_width": 6, "mlp_depth": 2, "critic_hidden": 5}).double()


def tiny_batch(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 4, generator=g, dtype=torch.float64) + 3 * d, torch.randint(0, 3, (5,), generator=g))
            for d in range(3)]


def test_critic_parameters_change_after_one_step_with_default_hparams():
    alg = tiny()
    before = [p.detach().clone() for p in alg.critic.parameters()]
    losses = alg.update(tiny_batch())
    assert all(not torch.equal(b, p) for b, p in zip(before, alg.critic.parameters()))
    assert losses["critic_loss"] == -torch.tanh(losses["reward"])


def test_reward_is_computed_on_the_meta_test_domains_only():
    alg = tiny(alpha=0.1, beta=1.0)
    batch = tiny_batch()
    alg.splitter = lambda: ([0, 2], [1])
    seen = []
    original = alg.meta_test_losses

    def spy(theta_old, theta_new, x, y):
        seen.append((x, y))
        return original(theta_old, theta_new, x, y)

    alg.meta_test_losses = spy
    reference = tiny(alpha=0.1, beta=1.0)
    net, clf, critic = reference.featurizer, reference.classifier, reference.critic
    theta = {k: v.detach() for k, v in parameters_of(net).items()}
    x_tr, y_tr = torch.cat([batch[0][0], batch[2][0]]), torch.cat([batch[0][1], batch[2][1]])

    def ce(p, x, y):
        return F.cross_entropy(clf(functional_forward(net, p, x)), y)

    g_ce = torch.func.grad(lambda p: ce(p, x_tr, y_tr))(theta)
    g_all = torch.func.grad(lambda p: ce(p, x_tr, y_tr) + critic(functional_forward(net, p, x_tr)))(theta)
    old = {k: theta[k] - 0.1 * g_ce[k] for k in theta}
    new = {k: theta[k] - 0.1 * g_all[k] for k in theta}
    with torch.no_grad():
        expected = ce(old, *batch[1]) - ce(new, *batch[1])

    losses = alg.update(batch)
    assert len(seen) == 1 and torch.equal(seen[0][0], batch[1][0])
    assert torch.equal(seen[0][1], batch[1][1])
    assert abs(float(losses["reward"]) - float(expected)) < 1e-10
    assert abs(float(expected)) > 1e-6


def test_checkpoint_carries_the_split_generator_and_the_critic_optimizer():
    alg = tiny()
    alg.update(tiny_batch())
    state = alg.checkpoint_state()
    assert {"optimizer", "critic_optimizer"} <= set(state["optimizers"])
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = tiny()
    resumed.load_checkpoint_state(torch.load(buffer, weights_only=True))
    assert [resumed.splitter() for _ in range(4)] == [alg.splitter() for _ in range(4)]


def reference_update(alg, batch, meta_train: list[int], meta_test: list[int]) -> dict[str, dict[str, torch.Tensor]]:
    """The gradients of one Feature-Critic step, written from the method's equations with ``torch.func``:
    ``g_theta = grad_theta (L_CE + beta h_w)`` and ``g_phi = grad_phi L_CE`` on the meta-train domains, and
    ``g_w = grad_w -tanh(L'(theta - alpha grad L_CE) - L'(theta - alpha grad_theta (L_CE + beta h_w)))`` with
    ``L'`` the cross-entropy on the meta-test domains (differentiated through the inner gradient in ``w``)."""
    alpha, beta = alg.hparams["alpha"], alg.hparams["beta"]
    net, clf, critic = alg.featurizer, alg.classifier, alg.critic
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}
    phi = {k: v.detach().clone() for k, v in clf.named_parameters()}
    w = {k: v.detach().clone() for k, v in critic.named_parameters()}
    x_tr = torch.cat([batch[d][0] for d in meta_train])
    y_tr = torch.cat([batch[d][1] for d in meta_train])
    x_te = torch.cat([batch[d][0] for d in meta_test])
    y_te = torch.cat([batch[d][1] for d in meta_test])

    def ce(t, p, x, y):
        return F.cross_entropy(functional_call(clf, p, (functional_call(net, t, (x,)),)), y)

    def aux(t, c):
        return beta * functional_call(critic, c, (functional_call(net, t, (x_tr,)),))

    def meta_objective(c):
        g_old = grad(ce)(theta, phi, x_tr, y_tr)
        g_new = grad(lambda t: ce(t, phi, x_tr, y_tr) + aux(t, c))(theta)
        old = {k: theta[k] - alpha * g_old[k] for k in theta}
        new = {k: theta[k] - alpha * g_new[k] for k in theta}
        return -torch.tanh(ce(old, phi, x_te, y_te) - ce(new, phi, x_te, y_te))

    return {"featurizer": grad(lambda t: ce(t, phi, x_tr, y_tr) + aux(t, w))(theta),
            "classifier": grad(lambda p: ce(theta, p, x_tr, y_tr))(phi),
            "critic": grad(meta_objective)(w)}


def params_before(alg) -> dict[str, dict[str, torch.Tensor]]:
    return {m: {k: v.detach().clone() for k, v in getattr(alg, m).named_parameters()}
            for m in ("featurizer", "classifier", "critic")}


def test_one_update_with_sgd_moves_every_parameter_by_the_reference_gradient():
    """Plain SGD in place of the optimisers makes each new parameter ``p - lr * g`` with the exact gradient
    (Adam's first step, ``~lr * sign(g)``, would hide the size of each gradient term)."""
    alg = tiny(alpha=0.5, beta=1.0)
    alg.splitter = lambda: ([0, 2], [1])
    batch = tiny_batch()
    lr, critic_lr = 0.3, 7.0
    alg.optimizer = torch.optim.SGD(alg.network.parameters(), lr=lr)
    alg.critic_optimizer = torch.optim.SGD(alg.critic.parameters(), lr=critic_lr)
    before = params_before(alg)
    grads = reference_update(alg, batch, [0, 2], [1])
    alg.update(batch)
    for module, step in (("featurizer", lr), ("classifier", lr), ("critic", critic_lr)):
        for name, p in getattr(alg, module).named_parameters():
            expected = before[module][name] - step * grads[module][name]
            assert torch.allclose(p, expected, rtol=0, atol=1e-12), f"{module}.{name}"
    assert all(g.abs().max() > 1e-4 for g in grads["critic"].values())
    without_critic = reference_update(tiny(alpha=0.5, beta=1e-12), batch, [0, 2], [1])["featurizer"]
    assert max(float((grads["featurizer"][k] - without_critic[k]).abs().max()) for k in without_critic) > 1e-3


def test_one_update_with_the_default_adam_optimisers_matches_adam_on_the_reference_gradients():
    alg = tiny(alpha=0.5, beta=1.0)
    alg.splitter = lambda: ([1], [0, 2])
    batch = tiny_batch(seed=3)
    before = params_before(alg)
    grads = reference_update(alg, batch, [1], [0, 2])
    alg.update(batch)
    for module, lr in (("featurizer", alg.hparams["lr"]), ("classifier", alg.hparams["lr"]),
                       ("critic", alg.hparams["critic_lr"])):
        leaves = {k: v.clone().requires_grad_() for k, v in before[module].items()}
        adam = torch.optim.Adam(leaves.values(), lr=lr, weight_decay=alg.hparams["weight_decay"])
        for k, v in leaves.items():
            v.grad = grads[module][k]
        adam.step()
        for name, p in getattr(alg, module).named_parameters():
            assert torch.allclose(p, leaves[name], rtol=0, atol=1e-12), f"{module}.{name}"


def test_defaults_are_the_official_pacs_settings():
    """alpha = lr 5e-4 (``reinit_network_P``), beta 0.01 and critic lr 1e-3 (``--beta``, ``--omega`` of
    ``main_Feature_Critic.py``, PACS), critic width 512 (``self.hh``), one meta-test domain."""
    hp = resolve(declared_hparams(FeatureCritic))
    assert (hp["alpha"], hp["beta"], hp["critic_lr"], hp["critic_hidden"], hp["n_meta_test"]) == (
        5e-4, 0.01, 1e-3, 512, 1)
    alg = tiny()
    assert isinstance(alg.critic_optimizer, torch.optim.Adam)
    assert alg.critic_optimizer.defaults["lr"] == 1e-3


def test_random_search_space():
    """alpha ~ 10^U(-4, -2), beta ~ 10^U(-3, 0), critic lr ~ 10^U(-4, -2), width in {128, 256, 512}."""
    hp = FeatureCritic.HPARAMS
    assert bounds(hp["alpha"]) == (pytest.approx(1e-4), pytest.approx(1e-2))
    assert bounds(hp["beta"]) == (pytest.approx(1e-3), pytest.approx(1.0))
    assert bounds(hp["critic_lr"]) == (pytest.approx(1e-4), pytest.approx(1e-2))
    assert drawn(hp["critic_hidden"]) == {128, 256, 512}
    assert drawn(hp["n_meta_test"]) == {1}


def test_critic_is_the_mean_softplus_of_a_one_output_mlp():
    """``h_w(Z) = mean_i softplus(w_2 relu(W_1 z_i + b_1) + b_2)`` (``Critic_Network_MLP``), by hand."""
    torch.manual_seed(0)
    critic = Critic(4, 5).double()
    assert [tuple(p.shape) for p in critic.parameters()] == [(5, 4), (5,), (1, 5), (1,)]
    w1, b1, w2, b2 = (p.detach() for p in critic.parameters())
    z = torch.randn(6, 4, dtype=torch.float64)
    expected = sum(math.log1p(math.exp(float(w2[0] @ torch.relu(w1 @ z_i + b1) + b2[0]))) for z_i in z) / 6
    assert float(critic(z).detach()) == pytest.approx(expected, abs=1e-12)


def test_split_generator_is_seeded_by_a_62_bit_draw_of_the_global_rng():
    """The same global seed gives the same split sequence, another seed an unrelated one (62-bit seeds)."""
    def seed_after(global_seed: int) -> int:
        torch.manual_seed(global_seed)
        hp = {**resolve(declared_hparams(FeatureCritic)), "mlp_width": 6, "mlp_depth": 2, "critic_hidden": 5}
        return FeatureCritic((4,), 3, 3, hp).splitter.generator.initial_seed()

    seeds = [seed_after(s) for s in (0, 0, 1, 2)]
    assert seeds[0] == seeds[1] and len(set(seeds[1:])) == 3
    assert all(2**40 < s < 2**62 for s in seeds)


def test_returned_losses_are_the_meta_train_terms_by_hand():
    alg = tiny(alpha=0.5, beta=0.3)
    alg.splitter = lambda: ([0, 2], [1])
    batch = tiny_batch()
    x_tr, y_tr = torch.cat([batch[0][0], batch[2][0]]), torch.cat([batch[0][1], batch[2][1]])
    with torch.no_grad():
        features = alg.featurizer(x_tr)
        ce = float(F.cross_entropy(alg.classifier(features), y_tr))
        w1, b1, w2, b2 = alg.critic.parameters()
        h = float(F.softplus(torch.relu(features @ w1.T + b1) @ w2.T + b2).mean())
    losses = alg.update(batch)
    assert float(losses["ce_loss"]) == pytest.approx(ce, abs=1e-12)
    assert float(losses["critic_aux_loss"]) == pytest.approx(0.3 * h, abs=1e-12)
    assert float(losses["loss"]) == pytest.approx(ce + 0.3 * h, abs=1e-12)
    assert float(losses["critic_loss"]) == pytest.approx(-math.tanh(float(losses["reward"])), abs=1e-12)


def test_training_continues_identically_after_resume():
    """Weights, both Adam states and the split generator come back: two more steps equal the straight run."""
    batches = [tiny_batch(seed) for seed in range(4)]
    straight = tiny(alpha=0.5, beta=1.0)
    for b in batches:
        straight.update(b)
    first = tiny(alpha=0.5, beta=1.0)
    for b in batches[:2]:
        first.update(b)
    buffer = io.BytesIO()
    torch.save(first.checkpoint_state(), buffer)
    buffer.seek(0)
    resumed = tiny(alpha=0.5, beta=1.0)
    resumed.load_checkpoint_state(torch.load(buffer, weights_only=True))
    for b in batches[2:]:
        resumed.update(b)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
