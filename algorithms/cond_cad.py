"""CondCAD: ERM plus a contrastive bottleneck on the domain information the features keep within each class."""

from __future__ import annotations

from dg_meta.algorithms.cad import CAD, masked_logsumexp
from torch import Tensor

from dg_meta.registry import register_algorithm


@register_algorithm
class CondCAD(CAD):
    """Conditional Contrastive Adversarial Domain bottleneck (Ruan, Dubois, Maddison, "Optimal Representations
    for Covariate Shift", ICLR 2022, Appendix C.4), as DomainBed's ``CondCAD`` (``domainbed/algorithms.py``,
    ``AbstractCAD`` with ``is_conditional=True``).

    It minimises ``I(D; Z | Y)`` instead of CAD's ``I(D; Z)``: the anchor ``i`` picks among the other
    examples of its own class only. With CAD's logits ``s_ij`` (``algorithms/cad.py``) and
    ``q_ij = exp(s_ij) / sum_{k != i, y_k = y_i} exp(s_ik)`` for ``j != i`` with ``y_j = y_i``,

    - ``is_flipped=True`` (default): ``b_i = -(tau / 0.07) log sum_{j != i: y_j = y_i, d_j != d_i} q_ij``,
      over the anchors that have an example of their class from another domain;
    - ``is_flipped=False``: ``b_i = (tau / 0.07) log sum_{j != i: y_j = y_i, d_j = d_i} q_ij``, over the
      anchors that have another example of their class from their own domain.

    The bottleneck is the mean of ``b_i`` over those anchors (0 when there is none), and the update, the
    projection and normalisation switches, the hparams and their defaults are CAD's (DomainBed declares the
    same ones for both).
    """

    def anchor_losses(self, logits: Tensor, same_class: Tensor, same_domain: Tensor,
                      others: Tensor) -> tuple[Tensor, Tensor]:
        """``(b_i / (tau / 0.07), kept_i)`` for every anchor ``i`` (the class-conditional bottleneck)."""
        log_q = logits - masked_logsumexp(logits, same_class).unsqueeze(1)
        if self.hparams["is_flipped"]:
            members = same_class & ~same_domain
            values = -masked_logsumexp(log_q, members)
        else:
            members = same_class & same_domain
            values = masked_logsumexp(log_q, members)
        return values, members.any(1)
