"""ColoredMNIST as the IRM paper built it (Arjovsky, Bottou, Gulrajani, Lopez-Paz 2019, section 5.2).

Official code: facebookresearch/InvariantRiskMinimization, ``code/colored_mnist/main.py``. Differences from
DomainBed's ``ColoredMNIST`` (``datasets/mnist.py``): 2x14x14 images (every other pixel of 28x28), the first
50,000 MNIST training digits split into two training environments of 25,000 (colour flipped with
probability 0.2 and 0.1), the last 10,000 training digits as the test environment (colour flip 0.9), and
the paper's training protocol as defaults: full-batch steps (``batch_size`` 25,000: each step sees every
example of each training environment), 501 steps, the paper's MLP (``featurizer`` ``irm_mlp``,
``hidden_dim`` 256 as ``main.py``'s default; the paper's IRM run uses 390, ``reproduce_paper_results.sh``).
"""

from __future__ import annotations

import torch
from dg_meta.datasets.mnist import ColoredMNIST, load_mnist

from dg_meta.dataset import MultiDomainDataset, TensorDomain
from dg_meta.hparams import HParam, int_log2_uniform, positive
from dg_meta.networks import FEATURIZERS
from dg_meta.registry import register_dataset


@register_dataset
class ColoredMNIST_IRM(MultiDomainDataset):  # noqa: N801 (the name users type)
    """The IRM paper's ColoredMNIST: label ``digit < 5`` flipped with probability 0.25, colour equal to the label
    flipped with probability 0.2 and 0.1 (training, 25,000 digits each: the even and odd positions of the first
    50,000 MNIST training digits after a seeded shuffle) and 0.9 (test: the last 10,000 training digits).

    Labelling and colouring are ``ColoredMNIST._color`` (the same procedure as ``main.py``'s
    ``make_environment``), on images subsampled to 14x14 first. The official code re-draws the shuffle, the
    label noise and the colours at every restart (unseeded); here they are drawn once from seed 0, so every
    run sees the same three environments and seeds vary only the training.
    """

    ENVIRONMENTS = ["+80%", "+90%", "-90%"]
    INPUT_SHAPE = (2, 14, 14)
    NUM_CLASSES = 2
    N_STEPS = 501
    CHECKPOINT_FREQ = 100
    DEFAULT_TEST_ENVS = [2]
    COLOR_FLIP = [0.2, 0.1, 0.9]
    HPARAMS = {
        "batch_size": HParam(25000, None, positive, "a positive integer",
                             "examples per training domain per step (25,000: full batch, the paper's protocol)"),
        "featurizer": HParam("irm_mlp", None, lambda v: v in FEATURIZERS, f"one of {', '.join(FEATURIZERS)}",
                             "network (irm_mlp: the paper's two-hidden-layer MLP)"),
        "hidden_dim": HParam(256, int_log2_uniform(6, 9), positive, "a positive integer",
                             "units per hidden layer of irm_mlp (main.py's default 256; the paper's IRM run 390)"),
    }

    def __init__(self, root: str | None, hparams: dict):
        super().__init__(root, hparams)
        images, digits = load_mnist(root)
        images, digits = images[:60000, ::2, ::2], digits[:60000]
        generator = torch.Generator().manual_seed(0)
        perm = torch.randperm(50000, generator=generator)
        train_images, train_digits = images[perm], digits[perm]
        parts = [(train_images[0::2], train_digits[0::2]), (train_images[1::2], train_digits[1::2]),
                 (images[50000:], digits[50000:])]
        self.domains = [
            TensorDomain(name, *ColoredMNIST._color(x, y, flip, generator))
            for name, (x, y), flip in zip(self.ENVIRONMENTS, parts, self.COLOR_FLIP)
        ]
