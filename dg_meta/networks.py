"""Featurizers and heads shared by all algorithms.

``featurizer_for(input_shape, hparams)`` picks the featurizer by input shape, as DomainBed does:
vectors get an MLP, small images (side <= 32) DomainBed's MNIST ConvNet, larger images a torchvision
ResNet-50 (ResNet-18 with hparam ``resnet18``). Hparam ``featurizer`` replaces that choice by a paper's own
network (``PAPER_FEATURIZERS``: CrossGrad's LeNet, Ghifary et al.'s MTAE encoder, the IRM paper's
ColoredMNIST MLP), for reproducing a paper's
table with its architecture. Every featurizer exposes ``n_outputs``, the width of its feature vector.
``load_pretrained`` fills every ResNet of a model from a local torchvision state dict.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from dg_meta.errors import UsageError


class MLP(nn.Module):
    """A ReLU MLP: ``depth`` linear layers of width ``width`` (DomainBed's MLP featurizer)."""

    def __init__(self, n_inputs: int, n_outputs: int, width: int = 256, depth: int = 3, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        sizes = [n_inputs] + [width] * (depth - 1)
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.Dropout(dropout), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], n_outputs))
        self.net = nn.Sequential(*layers)
        self.n_outputs = n_outputs

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class MNISTConvNet(nn.Module):
    """DomainBed's MNIST ConvNet: four 3x3 convs (64, 128 stride 2, 128, 128), each followed by ReLU
    then GroupNorm(8 groups), then global average pooling to 128 features."""

    n_outputs = 128

    def __init__(self, input_shape: tuple[int, ...]):
        super().__init__()
        channels = [input_shape[0], 64, 128, 128, 128]
        strides = [1, 2, 1, 1]
        layers: list[nn.Module] = []
        for c_in, c_out, stride in zip(channels[:-1], channels[1:], strides):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU(), nn.GroupNorm(8, c_out)]
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.body(x)).flatten(1)


class CrossGradLeNet(nn.Module):
    """CrossGrad's network (Shankar et al., ICLR 2018; official code vihari/crossgrad, ``nets/lenet_crossgrad.py``:
    ``lenet`` followed by the hidden layer of ``label_model``/``style_model``): three blocks of conv5x5 ('same'
    padding) + ReLU + 2x2 max-pool (floor) with 32, 64 and 128 channels, flatten, a 128-unit ReLU layer
    (``fc3``) with dropout 0.5, then a 64-unit ReLU layer (``label_fc1``/``style_fc1``): 64 features. The
    official code builds the label and the domain network alike from it, as ``CrossGrad`` does through
    ``featurizer_for``. Departures: PyTorch's default initialisation (theirs: truncated normal, std 0.1, tuned
    with their RMSProp of epsilon 1.0), and the head after it is this library's linear ``classifier`` (theirs
    also applies a ReLU to the logits, ``label_fc2``)."""

    n_outputs = 64

    def __init__(self, input_shape: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        channels = [input_shape[0], 32, 64, 128]
        h, w = input_shape[1:]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)]
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise UsageError(f"featurizer crossgrad_lenet needs images of at least 8x8, got {input_shape}")
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(128 * h * w, 128), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Linear(128, self.n_outputs), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class MTAEEncoder(nn.Module):
    """The encoder of Ghifary et al.'s multi-task autoencoder (ICCV 2015), the network of the MNIST-rotation
    protocol's paper: one fully connected layer from the flattened image to 500 sigmoid units (official code
    ghif/mtae, ``mtae.py``: ``n_in = 256`` (16x16 images), ``n_hid = 500``; ``Autoencoder.py``: ``Dense`` +
    sigmoid). PyTorch's default initialisation (theirs: Keras ``uniform``)."""

    n_outputs = 500

    def __init__(self, input_shape: tuple[int, ...]):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), self.n_outputs), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


