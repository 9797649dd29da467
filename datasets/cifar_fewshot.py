"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): CIFAR-100's classes split for few-shot
learning, each split a domain.

Both read torchvision's CIFAR-100 layout, ``DATA_DIR/cifar-100-python/{train,test,meta}`` (the "python version"
pickles of https://www.cs.toronto.edu/~kriz/cifar.html; nothing is downloaded), and use all 600 images of a class
(its 500 ``train`` images, then its 100 ``test`` images), 3x32x32. The splits are the domains ``train``, ``val``
and ``test``; the default ``--test-envs 1 2`` meta-trains on ``train`` and scores episodes on the novel classes of
``val`` (model selection) and ``test``, one split per episode (``per_domain``, as for miniImageNet). Class ids are
CIFAR-100's fine label indices (0-99), so a class keeps its id in both datasets.

- ``CIFARFS``: 64 / 16 / 20 classes. The class lists are Bertinetto et al.'s split files (``splits/bertinetto/
  {train,val,test}.txt`` of the CIFAR-FS archive linked from bertinetto/r2d2's README; the repository itself holds
  no lists), as reproduced in tristandeleu/pytorch-meta ``torchmeta/datasets/assets/cifar100/cifar-fs/
  {train,val,test}.json``.
- ``FC100``: 60 / 20 / 20 classes, the classes of 12 / 4 / 4 CIFAR-100 superclasses, from ElementAI/TADAM
  ``datasets/create_dataset_cifar100.py`` (``class_split``, by coarse label index; also the paper's Appendix,
  whose text says "5 superclasses each" for val and test but lists 4).

Inputs are normalised with the per-channel pixel mean and standard deviation of MetaOptNet's loaders
(kjunelee/MetaOptNet ``data/CIFAR_FS.py`` and ``data/FC100.py``: mean (129.38, 124.11, 112.48) / 255, std
(68.21, 65.43, 70.46) / 255); their training augmentation (random crop with padding 4, colour jitter, flip) is not
applied: as miniImageNet here, training and evaluation see the plain images. Images are held in memory as uint8
(184 MB for all 60,000) and converted on fetch.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dg_meta.dataset import ClassSplitDataset, TensorDomain
from dg_meta.errors import UsageError
from dg_meta.registry import register_dataset

SPLITS = ClassSplitDataset.ENVIRONMENTS
FILES = ["train", "test", "meta"]
LAYOUT = "torchvision's CIFAR-100 layout, the python-version pickles of cifar-100-python.tar.gz"
MEAN = torch.tensor([129.37731888, 124.10583864, 112.47758569]) / 255.0
STD = torch.tensor([68.20947949, 65.43124043, 70.45866994]) / 255.0

# Bertinetto et al.'s CIFAR-FS split (see the module docstring), each list sorted
CIFAR_FS_CLASSES = {
    "train": [
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus", "can", "castle",
        "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup", "dinosaur", "dolphin", "elephant",
        "forest", "girl", "hamster", "house", "kangaroo", "keyboard", "lawn_mower", "lion", "lizard", "lobster",
        "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree", "plate",
        "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "seal", "shrew", "skunk", "skyscraper", "snake",
        "spider", "squirrel", "streetcar", "sunflower", "tank", "tiger", "train", "trout", "tulip", "turtle",
        "willow_tree", "wolf",
    ],
    "val": [
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish", "lamp", "maple_tree",
        "motorcycle", "otter", "sea", "shark", "television", "tractor",
    ],
    "test": [
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy", "rocket",
        "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman", "worm",
    ],
}
# Oreshkin et al.'s FC100 split by CIFAR-100 coarse label (ElementAI/TADAM datasets/create_dataset_cifar100.py)
FC100_SUPERCLASSES = {
    "train": [1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19],
    "val": [8, 11, 13, 16],
    "test": [0, 7, 12, 14],
}


