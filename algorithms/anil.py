"""ANIL (Almost No Inner Loop): MAML whose inner loop adapts only the classification head."""

from __future__ import annotations

from typing import ClassVar

from dg_meta.algorithms.maml import MAML

from dg_meta.functional import InnerLR, parameters_of
from dg_meta.hparams import HParam
from dg_meta.registry import register_algorithm


@register_algorithm
class ANIL(MAML):
    """ANIL (Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding the
    Effectiveness of MAML", ICLR 2020).

    MAML (``dg_meta.algorithms.maml``) with the inner loop restricted to the head: for each task,
    ``W_i = W - alpha grad_W L_support_i(theta_body, W)`` (``inner_steps`` such steps) with the body's weights
    ``theta_body`` fixed, and the meta-update ``theta <- Adam(theta, grad (1/B) sum_i L_query_i(theta_body, W_i))``
    over body and head (second order through the head's steps unless ``first_order``). At test time only the
    head is fine-tuned on the support set. The paper compares ANIL with MAML on MAML's architecture and setup;
    the defaults here are MAML's Omniglot ones (our choice: the paper's per-benchmark values could not be read
    here).
    """

    HPARAMS: ClassVar[dict[str, HParam]] = {}

    def inner_lrs(self) -> InnerLR:
        """Only the head (``network.1``) takes inner steps."""
        return {name: self.hparams["inner_lr"] for name in parameters_of(self.network) if name.startswith("1.")}
