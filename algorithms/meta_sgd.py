"""Meta-SGD: MAML with a learned inner learning rate for every weight."""

from __future__ import annotations

from typing import ClassVar

import torch
from dg_meta.algorithms.maml import MAML
from torch import nn

from dg_meta.functional import InnerLR, parameters_of
from dg_meta.hparams import HParam
from dg_meta.registry import register_algorithm


@register_algorithm
class MetaSGD(MAML):
    """Meta-SGD (Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", 2017).

    The inner step is ``phi_i = theta - alpha o grad_theta L_support_i(theta)`` with ``alpha`` a tensor of the
    same shape as ``theta`` (element-wise product: a learned step size and direction per weight), and both are
    meta-learned, ``(theta, alpha) <- Adam((theta, alpha), grad (1/B) sum_i L_query_i(phi_i))`` (the paper's
    Algorithm 1: one inner step; second order unless ``first_order``: ``alpha``'s gradient needs no second
    derivative either way, ``-grad L_support o grad_phi L_query``). ``alpha`` starts at ``inner_lr`` everywhere
    (0.4, MAML's Omniglot step; learn2learn's ``MetaSGD`` likewise starts every rate at one constant); its
    entries are saved in checkpoints as ``alpha.<parameter name with dots as underscores>``. Test-time
    adaptation takes ``inner_steps_test`` steps with the learned rates.
    """

    HPARAMS: ClassVar[dict[str, HParam]] = {}

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.alpha = nn.ParameterDict({
            name.replace(".", "_"): nn.Parameter(torch.full_like(p.detach(), hparams["inner_lr"]))
            for name, p in parameters_of(self.network).items()})
        self.optimizer = torch.optim.Adam(self.parameters(), lr=hparams["lr"], weight_decay=hparams["weight_decay"])

    def inner_lrs(self) -> InnerLR:
        """One learned rate tensor per network parameter."""
        return {name: self.alpha[name.replace(".", "_")] for name in parameters_of(self.network)}