def _read_pickle(path: Path) -> dict:
    """One CIFAR-100 pickle as a dict with ``str`` keys (the release's Python 2 pickles read as latin-1)."""
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UsageError(f"CIFAR-100 file {path} cannot be read ({type(exc).__name__}); replace it with the one of "
                         f"cifar-100-python.tar.gz ({LAYOUT})") from None
    if not isinstance(data, dict):
        raise UsageError(f"CIFAR-100 file {path} is not a pickled dict ({LAYOUT})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _field(data: dict, key: str, path: Path):
    if key not in data:
        raise UsageError(f"CIFAR-100 file {path} has no '{key}' entry: not the python-version pickle ({LAYOUT})")
    return data[key]


def load_cifar100(root: str | None) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """All 60,000 CIFAR-100 images (uint8 ``[N, 3, 32, 32]``, the ``train`` pickle then the ``test`` pickle),
    their fine and coarse labels, and the fine label names, from ``root/cifar-100-python``."""
    folder = Path(root or ".") / "cifar-100-python"
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise UsageError(f"CIFAR-100 not found: expected {', '.join(FILES)} in {folder.resolve()} ({LAYOUT}; "
                         f"missing: {', '.join(missing)}); pass --data-dir DATA_DIR")
    images, fine, coarse = [], [], []
    for name in ("train", "test"):
        path = folder / name
        data = _read_pickle(path)
        x = np.asarray(_field(data, "data", path), dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise UsageError(f"CIFAR-100 file {path}: 'data' has shape {x.shape}, expected [N, 3072] ({LAYOUT})")
        images.append(torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()))
        fine.append(torch.as_tensor(_field(data, "fine_labels", path), dtype=torch.long))
        coarse.append(torch.as_tensor(_field(data, "coarse_labels", path), dtype=torch.long))
    names = list(_field(_read_pickle(folder / "meta"), "fine_label_names", folder / "meta"))
    return torch.cat(images), torch.cat(fine), torch.cat(coarse), names


class Uint8ImageDomain(TensorDomain):
    """A domain of uint8 images held in memory (on the training device after ``to``), returned as floats scaled
    to [0, 1] and normalised per channel with ``MEAN`` / ``STD``."""

    def __init__(self, name: str, x: Tensor, labels: Tensor):
        super().__init__(name, x, labels)
        self.mean, self.std = MEAN.view(1, 3, 1, 1), STD.view(1, 3, 1, 1)

    def _normalise(self, x: Tensor) -> Tensor:
        return (x.float() / 255.0 - self.mean) / self.std

    def fetch(self, idx: Tensor) -> Tensor:
        return self._normalise(super().fetch(idx))

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        x, y = super().batch(idx)
        return self._normalise(x), y

    def to(self, device: torch.device | str) -> Uint8ImageDomain:
        super().to(device)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        return self


class _CIFAR100Splits(ClassSplitDataset):
    """Shared construction: the domains ``train``, ``val`` and ``test`` from a boolean class mask per split."""

    INPUT_SHAPE = (3, 32, 32)
    NUM_CLASSES = 100

    def __init__(self, root: str | None, hparams: dict):
        super().__init__(root, hparams)
        images, fine, coarse, names = load_cifar100(root)
        for split in SPLITS:
            classes = self.split_classes(split, fine, coarse, names)
            keep = torch.isin(fine, classes)
            self.domains.append(Uint8ImageDomain(split, images[keep], fine[keep]))

    def split_classes(self, split: str, fine: Tensor, coarse: Tensor, names: list[str]) -> Tensor:
        """The fine label indices of ``split``."""
        raise NotImplementedError


@register_dataset
class CIFARFS(_CIFAR100Splits):
    """CIFAR-FS: CIFAR-100's 100 classes x 600 images, 32x32, split 64 / 16 / 20 by class (Bertinetto et al.,
    ICLR 2019) into the domains train / val / test; val and test are the default test domains."""

    def split_classes(self, split: str, fine: Tensor, coarse: Tensor, names: list[str]) -> Tensor:
        absent = [c for c in CIFAR_FS_CLASSES[split] if c not in names]
        if absent:
            raise UsageError(f"CIFAR-FS: the meta file's fine_label_names lack {', '.join(absent[:3])}: not "
                             f"CIFAR-100's meta ({LAYOUT})")
        return torch.tensor([names.index(c) for c in CIFAR_FS_CLASSES[split]])


@register_dataset
class FC100(_CIFAR100Splits):
    """FC100 (Fewshot-CIFAR100): CIFAR-100 split by superclass, 12 / 4 / 4 superclasses of 5 classes (60 / 20 /
    20 classes x 600 images, 32x32; Oreshkin et al., NeurIPS 2018) into the domains train / val / test; val and
    test are the default test domains."""

    def split_classes(self, split: str, fine: Tensor, coarse: Tensor, names: list[str]) -> Tensor:
        return fine[torch.isin(coarse, torch.tensor(FC100_SUPERCLASSES[split]))].unique()
