"""Fish: gradient matching across domains, by interpolating towards weights trained on one domain after another."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dg_meta.algorithm import Algorithm, Losses
from dg_meta.functional import interpolate_
from dg_meta.hparams import HParam, choice, positive
from dg_meta.networks import classifier, featurizer_for
from dg_meta.registry import register_algorithm


@register_algorithm
class Fish(Algorithm):
    """Fish (Shi, Seely, Torr, Siddharth, Hannun, Usunier & Synnaeve, "Gradient Matching for Domain
    Generalization", ICLR 2022).

    The paper's objective is the mean domain loss minus a multiple of the mean inner product of the domains'
    gradients (inter-domain gradient matching); Fish follows it without second derivatives: a copy
    ``theta~`` of the weights ``theta`` takes one step on each training domain's minibatch in turn,
    ``theta~ <- theta~ - Adam(grad CE_d(theta~))`` for ``d = 1..D``, and then
    ``theta <- theta + meta_lr (theta~ - theta)`` (for small plain gradient steps the paper shows that this
    move approximates a step on that objective).

    Follows DomainBed's ``Fish`` (``domainbed/algorithms.py``): the inner steps are Adam (``lr``,
    ``weight_decay``) whose moments and step count carry over from one update to the next (DomainBed
    saves ``optimizer_inner.state_dict()`` and loads it into the next clone's Adam; here one inner network
    and its Adam persist and the network's weights are reset to ``theta`` at the start of every update,
    the same computation); the domains are visited in training-domain order, every one once per update;
    the interpolation covers every floating-point tensor of the state dict (weights and buffers such as
    batch-norm statistics, DomainBed's ``ParamDict`` arithmetic on ``state_dict()``); integer buffers (batch
    norm's ``num_batches_tracked``, read only when its ``momentum`` is None) are left as they are, where
    DomainBed interpolates them too and truncates the result. The reported ``loss`` is the last domain's
    inner loss, as DomainBed reports it. DomainBed also builds an Adam over ``theta`` that it never steps;
    there is none here.
    ``meta_lr``: default 0.5, random search ``choice([0.05, 0.1, 0.5])`` (``hparams_registry.py``).

    DomainBed departs from the authors' code (github.com/YugeTen/fish, ``src/main.py``, ``train_fish``), which
    draws ``meta_steps`` domains at random for every update, divides ``meta_lr`` by ``meta_steps``, can start
    from an ERM-pretrained model (``pretrain_iters``) and reloads the inner optimizer's state only when
    ``reload_inner_optim`` is set.
    """

    HPARAMS = {
        "meta_lr": HParam(0.5, choice([0.05, 0.1, 0.5]), positive, "positive",
                          "outer step size: theta <- theta + meta_lr (theta~ - theta)"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = featurizer_for(self.input_shape, hparams)
        self.classifier = classifier(self.featurizer.n_outputs, num_classes, hparams["nonlinear_classifier"])
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.inner_network = copy.deepcopy(self.network)
        self.inner_optimizer = torch.optim.Adam(self.inner_network.parameters(), lr=hparams["lr"],
                                                weight_decay=hparams["weight_decay"])

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        self.inner_network.load_state_dict(self.network.state_dict())
        for x, y in batch:
            loss = F.cross_entropy(self.inner_network(x), y)
            self.inner_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.inner_optimizer.step()
        inner_state = self.inner_network.state_dict()
        floats = [(name, t) for name, t in self.network.state_dict().items() if t.is_floating_point()]
        interpolate_([t for _, t in floats], [inner_state[name] for name, _ in floats], self.hparams["meta_lr"])
        return {"loss": loss.detach()}

    def predict(self, x: Tensor) -> Tensor:
        return self.network(x)