#: paper networks selectable by hparam ``featurizer`` (``"domainbed"``: pick by input shape, the default)
class IRMColoredMNISTMLP(nn.Module):
    """The network of the IRM paper's ColoredMNIST experiment without its output layer (Arjovsky et al. 2019;
    official code facebookresearch/InvariantRiskMinimization, ``code/colored_mnist/main.py``, class ``MLP``):
    the flattened 2x14x14 image, a ReLU layer of ``hidden_dim`` units, a second one of ``hidden_dim`` units,
    Xavier-uniform weights and zero biases. Their third layer maps to one logit under a binary cross-entropy;
    here the library's linear ``classifier`` maps to two logits under the cross-entropy, which is the same model
    (the softmax of two logits is the sigmoid of their difference), with PyTorch's default initialisation."""

    def __init__(self, input_shape: tuple[int, ...], hidden_dim: int = 256):
        super().__init__()
        layers = [nn.Linear(math.prod(input_shape), hidden_dim), nn.Linear(hidden_dim, hidden_dim)]
        for layer in layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.net = nn.Sequential(nn.Flatten(), layers[0], nn.ReLU(), layers[1], nn.ReLU())
        self.n_outputs = hidden_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


PAPER_FEATURIZERS = {
    "crossgrad_lenet": lambda shape, hparams: CrossGradLeNet(shape),
    "mtae_mlp": lambda shape, hparams: MTAEEncoder(shape),
    "irm_mlp": lambda shape, hparams: IRMColoredMNISTMLP(shape, hparams.get("hidden_dim", 256)),
}
FEATURIZERS = ("domainbed", *PAPER_FEATURIZERS)


