"""Feature-Critic: a meta-learned auxiliary loss on features that makes a virtual step generalise better."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor, nn

from dg_meta.algorithm import Losses
from dg_meta.functional import functional_forward, parameters_of
from dg_meta.hparams import HParam, choice, log_uniform, positive
from dg_meta.registry import register_algorithm
from dg_meta.samplers import MetaDomainSplitter


def _pooled(batch: list[tuple[Tensor, Tensor]], domains: list[int]) -> tuple[Tensor, Tensor]:
    return torch.cat([batch[d][0] for d in domains]), torch.cat([batch[d][1] for d in domains])


class Critic(nn.Module):
    """``h_w(Z) = mean_i softplus(w_2 relu(W_1 z_i + b_1) + b_2)``: a non-negative loss on a feature batch."""

    def __init__(self, n_features: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        return F.softplus(self.net(features)).mean()


@register_algorithm
class FeatureCritic(ERM):
    """Feature-Critic Networks (Li, Yang, Zhou & Hospedales, ICML 2019), the homogeneous-label (PACS) variant.

    Official code: github.com/liyiying/Feature_Critic, ``model_PACS.py`` (``Model_Feature_Critic_PACS``),
    ``utils.py`` (``Critic_Network_MLP``), hyperparameters in ``main_Feature_Critic.py``. A critic ``h_w``
    (``Linear(F, hidden)``, ReLU, ``Linear(hidden, 1)``, softplus, mean over the batch: ``Critic_Network_MLP``)
    scores the features ``F_theta(x)`` of the meta-train domains; the classifier ``phi`` is shared by all
    domains. Each step splits the training domains into meta-train and meta-test, takes two virtual SGD steps
    of the featurizer, ``theta_old = theta - alpha grad L_CE`` and ``theta_new = theta - alpha grad (L_CE +
    beta h_w(F_theta(x)))`` (kept differentiable in ``w``: a second-order term), and rewards the critic by how
    much it helped on the meta-test domains only: ``r = L_CE(phi(F_theta_old(x'))) - L_CE(phi(F_theta_new(x')))``,
    critic loss ``-tanh(r)``, its own optimiser (``Model_Feature_Critic_PACS.train``: ``reward``, ``utility =
    tanh(reward)``, ``loss_held_out = -utility``). ``theta`` and ``phi`` take one step on ``L_CE + beta h_w`` of
    the meta-train domains (``phi`` receives only ``L_CE``'s gradient; the meta-test loss does not reach them),
    as the official ``opt_theta``/``opt_phi`` steps do. Defaults from the official PACS settings:
    ``alpha = 5e-4`` (``alpha = flags.lr`` in ``reinit_network_P``), ``beta = 0.01`` and critic lr ``1e-3``
    (``--beta``, ``--omega`` in ``main_Feature_Critic.py``), critic width 512 (``self.hh``), one meta-test
    domain.

    Warm start: the official code does not train from scratch; ``Model_Feature_Critic_PACS.pre_train``
    (``model_PACS.py``; likewise ``model_VD.py``) loads the featurizer and classifier of the ERM ("AGG")
    baseline's ``best_model.tar`` from ``--load_path`` before the first step (README: "Load the PACS baseline
    model (A) to ..."); the critic starts fresh. Here that is ``--init-from RUN_DIR`` on ``dg_meta.train``:
    train ERM first and initialise this run from its checkpoint (parameters matched by name; ``critic.*``
    stays freshly initialised). Without it the run starts from the usual initialisation.

    Departures: ``theta`` and ``phi`` use Adam (``lr``) as every algorithm here, not the official SGD with
    momentum 0.9, weight decay 5e-5 and lr/10 after 15000 of 45000 iterations; the critic uses Adam instead of
    the same SGD because its meta-gradient is of order ``alpha * beta`` (5e-6) and Adam's step does not scale
    with it. The official split takes ``index[0:1]`` as meta-train and ``index[2:]`` as meta-test of the three
    permuted training domains (one each; the middle domain sits out the iteration); here every training
    domain that is not meta-test is meta-train (pooled). Meta-train and meta-test minibatches have the same
    size (official PACS: 32 and 16), and the featurizer is this library's, not the official ImageNet AlexNet.
    """

    compile_modules = ()  # the critic's reward differentiates through theta_new twice
    HPARAMS = {
        "alpha": HParam(5e-4, log_uniform(-4, -2), positive, "positive", "virtual SGD step size of theta"),
        "beta": HParam(0.01, log_uniform(-3, 0), positive, "positive", "weight of the critic's loss h_w"),
        "critic_lr": HParam(1e-3, log_uniform(-4, -2), positive, "positive", "learning rate of the critic"),
        "critic_hidden": HParam(512, choice([128, 256, 512]), positive, "a positive integer",
                                "hidden width of the critic MLP"),
        "n_meta_test": HParam(1, None, positive, "a positive integer", "meta-test domains per step"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.critic = Critic(self.featurizer.n_outputs, hparams["critic_hidden"])
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=hparams["critic_lr"])
        self.splitter = MetaDomainSplitter(num_domains, hparams["n_meta_test"],
                                           seed=int(torch.randint(2**62, (1,))))

    def meta_test_losses(self, theta_old: dict[str, Tensor], theta_new: dict[str, Tensor], x: Tensor,
                         y: Tensor) -> tuple[Tensor, Tensor]:
        """``(L_CE(theta_old), L_CE(theta_new))`` on the meta-test batch ``(x, y)``; only the second is
        differentiable (in the critic's parameters)."""
        with torch.no_grad():
            loss_old = F.cross_entropy(self.classifier(functional_forward(self.featurizer, theta_old, x)), y)
        loss_new = F.cross_entropy(self.classifier(functional_forward(self.featurizer, theta_new, x)), y)
        return loss_old, loss_new

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        alpha, beta = self.hparams["alpha"], self.hparams["beta"]
        meta_train, meta_test = self.splitter()
        x_train, y_train = _pooled(batch, meta_train)
        theta = parameters_of(self.featurizer)
        phi = list(self.classifier.parameters())
        features = self.featurizer(x_train)
        loss_ce = F.cross_entropy(self.classifier(features), y_train)
        loss_aux = beta * self.critic(features)
        grads_ce = torch.autograd.grad(loss_ce, list(theta.values()) + phi, retain_graph=True)
        grads_aux = torch.autograd.grad(loss_aux, list(theta.values()), create_graph=True)
        theta_old, theta_new = {}, {}
        for (name, p), g_ce, g_aux in zip(theta.items(), grads_ce, grads_aux):
            theta_old[name] = p.detach() - alpha * g_ce
            theta_new[name] = p.detach() - alpha * (g_ce + g_aux)
        loss_old, loss_new = self.meta_test_losses(theta_old, theta_new, *_pooled(batch, meta_test))
        reward = loss_old - loss_new
        critic_loss = -torch.tanh(reward)
        critic_grads = torch.autograd.grad(critic_loss, list(self.critic.parameters()))

        for p, g in zip(self.critic.parameters(), critic_grads):  # every .grad is set: no zero_grad needed
            p.grad = g
        self.critic_optimizer.step()
        main_grads = [g_ce + g_aux.detach() for g_ce, g_aux in zip(grads_ce, grads_aux)] + list(grads_ce[len(theta):])
        for p, g in zip(list(theta.values()) + phi, main_grads):
            p.grad = g
        self.optimizer.step()
        return {"loss": (loss_ce + loss_aux).detach(), "ce_loss": loss_ce.detach(),
                "critic_aux_loss": loss_aux.detach(), "reward": reward.detach(), "critic_loss": critic_loss.detach()}

    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "splitter": self.splitter.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self.splitter.load_state_dict(state["splitter"])
