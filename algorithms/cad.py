"""CAD: ERM plus a contrastive domain bottleneck that makes the features uninformative of the domain."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor, nn

from dg_meta.algorithm import Losses
from dg_meta.hparams import HParam, choice, non_negative, positive
from dg_meta.registry import register_algorithm

#: SupCon's base temperature: the bottleneck is scaled by ``temperature / BASE_TEMPERATURE``
BASE_TEMPERATURE = 0.07
#: output width of the projection head (``is_project``)
PROJECTION_WIDTH = 128


def masked_logsumexp(x: Tensor, mask: Tensor) -> Tensor:
    """``log sum_{j: mask_ij} exp(x_ij)`` for every row ``i`` (``-inf`` for a row with an empty mask: callers
    leave such rows out with ``torch.where``; ``masked_fill`` sends no gradient to the masked entries, so they
    give zero gradients, not NaN)."""
    return torch.logsumexp(x.masked_fill(~mask, float("-inf")), 1)


@register_algorithm
class CAD(ERM):
    """Contrastive Adversarial Domain bottleneck (Ruan, Dubois, Maddison, "Optimal Representations for Covariate
    Shift", ICLR 2022, Sec. 4.2.1), as DomainBed's ``CAD`` (``domainbed/algorithms.py``, ``AbstractCAD`` with
    ``is_conditional=False``).

    It minimises ``I(D; Z)``, the information the features ``z = phi(x)`` keep about the domain ``D``, with a
    contrastive estimate on the pooled batch (``x_i`` with class ``y_i``, training domain ``d_i``). With ``u_i``
    the features ``z_i``, passed through a projection head ``g`` (``is_project``) then L2-normalised
    (``is_normalized``) when those are set, logits ``s_ij = u_i . u_j / tau`` for ``j != i`` and ``s_ii = 0``,
    and ``p_ij = exp(s_ij) / sum_{k != i} exp(s_ik)`` the probability that anchor ``i`` picks ``j`` among the
    other examples,

    - ``is_flipped=True`` (default): ``b_i = -(tau / 0.07) log sum_{j: d_j != d_i} p_ij`` (maximise the
      probability of picking an example of another domain, i.e. minimise ``-log(1 - p(same domain))``);
    - ``is_flipped=False``: ``b_i = (tau / 0.07) log sum_{j: d_j = d_i} p_ij``, where the sum runs over the
      anchor too with ``p_ii = e^0 / sum_{k != i} exp(s_ik)`` (DomainBed's domain mask keeps the diagonal,
      whose logit is zeroed; the authors' code, github.com/ryoungj/optdom ``bottlenecks.py``, does the same).

    The bottleneck ``B`` is the mean of ``b_i`` over the anchors that have another example of their class in
    the batch (DomainBed's ``mask_valid``, inherited from SupCon, although CAD does not use the classes
    otherwise) and whose sum is not empty (DomainBed drops those through ``finite_mean``: their ``b_i`` is
    infinite); ``B = 0`` when no anchor is left. One Adam step (``lr``, ``weight_decay``; over ``phi``, the
    head ``w`` and ``g``) on ``CE(w(z), y) + lmbda * B``. ``predict`` is ``w(phi(x))``: the projection only
    serves the bottleneck.

    Departures from DomainBed, none of them changing a result: DomainBed's ``is_project`` branch refers to an
    undefined ``feature_dim`` (a ``NameError``); here ``g`` is the authors' projection head, ``Linear(n, n)``,
    ReLU, ``Linear(n, 128)`` with ``n`` the featurizer's width. DomainBed subtracts each row's maximum logit
    before its log-sum-exps (it cancels in ``log p_ij``) and selects the anchors by indexing, where here they
    are masked (no host-device synchronisation). DomainBed subclasses ``Algorithm`` with the same featurizer,
    head and Adam as ``ERM``; here ``CAD`` subclasses ``ERM``.

    Hparams (DomainBed's ``hparams_registry.py``, the same for every dataset): ``lmbda`` 0.1, random search
    one of 1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100 (the authors' default is 1); ``temperature`` 0.1, one of 0.05,
    0.1; ``is_normalized`` False, ``is_project`` False and ``is_flipped`` True, which random search never
    changes.
    """

    HPARAMS = {
        "lmbda": HParam(0.1, choice([1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2]), non_negative, "non-negative",
                        "weight of the domain bottleneck"),
        "temperature": HParam(0.1, choice([0.05, 0.1]), positive, "positive", "temperature tau of the logits"),
        "is_normalized": HParam(False, None, doc="L2-normalise the (projected) features in the bottleneck"),
        "is_project": HParam(False, None, doc="pass the features through a projection head in the bottleneck"),
        "is_flipped": HParam(True, None, doc="maximise log p(other domain) instead of minimising "
                                             "log p(same domain)"),
    }
    compile_modules = ("featurizer", "classifier")

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        #: the bottleneck's projection head ``g`` (``is_project``), trained by the same Adam; None without it
        self.project: nn.Module | None = None
        if hparams["is_project"]:
            width = self.featurizer.n_outputs
            self.project = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, PROJECTION_WIDTH))
            self.optimizer = self.build_optimizer()

    def build_optimizer(self) -> torch.optim.Optimizer:
        """ERM's Adam over ``network``, and over the projection head when there is one (ERM's constructor calls
        this before the head exists)."""
        params = list(self.network.parameters())
        head = getattr(self, "project", None)
        if head is not None:
            params += head.parameters()
        return torch.optim.Adam(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def bottleneck_features(self, z: Tensor) -> Tensor:
        """``u``: the features, projected (``is_project``) then L2-normalised (``is_normalized``)."""
        if self.project is not None:
            z = self.project(z)
        if self.hparams["is_normalized"]:
            z = F.normalize(z, dim=1)
        return z

    def anchor_losses(self, logits: Tensor, same_class: Tensor, same_domain: Tensor,
                      others: Tensor) -> tuple[Tensor, Tensor]:
        """``(b_i / (tau / 0.07), kept_i)`` for every anchor ``i`` (the unconditional bottleneck)."""
        log_p = logits - masked_logsumexp(logits, others).unsqueeze(1)
        if self.hparams["is_flipped"]:
            members = ~same_domain
            values = -masked_logsumexp(log_p, members)
        else:
            members = same_domain
            values = masked_logsumexp(log_p, members)
        return values, same_class.any(1) & members.any(1)

    def bottleneck_loss(self, z: Tensor, y: Tensor, d: Tensor) -> Tensor:
        """``B``: the mean over the kept anchors of ``b_i``, 0 when none is kept."""
        u = self.bottleneck_features(z)
        n = len(u)
        others = ~torch.eye(n, dtype=torch.bool, device=u.device)
        same_class = (y.unsqueeze(1) == y.unsqueeze(0)) & others
        same_domain = d.unsqueeze(1) == d.unsqueeze(0)
        temperature = self.hparams["temperature"]
        logits = (u @ u.t() / temperature) * others
        values, kept = self.anchor_losses(logits, same_class, same_domain, others)
        mean = torch.where(kept, values, torch.zeros_like(values)).sum() / kept.sum().clamp(min=1)
        return temperature / BASE_TEMPERATURE * mean

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        x = torch.cat([x for x, _ in batch])
        y = torch.cat([y for _, y in batch])
        d = torch.cat([torch.full((len(x_d),), i, dtype=torch.long, device=x.device)
                       for i, (x_d, _) in enumerate(batch)])
        z = self.featurizer(x)
        clf_loss = F.cross_entropy(self.classifier(z), y)
        bn_loss = self.bottleneck_loss(z, y, d)
        loss = clf_loss + self.hparams["lmbda"] * bn_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach(), "clf_loss": clf_loss.detach(), "bn_loss": bn_loss.detach()}
