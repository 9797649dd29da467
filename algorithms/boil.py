"""BOIL (Body Only update in Inner Loop): MAML whose inner loop adapts the body and freezes the head."""

from __future__ import annotations

from typing import ClassVar

from dg_meta.algorithms.maml import MAML

from dg_meta.functional import InnerLR, parameters_of
from dg_meta.hparams import HParam
from dg_meta.registry import register_algorithm


@register_algorithm
class BOIL(MAML):
    """BOIL (Oh, Yoo, Kim & Yun, "BOIL: Towards Representation Change for Few-shot Learning", ICLR 2021).

    MAML with the opposite restriction to ANIL's: the inner loop's learning rate of the head is zero, so each task
    adapts only the feature extractor, ``theta_body,i = theta_body - alpha grad_body L_support_i(theta_body, W)``
    with the head ``W`` fixed, and the meta-update trains both on the query losses at the adapted bodies
    (second order unless ``first_order``). The paper's argument: with a fixed head, adaptation must change the
    representation instead of reusing it. Test-time adaptation likewise updates only the body.
    The defaults are MAML's Omniglot ones (inner lr 0.4 for the body, one step, three at test): an assumption
    of ours, not the paper's per-benchmark settings, which could not be read here.
    """

    HPARAMS: ClassVar[dict[str, HParam]] = {}

    def inner_lrs(self) -> InnerLR:
        """Only the body (``network.0``) takes inner steps; the head's inner rate is zero."""
        return {name: self.hparams["inner_lr"] for name in parameters_of(self.network) if name.startswith("0.")}