class Conv4(nn.Module):
    """The few-shot Conv-4 backbone (Vinyals et al. 2016; Finn et al. 2017): four blocks of conv3x3-64,
    BatchNorm, ReLU, 2x2 max-pool, flattened. ``track_running_stats=False`` gives MAML's transductive
    batch statistics (no running averages). Only the first ``pool_blocks`` blocks end in the max-pool
    (default all four; Relation Networks' embedding keeps feature maps with two)."""

    def __init__(self, input_shape: tuple[int, ...], hidden: int = 64, track_running_stats: bool = True,
                 pool_blocks: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for block in range(4):
            layers += [nn.Conv2d(c_in, hidden, 3, padding=1),
                       nn.BatchNorm2d(hidden, track_running_stats=track_running_stats), nn.ReLU()]
            if block < pool_blocks:
                layers.append(nn.MaxPool2d(2))
            c_in = hidden
        self.body = nn.Sequential(*layers)
        h, w = input_shape[1:]
        for _ in range(pool_blocks):
            h, w = h // 2, w // 2
        self.n_outputs = hidden * max(h, 1) * max(w, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).flatten(1)


class _ResBlock12(nn.Module):
    """One ResNet-12 block: 3 x (conv3x3, BN) with LeakyReLU(0.1) between, a conv1x1+BN shortcut,
    LeakyReLU after the sum, then 2x2 max-pool."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """The few-shot ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019): four residual blocks of widths
    64-160-320-640, each 3 x conv3x3-BN with LeakyReLU(0.1), a 1x1 projection shortcut and 2x2 max-pool,
    then global average pooling (640 features; 84x84 inputs reach 5x5 before pooling). DropBlock is
    not included."""

    def __init__(self, input_shape: tuple[int, ...], widths: tuple[int, ...] = (64, 160, 320, 640)):
        super().__init__()
        channels = [input_shape[0], *widths]
        self.body = nn.Sequential(*(_ResBlock12(a, b) for a, b in zip(channels[:-1], channels[1:])))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.n_outputs = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.body(x)).flatten(1)


FEW_SHOT_BACKBONES = {"conv4": Conv4, "resnet12": ResNet12}


def fewshot_backbone(name: str, input_shape: tuple[int, ...]) -> nn.Module:
    """The few-shot backbone called ``name`` (``conv4`` or ``resnet12``) for ``input_shape`` images."""
    if name not in FEW_SHOT_BACKBONES:
        raise UsageError(f"unknown backbone '{name}': choose one of {', '.join(FEW_SHOT_BACKBONES)}")
    return FEW_SHOT_BACKBONES[name](input_shape)


class ResNet(nn.Module):
    """DomainBed's ResNet featurizer: torchvision ResNet-18 (512 features) or ResNet-50 (2048) without its
    ``fc`` layer, followed by dropout ``dropout``. Its BatchNorm layers are always in eval mode (DomainBed's
    freeze-BN convention: running statistics are never updated; affine weights still train). Inputs with
    ``C != 3`` channels get a new first convolution. Built with ``weights=None``: nothing is downloaded;
    ``load_weights`` reads a local torchvision state dict."""

    def __init__(self, input_shape: tuple[int, ...], resnet18: bool = False, dropout: float = 0.0):
        super().__init__()
        self.arch = "ResNet-18" if resnet18 else "ResNet-50"
        network = (torchvision.models.resnet18 if resnet18 else torchvision.models.resnet50)(weights=None)
        if input_shape[0] != 3:
            network.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.n_outputs = network.fc.in_features
        network.fc = nn.Identity()
        self.network = network
        self.dropout = nn.Dropout(dropout)
        self.freeze_bn()

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.network(x))

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        self.freeze_bn()
        return self

    def freeze_bn(self) -> None:
        for module in self.network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()

    def load_weights(self, path: str | Path) -> None:
        """Load a torchvision state dict (``torch.save(resnet.state_dict(), path)``) with ``weights_only``;
        ``fc.*`` is dropped and, for ``C != 3`` input channels, ``conv1`` is tiled over the channels as
        DomainBed does. A missing or wrong file raises a one-line ``UsageError``."""
        hint = (f"pass a local torchvision {self.arch} state dict saved with torch.save(model.state_dict(), PATH) "
                "(hparam resnet18 picks ResNet-18 vs ResNet-50; nothing is downloaded)")
        if not Path(path).is_file():
            raise UsageError(f"--pretrained {path}: no such file; {hint}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UsageError(f"--pretrained {path}: not a loadable torch file ({type(exc).__name__}); {hint}") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise UsageError(f"--pretrained {path}: does not hold a state dict of tensors; {hint}")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.network.state_dict()
        if "conv1.weight" in state and own["conv1.weight"].shape[1] != state["conv1.weight"].shape[1]:
            src = state["conv1.weight"]
            state["conv1.weight"] = src[:, [i % src.shape[1] for i in range(own["conv1.weight"].shape[1])]]
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise UsageError(
                f"--pretrained {path}: not a torchvision {self.arch} state dict ({len(missing)} missing keys"
                f"{' e.g. ' + missing[0] if missing else ''}, {len(unexpected)} unexpected"
                f"{' e.g. ' + unexpected[0] if unexpected else ''}, {len(wrong)} of another shape"
                f"{' e.g. ' + wrong[0] if wrong else ''}); {hint}")
        self.network.load_state_dict(state)


def load_pretrained(model: nn.Module, path: str | Path) -> int:
    """Load ``path`` into every ``ResNet`` inside ``model`` (the CLI's ``--pretrained``); returns how many.
    A model without a ResNet featurizer raises a ``UsageError``."""
    resnets = [m for m in model.modules() if isinstance(m, ResNet)]
    if not resnets:
        raise UsageError(f"--pretrained {path}: this model has no ResNet featurizer (ResNets are used for images "
                         "larger than 32x32, e.g. PACS); drop --pretrained")
    for resnet in resnets:
        resnet.load_weights(path)
    return len(resnets)


def classifier(n_features: int, n_classes: int, nonlinear: bool = False) -> nn.Module:
    """A linear head, or DomainBed's two-hidden-layer MLP head when ``nonlinear``."""
    if not nonlinear:
        return nn.Linear(n_features, n_classes)
    hidden = n_features // 2
    return nn.Sequential(
        nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU(),
        nn.Linear(hidden // 2, n_classes),
    )


def featurizer_for(input_shape: tuple[int, ...], hparams: dict) -> nn.Module:
    """The featurizer DomainBed would pick for ``input_shape``, or the paper network named by hparam
    ``featurizer`` (one of ``FEATURIZERS``; default ``"domainbed"``)."""
    name = hparams.get("featurizer", "domainbed")
    if name != "domainbed":
        if name not in PAPER_FEATURIZERS:
            raise UsageError(f"unknown featurizer '{name}': choose one of {', '.join(FEATURIZERS)}")
        return PAPER_FEATURIZERS[name](input_shape, hparams)
    if len(input_shape) == 1:
        return MLP(input_shape[0], hparams.get("mlp_width", 256), hparams.get("mlp_width", 256),
                   hparams.get("mlp_depth", 3), hparams.get("mlp_dropout", 0.0))
    if len(input_shape) == 3 and max(input_shape[1:]) <= 32:
        return MNISTConvNet(input_shape)
    if len(input_shape) == 3:
        return ResNet(input_shape, hparams.get("resnet18", False), hparams.get("resnet_dropout", 0.0))
    raise ValueError(f"no featurizer for input shape {input_shape}")
