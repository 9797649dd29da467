"""MNISTRotation1k: the MNIST-rotation protocol of Ghifary et al. (ICCV 2015), reported by CrossGrad and
MMD-AAE: the same 1,000 digits in six domains rotated by 0..75 degrees, at 28x28 or the protocol's 16x16."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.datasets.mnist import load_mnist
from dg_meta.datasets.rotation import ANGLES, rotated

from dg_meta.dataset import MultiDomainDataset, TensorDomain
from dg_meta.hparams import HParam, positive
from dg_meta.networks import FEATURIZERS
from dg_meta.registry import register_dataset

N_MNIST_TRAIN = 60_000


def balanced_subset(labels: torch.Tensor, per_class: int, num_classes: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``per_class`` examples of each class, chosen uniformly with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().squeeze(1)
        chosen.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def _known_featurizer(name: str) -> bool:
    return name in FEATURIZERS


@register_dataset
class MNISTRotation1k(MultiDomainDataset):
    """Ghifary et al. (2015)'s MNIST-rotation: 1,000 digits of the MNIST training set, 100 per class chosen
    with a fixed seed (0), each rotated by 0, 15, 30, 45, 60 and 75 degrees (bilinear, zero fill), so every
    domain holds the same digits in the same order; 1x28x28, 10 classes, leave-one-domain-out. Reads
    ``DATA_DIR/MNIST/raw/`` like RotatedMNIST.

    Hparam ``image_size`` resizes the digits (bilinear, antialiased) before rotating them: 16 gives the
    protocol's own resolution (Ghifary et al.'s data file ``MNIST_6rot.pkl.gz`` in ghif/mtae holds six
    1000x256 arrays in [0, 1], 100 digits per class, the same labels in every domain); their 1,000 digits
    themselves are not these. Hparam ``featurizer`` picks a paper's network (``dg_meta.networks``) to
    reproduce its table (``bench/paper_mnist_rotation.py``)."""

    ENVIRONMENTS = [f"{a}°" for a in ANGLES]
    INPUT_SHAPE = (1, 28, 28)
    NUM_CLASSES = 10
    N_STEPS = 2000
    CHECKPOINT_FREQ = 200
    PER_CLASS = 100
    SEED = 0
    HPARAMS = {
        "image_size": HParam(28, None, positive, "a positive integer",
                             "side of the digits (28: MNIST's; 16: the protocol's own)"),
        "featurizer": HParam("domainbed", None, _known_featurizer, f"one of {', '.join(FEATURIZERS)}",
                             "network: DomainBed's MNIST ConvNet or a paper's own (dg_meta.networks)"),
    }

    def __init__(self, root: str | None, hparams: dict):
        super().__init__(root, hparams)
        images, labels = load_mnist(root)
        images, labels = images[:N_MNIST_TRAIN], labels[:N_MNIST_TRAIN]
        keep = balanced_subset(labels, self.PER_CLASS, self.NUM_CLASSES, self.SEED)
        x = images[keep].float().div_(255.0).unsqueeze(1)
        self.image_size = hparams.get("image_size", 28)
        if self.image_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False).clamp_(0.0, 1.0)
        self.domains = [TensorDomain(f"{angle}°", rotated(x, angle), labels[keep].clone()) for angle in ANGLES]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, self.image_size, self.image_size)
