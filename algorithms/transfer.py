"""Transfer: ERM plus a min-max game that shrinks the gap between domain risks under nearby classifiers."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor, nn

from dg_meta.algorithm import Losses
from dg_meta.hparams import HParam, choice, log_uniform, positive, uniform
from dg_meta.registry import register_algorithm


def risk_gap(features: list[Tensor], labels: list[Tensor], head: nn.Module) -> Tensor:
    """``max_i R_i - min_j R_j``: the largest difference between the training domains' mean cross-entropies
    of ``head`` on their features."""
    risks = torch.stack([F.cross_entropy(head(z), y) for z, y in zip(features, labels)])
    return risks.max() - risks.min()


@register_algorithm
class Transfer(ERM):
    """Transfer (Zhang, Zhao, Yu, Poupart, "Quantifying and Improving Transferability in Domain
    Generalization", NeurIPS 2021, the Transfer algorithm), as DomainBed's ``Transfer``
    (``domainbed/algorithms.py``; the authors' github.com/Gordon-Guojun-Zhang/Transferability-NeurIPS2021 has
    the same class).

    Features ``phi`` are transferable when no classifier ``h'`` close to the trained head ``h`` has very
    different risks on two training domains. With ``gap(h') = max_i R_i(h' o phi) - min_j R_j(h' o phi)``
    over the training domains' minibatches (mean cross-entropies) and ``B(h, delta)`` the Euclidean ball of
    radius ``delta`` around ``h``'s parameters (all of them as one vector), one update is

    1. an Adam step (``lr``, ``weight_decay``) on ``(phi, h)`` for the pooled cross-entropy ``CE(h o phi)``;
    2. an Adam step of the same optimizer for ``t_lambda * gap(h')`` at the adversarial head ``h'`` left by
       the previous update (the initial ``h`` at the first): it moves ``phi`` only, since ``h`` is not in
       that loss and the step skips parameters without a gradient;
    3. ``h' <- h``, then ``d_steps_per_g`` ascent steps ``h' <- Proj_B(h, delta)(h' + lr_d grad t_lambda
       gap(h'))`` (SGD on ``-t_lambda gap``; the projection rescales ``h' - h`` to length ``delta`` when
       longer).

    ``update`` returns ``loss`` (step 1's cross-entropy) and ``gap`` (``t_lambda * gap`` before the last
    ascent step), as DomainBed. ``h'`` (``adv_classifier``) and its SGD optimizer ``adv_opt`` are part of the
    checkpoint.

    Departures from DomainBed: with ``gda`` DomainBed builds its outer optimizer as SGD over ``h'``'s
    parameters, so that steps 1-2 never move ``phi`` or ``h`` (``h'`` is overwritten in step 3) and the model
    stays at its initialisation; every random-search draw has ``gda`` set. Here ``gda`` makes steps 1-2 plain
    SGD (``lr``, no weight decay) on ``(phi, h)``: gradient descent-ascent with SGD for both players. The
    ascent steps reuse one forward pass of the fixed ``phi`` (no gradient), where DomainBed recomputes it at
    every step: the same numbers unless the featurizer has dropout. DomainBed subclasses ``Algorithm`` with
    ERM's featurizer, head and Adam; here ``Transfer`` subclasses ``ERM``.

    Hparams (DomainBed's ``hparams_registry.py``, the same for every dataset): ``t_lambda`` 1, random search
    ``10 ** U(-2, 1)``; ``delta`` 2, ``U(0.1, 3)``; ``d_steps_per_g`` 10, one of 1, 2, 5; ``lr_d`` 1e-3,
    ``10 ** U(-4.5, -2.5)``; ``gda`` False, always True in random search. DomainBed also declares
    ``weight_decay_d`` and ``beta1`` for Transfer, which its code never reads: they are left out here.
    """

    HPARAMS = {
        "t_lambda": HParam(1.0, log_uniform(-2, 1), positive, "positive", "weight of the risk gap"),
        "delta": HParam(2.0, uniform(0.1, 3.0), positive, "positive",
                        "radius of the ball of adversarial heads around the head"),
        "d_steps_per_g": HParam(10, choice([1, 2, 5]), positive, "a positive integer",
                                "ascent steps of the adversarial head per update"),
        "lr_d": HParam(1e-3, log_uniform(-4.5, -2.5), positive, "positive", "SGD step size of the adversarial head"),
        "gda": HParam(False, choice([True]), doc="SGD instead of Adam for the featurizer and head"),
    }
    compile_modules = ("featurizer", "classifier", "adv_classifier")

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.adv_classifier = copy.deepcopy(self.classifier)
        self.adv_opt = torch.optim.SGD(self.adv_classifier.parameters(), lr=hparams["lr_d"])

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of ``(phi, h)``: ERM's Adam, or SGD at ``lr`` with ``gda``."""
        if self.hparams["gda"]:
            return torch.optim.SGD(self.network.parameters(), lr=self.hparams["lr"])
        return super().build_optimizer()

    def project_adversary(self) -> None:
        """``h' <- Proj_B(h, delta)(h')``: ``h + delta (h' - h) / ||h' - h||`` when ``||h' - h|| > delta``."""
        delta = self.hparams["delta"]
        with torch.no_grad():
            pairs = list(zip(self.adv_classifier.parameters(), self.classifier.parameters()))
            distance = torch.stack([(a - h).pow(2).sum() for a, h in pairs]).sum().sqrt()
            for a, h in pairs:
                a.copy_(torch.where(distance > delta, h + delta / distance * (a - h), a))

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        t_lambda = self.hparams["t_lambda"]
        labels = [y for _, y in batch]
        loss = F.cross_entropy(self.network(torch.cat([x for x, _ in batch])), torch.cat(labels))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

        gap = t_lambda * risk_gap([self.featurizer(x) for x, _ in batch], labels, self.adv_classifier)
        self.optimizer.zero_grad(set_to_none=True)
        gap.backward()
        self.optimizer.step()

        self.adv_classifier.load_state_dict(self.classifier.state_dict())
        with torch.no_grad():
            features = [self.featurizer(x) for x, _ in batch]
        for _ in range(self.hparams["d_steps_per_g"]):
            gap = t_lambda * risk_gap(features, labels, self.adv_classifier)
            self.adv_opt.zero_grad(set_to_none=True)
            (-gap).backward()
            self.adv_opt.step()
            self.project_adversary()
        return {"loss": loss.detach(), "gap": gap.detach()}
