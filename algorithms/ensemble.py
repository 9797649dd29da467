"""Ensemble: per-domain classifier heads on shared features, fused by a learned domain classifier.

Mancini, Rota Bulò, Caputo, Ricci, "Best sources forward: domain generalization through source-specific nets",
ICIP 2018 (arXiv:1806.05810). No official code was found: the first author's publication list
(mancinimassimiliano.github.io, _bibliography/papers.bib) gives no code link for it. Two forms, chosen by
the hparam ``ensemble_form``: the paper's model (default) and heads weighted by the domain classifier only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dg_meta.algorithm import Algorithm, Losses
from dg_meta.errors import UsageError
from dg_meta.hparams import HParam, log_uniform, non_negative, uniform, unit_interval
from dg_meta.networks import featurizer_for
from dg_meta.registry import register_algorithm

ENSEMBLE_FORMS = ("paper", "weighted_heads")


class DomainHeads(nn.Module):
    """``D`` linear heads evaluated in one batched call: ``logits[n, d] = W_d z_n + b_d`` via ``einsum``
    on the stacked weights ``W: [D, C, F]`` (each head initialised like ``nn.Linear``)."""

    def __init__(self, n_heads: int, n_features: int, n_classes: int):
        super().__init__()
        bound = 1 / math.sqrt(n_features)
        self.weight = nn.Parameter(torch.empty(n_heads, n_classes, n_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_heads, n_classes).uniform_(-bound, bound))

    def forward(self, z: Tensor) -> Tensor:
        """``[N, F]`` features to ``[N, D, C]`` per-head logits."""
        return torch.einsum("nf,dcf->ndc", z, self.weight) + self.bias


def agnostic_fusion(head_logits: Tensor, w: Tensor, alpha: float) -> Tensor:
    """``(1 - alpha) sum_i w_i f_i + (alpha / D) sum_i f_i``: ``[N, D, C]`` head logits, ``[N, D]`` weights
    to ``[N, C]`` fused logits."""
    return (1 - alpha) * torch.einsum("nd,ndc->nc", w, head_logits) + alpha * head_logits.mean(1)


def weighted_mixture(head_logits: Tensor, domain_logits: Tensor) -> Tensor:
    """``log sum_i softmax(g)_i softmax(f_i)``: the log of the domain-weighted mixture of head distributions."""
    log_w = F.log_softmax(domain_logits, dim=1)
    return torch.logsumexp(log_w.unsqueeze(2) + F.log_softmax(head_logits, dim=2), dim=1)


@register_algorithm
class Ensemble(Algorithm):
    """Source-specific heads fused by a domain classifier (Mancini et al., ICIP 2018, "Best sources forward").

    A shared featurizer ``phi``, one linear head ``f_i`` per training domain (the paper's source-specific
    classifiers share every layer but the last, per the reading note cited below) and a domain classifier
    ``g`` on the same features, with ``w(x) = softmax(g(phi(x)))``. ``D`` is the number of training domains.

    ``ensemble_form = "paper"`` (default), the paper's model with its domain-agnostic component:

    - fused class scores ``z(x) = (1 - alpha) sum_i w_i(x) f_i(phi(x)) + (alpha / D) sum_i f_i(phi(x))``;
    - training: the domain of a source example is known, so ``w`` is its one-hot domain label: an example
      of domain ``d`` is scored by ``(1 - alpha) f_d + (alpha / D) sum_i f_i``, its own head plus the
      domain-agnostic average of all heads. Loss ``CE(z, y) + lambda_domain CE(g(phi(x)), d)``, averaged
      over the batch; the domain term alone trains ``g``;
    - prediction: ``w(x)`` from ``g`` (the target domain is unknown); ``predict`` returns ``z(x)``.

    ``ensemble_form = "weighted_heads"``, the form without the agnostic component: the mixture
    ``p(y|x) = sum_i w_i(x) softmax(f_i(phi(x)))_y`` with the predicted ``w`` in training too, loss
    ``-log p(y|x) + lambda_domain CE(g(phi(x)), d)``; ``predict`` returns ``log p(y|x)``.
    With one training domain both forms are ERM: ``z = f_1`` and ``p = softmax(f_1)``.

    Sources and choices. The paper's text was not reachable from here, so the section/equation of its loss is
    not cited. Its abstract says: "multiple domain-specific classifiers, each associated to a source domain.
    At test time we estimate the probabilities that a target sample belongs to each source domain and exploit
    them to optimally fuse the classifiers predictions. [...] we also introduced a domain agnostic component
    supporting the final classifier". The fused-score formula above, "all the weights are shared between
    domain specific classifiers, except the last layer" and "in practice alpha = 0.25" are from a third-party
    reading note ("A Brief Report on Domain Generalization", section 3.1 on this paper), which calls the
    summands "classification scores"; we read them as logits (fused before the softmax). Using the known
    domain label as ``w`` in training is our reading of "at test time we estimate the probabilities", and it
    is what makes the heads source-specific. The weight of the domain loss (``lambda_domain``, default 1) and
    the random-search ranges are ours, and so is the optimiser: Adam on all parameters, as ERM here.
    """

    HPARAMS = {
        "ensemble_form": HParam("paper", None, lambda v: v in ENSEMBLE_FORMS, "paper or weighted_heads",
                                "paper: own-domain heads plus the domain-agnostic average (Mancini et al.); "
                                "weighted_heads: heads mixed by the domain classifier only"),
        "alpha_agnostic": HParam(0.25, uniform(0.0, 0.5), unit_interval, "in [0, 1]",
                                 "weight of the domain-agnostic average of the heads (paper form)"),
        "lambda_domain": HParam(1.0, log_uniform(-1, 1), non_negative, "non-negative",
                                "weight of the domain-classification loss"),
        "nonlinear_classifier": HParam(False, None, doc="must stay false: the per-domain heads are linear"),
    }
    data_parallel = "exact"  # per-example class and domain losses, averaged over the pooled minibatch

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        if hparams["nonlinear_classifier"]:
            raise UsageError("Ensemble's batched per-domain heads are linear: set hparam nonlinear_classifier false")
        self.featurizer = featurizer_for(self.input_shape, hparams)
        self.heads = DomainHeads(num_domains, self.featurizer.n_outputs, num_classes)
        self.domain_classifier = nn.Linear(self.featurizer.n_outputs, num_domains)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=hparams["lr"], weight_decay=hparams["weight_decay"])

    def scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(head logits [N, D, C], domain logits [N, D])``."""
        z = self.featurizer(x)
        return self.heads(z), self.domain_classifier(z)

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        x = torch.cat([x for x, _ in batch])
        y = torch.cat([y for _, y in batch])
        d = torch.cat([torch.full((len(yd),), i, dtype=torch.long, device=yd.device)
                       for i, (_, yd) in enumerate(batch)])
        head_logits, domain_logits = self.scores(x)
        if self.hparams["ensemble_form"] == "paper":
            own_domain = F.one_hot(d, self.num_domains).to(head_logits.dtype)
            fused = agnostic_fusion(head_logits, own_domain, self.hparams["alpha_agnostic"])
            loss_class = F.cross_entropy(fused, y)
        else:
            loss_class = F.nll_loss(weighted_mixture(head_logits, domain_logits), y)
        loss_domain = F.cross_entropy(domain_logits, d)
        loss = loss_class + self.hparams["lambda_domain"] * loss_domain
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach(), "class_loss": loss_class.detach(), "domain_loss": loss_domain.detach()}

    def predict(self, x: Tensor) -> Tensor:
        head_logits, domain_logits = self.scores(x)
        if self.hparams["ensemble_form"] == "paper":
            return agnostic_fusion(head_logits, F.softmax(domain_logits, dim=1), self.hparams["alpha_agnostic"])
        return weighted_mixture(head_logits, domain_logits)
