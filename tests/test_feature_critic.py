"""FeatureCritic: one whole update against an independent re-implementation, the reward on meta-test data
only, the critic learns, resume carries the split."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
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
