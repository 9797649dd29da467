"""ARM: adaptive risk minimisation (ARM-CML), a featurizer that also sees a context computed from its batch."""

from __future__ import annotations

import torch
from dg_meta.algorithms.erm import ERM
from torch import Tensor, nn

from dg_meta.errors import UsageError
from dg_meta.hparams import HParam
from dg_meta.networks import featurizer_for
from dg_meta.registry import register_algorithm


class ContextNet(nn.Module):
    """DomainBed's ``networks.ContextNet``: three 5x5 convolutions (padding 2, same size) ``C -> 64 -> 64 -> 1``
    channels, batch norm and ReLU after the first two: one context channel per image."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 1, 5, padding=2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ContextualFeaturizer(nn.Module):
    """``phi([x, c])``: the images with one more channel, the mean of ``context_net``'s output over the images'
    support group. A batch of ``B`` images is cut into consecutive groups of ``support_size`` when ``B`` is a
    multiple of it, else it is one group of ``B``; every image of a group gets the group's mean context."""

    def __init__(self, input_shape: tuple[int, ...], hparams: dict, support_size: int):
        super().__init__()
        self.context_net = ContextNet(input_shape[0])
        self.body = featurizer_for((input_shape[0] + 1, *input_shape[1:]), hparams)
        self.n_outputs = self.body.n_outputs
        self.support_size = support_size

    def forward(self, x: Tensor) -> Tensor:
        size = self.support_size if len(x) % self.support_size == 0 else len(x)
        context = self.context_net(x)
        context = context.view(len(x) // size, size, *context.shape[1:]).mean(1).repeat_interleave(size, 0)
        return self.body(torch.cat([x, context], 1))


@register_algorithm
class ARM(ERM):
    """Adaptive Risk Minimization, its contextual meta-learner ARM-CML (Zhang, Marklund, Dhawan, Gupta, Levine,
    Finn, NeurIPS 2021), in DomainBed's form.

    A context network ``h`` (``ContextNet``) maps each image to one channel; the featurizer ``phi`` sees every
    image together with the mean context of its support group, ``c = (1/K) sum_{k in group} h(x_k)``, as an
    extra input channel, and the head ``w`` classifies: ``f(x) = w(phi([x, c]))``. Training is ERM on the
    pooled batch of the training domains, ``CE(f(x), y)``, one Adam step (``lr``). The support size ``K`` is
    the ``batch_size`` hparam (examples per training domain per step), so in training each domain's minibatch
    is one group, i.e. the context is computed per domain, as the paper's unlabelled adaptation batch; at
    prediction a batch whose size is a multiple of ``K`` is cut into consecutive groups of ``K``, any other
    batch is one group (``ContextualFeaturizer``). Predictions therefore depend on the batch they come in.

    Follows DomainBed's ``ARM`` (``domainbed/algorithms.py``) but for its departure from the paper, kept as an
    option only:
    DomainBed's optimizer is ERM's, built over the featurizer and the head before the context network exists,
    so the context network is never trained; it keeps its initial weights (its batch norms still update their
    running statistics in training and use them in eval mode). ``arm_train_context_net=False`` reproduces that
    (its weights frozen, ``requires_grad=False``); the default ``True`` trains it with the rest, as the paper
    does (the gradient of the loss flows through the mean context into ``h``). Here the
    context network sits inside ``featurizer`` (``featurizer.context_net``), so ``embed`` (the few-shot
    prototypes) sees the context too. Images only: the context network is convolutional.

    Hparams: ``arm_train_context_net`` (ours, see above). DomainBed's ARM has no hparam of its own; on small
    images its batch size is DomainBed's usual one (64, random search ``2^U(3, 9)``), on larger images it fixes
    ``batch_size`` to 8; here ``batch_size`` is the dataset's (RotatedDigits: 16).
    """

    compile_modules = ()  # not checked under torch.compile
    HPARAMS = {
        "arm_train_context_net": HParam(True, None, doc="also train the context network (the paper); false: "
                                        "DomainBed's code, the context network keeps its initial weights"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        if len(input_shape) != 3:
            raise UsageError(f"ARM needs image inputs (C, H, W) for its convolutional context network, got input "
                             f"shape {tuple(input_shape)}; use another algorithm on this dataset")
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer.context_net.requires_grad_(hparams["arm_train_context_net"])

    def build_featurizer(self, hparams: dict) -> nn.Module:
        """``ContextualFeaturizer``: the context network and ``featurizer_for``'s featurizer on ``C + 1``
        channels, support size ``batch_size``."""
        return ContextualFeaturizer(self.input_shape, hparams, hparams["batch_size"])
