"""Fishr: matching the domains' per-example gradient variances of the classifier (Rame et al., ICML 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor

from dg_meta.algorithm import Losses
from dg_meta.functional import parameters_of
from dg_meta.gradients import per_example_gradients
from dg_meta.hparams import HParam, log_uniform, non_negative, uniform
from dg_meta.penalty_schedule import PenaltySchedule
from dg_meta.registry import register_algorithm


def _unit_open_right(value: float) -> bool:
    return 0 <= value < 1


@register_algorithm
class Fishr(ERM):
    """Fishr: Invariant Gradient Variances for Out-of-Distribution Generalization (Rame, Dancette & Cord,
    ICML 2022), in the form of DomainBed's ``Fishr`` class (``domainbed/algorithms.py``), which is the
    authors' code (github.com/alexrame/fishr, ``domainbed/algorithms.py``, the same class).

    For every example ``i`` of training domain ``e`` (``n_e`` examples in its minibatch) let ``g_i`` be the
    gradient of its own cross-entropy ``CE(w(phi(x_i)), y_i)`` with respect to the classifier's parameters
    ``w`` only (all of them, flattened: ``P`` entries). The domain's gradient variance is the per-entry
    population variance ``v_e = (1/n_e) sum_i (g_i - mean_e g)^2`` (centred, divided by ``n_e``). An
    exponential moving average per domain smooths it: ``m_e <- ema m_e + (1 - ema) v_e`` (``m_e`` starts at
    0 and is stored detached), and the penalty uses ``V_e = m_e / (1 - ema) = (ema / (1 - ema)) m_e^old + v_e``,
    so its gradient flows through this step's ``v_e`` only, with unit weight whatever ``ema``. The penalty is

        ``R = (1/E) sum_e (1/P) sum_j (V_e[j] - Vbar[j])^2``,  ``Vbar = (1/E) sum_e V_e``,

    and the objective ``CE(pooled minibatch) + lambda_t R`` is minimised with Adam over featurizer and
    classifier, ``g_i`` being differentiable with respect to both (double backpropagation). ``lambda_t = 0``
    (plain ERM, though ``R`` and the moving averages are still computed) for the first
    ``penalty_anneal_iters`` updates, then ``lambda``; at the switch Adam is rebuilt (fresh moments), as
    DomainBed does (``dg_meta.penalty_schedule``). Returned: ``loss`` (the objective), ``nll``, ``penalty``.

    Hparams (DomainBed ``hparams_registry.py``, ``Fishr`` block, one branch for every dataset): ``lambda``
    1000, ``10**U(1, 4)``; ``penalty_anneal_iters`` 1500, ``int(U(0, 5000))``; ``ema`` 0.95, ``U(0.90, 0.99)``.

    Departures: DomainBed computes the per-example gradients with BackPACK (``BatchGrad`` on the summed
    per-example losses of an ``extend``-ed classifier); here ``dg_meta.gradients.per_example_gradients``
    (``torch.func.vmap`` over ``torch.func.grad`` of each example's loss), the same quantities. DomainBed
    derives the class from ``Algorithm`` and builds ERM's networks and Adam itself; here it subclasses
    ``ERM``, which builds the same ones. DomainBed skips the rebuild when ``penalty_anneal_iters = 0``; here
    Adam is rebuilt before the first step then, which changes nothing (it has not stepped yet). The paper
    writes the penalty with the squared Euclidean distance ``||v_e - v||^2``; DomainBed's
    ``misc.l2_between_dicts`` (and so this file) averages the squared differences over the ``P`` entries
    instead of summing them, a constant factor ``1/P`` absorbed by ``lambda``.
    """

    compile_modules = ()  # the penalty backpropagates through per-example gradients (double backward)
    HPARAMS = {
        "lambda": HParam(1000.0, log_uniform(1, 4), non_negative, "non-negative",
                         "weight of the Fishr penalty after the annealing period"),
        "penalty_anneal_iters": HParam(1500, lambda r: int(r.uniform(0, 5000)), non_negative, "non-negative",
                                       "updates with penalty weight 0 before lambda switches on"),
        "ema": HParam(0.95, uniform(0.90, 0.99), _unit_open_right, "in [0, 1)",
                      "decay of the moving average of each domain's gradient variance"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.schedule = PenaltySchedule(hparams["lambda"], hparams["penalty_anneal_iters"], before=0.0)
        n_entries = sum(p.numel() for p in self.classifier.parameters())
        self.register_buffer("ema_variances", torch.zeros(num_domains, n_entries))

    def gradient_variances(self, features: Tensor, y: Tensor, sizes: list[int]) -> Tensor:
        """``[E, P]``: each domain's population variance of the per-example classifier gradients (the
        examples of domain ``e`` are the ``sizes[e]`` rows after those of the domains before it)."""
        grads = per_example_gradients(self.classifier, parameters_of(self.classifier), features, y,
                                      F.cross_entropy)
        flat = torch.cat([g.flatten(1) for g in grads.values()], dim=1)
        return torch.stack([(g - g.mean(0)).pow(2).mean(0) for g in flat.split(sizes)])

    def fishr_penalty(self, variances: Tensor) -> Tensor:
        """Update the moving averages with ``variances`` (``[E, P]``) and return the mean over domains of
        the mean squared difference between each bias-corrected average and their mean over domains."""
        ema = self.hparams["ema"]
        averaged = ema * self.ema_variances + (1 - ema) * variances
        self.ema_variances.copy_(averaged.detach())
        smoothed = averaged / (1 - ema)
        return (smoothed - smoothed.mean(0)).pow(2).mean()

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        x = torch.cat([x for x, _ in batch])
        y = torch.cat([y for _, y in batch])
        features = self.featurizer(x)
        nll = F.cross_entropy(self.classifier(features), y)
        penalty = self.fishr_penalty(self.gradient_variances(features, y, [len(y_d) for _, y_d in batch]))
        if self.schedule.switching():
            self.optimizer = self.build_optimizer()
        objective = nll + self.schedule.weight() * penalty
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.optimizer.step()
        self.schedule.advance()
        return {"loss": objective.detach(), "nll": nll.detach(), "penalty": penalty.detach()}
