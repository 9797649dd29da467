"""miniImageNet (Vinyals et al. 2016) with Ravi & Larochelle's class split, as three domains.

Layout: ``DATA_DIR/miniImageNet/images/<file>.jpg`` plus ``train.csv``, ``val.csv`` and ``test.csv``
(header ``filename,label``; 64 / 16 / 20 classes of 600 images). The three splits are the domains
``train``, ``val`` and ``test``; the default ``--test-envs 1 2`` meta-trains on ``train`` and scores
episodes on the novel classes of ``val`` (model selection) and ``test``. Images are decoded on fetch,
resized to 84x84 (bilinear) and normalised with the ImageNet mean and standard deviation.

Class ids are global (numbered in split order), and each domain is a whole class split, so the
``per_domain`` episode protocol (one domain per episode) is exactly Ravi & Larochelle's: an episode draws
its classes from the pool of one split's classes. ``class_pool`` would pool the held-out ``val`` and
``test`` classes into one test pool, mixing the model-selection classes into the reported number.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dg_meta.dataset import ClassSplitDataset, Domain
from dg_meta.errors import UsageError
from dg_meta.registry import register_dataset

SIDE = 84
SPLITS = ClassSplitDataset.ENVIRONMENTS
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def load_rgb(path: Path, side: int = SIDE) -> Tensor:
    """An image as a normalised float ``[3, side, side]`` tensor."""
    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((side, side), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - MEAN) / STD


class ImageFileDomain(Domain):
    """A domain of image files decoded (and resized) whenever a batch is fetched."""

    def __init__(self, name: str, paths: list[Path], labels: Tensor, side: int = SIDE):
        super().__init__(name, labels)
        self.paths = paths
        self.side = side

    def fetch(self, idx: Tensor) -> Tensor:
        x = torch.stack([load_rgb(self.paths[i], self.side) for i in idx.tolist()])
        return x.to(self.device, non_blocking=True)


def read_split_csv(path: Path) -> list[tuple[str, str]]:
    """``(filename, label)`` rows of one Ravi & Larochelle split file (header ``filename,label``)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
        raise UsageError(f"{path} must start with the header 'filename,label' (Ravi & Larochelle's split files)")
    return [(r[0].strip(), r[1].strip()) for r in rows[1:] if r]


@register_dataset
class MiniImageNet(ClassSplitDataset):
    """miniImageNet, 100 ImageNet classes x 600 images at 84x84, split 64 / 16 / 20 by class into the
    domains train / val / test (Ravi & Larochelle 2017); val and test are the default test domains."""

    INPUT_SHAPE = (3, SIDE, SIDE)
    NUM_CLASSES = 100

    def __init__(self, root: str | None, hparams: dict):
        super().__init__(root, hparams)
        folder = self._find(Path(root or "."))
        classes: dict[str, int] = {}
        for split in SPLITS:
            rows = read_split_csv(folder / f"{split}.csv")
            paths = [folder / "images" / name for name, _ in rows]
            absent = [p for p in paths if not p.is_file()]
            if absent:
                raise UsageError(f"miniImageNet: {len(absent)} images listed in {split}.csv are missing from "
                                 f"{folder / 'images'} (first: {absent[0].name})")
            labels = torch.tensor([classes.setdefault(label, len(classes)) for _, label in rows])
            self.domains.append(ImageFileDomain(split, paths, labels))
        self._num_classes = len(classes)

    @staticmethod
    def _find(base: Path) -> Path:
        needed = ["images"] + [f"{s}.csv" for s in SPLITS]
        candidates = [base / "miniImageNet", base / "mini-imagenet", base]
        for candidate in candidates:
            if all((candidate / n).exists() for n in needed):
                return candidate
        raise UsageError(
            "miniImageNet not found: expected images/<file>.jpg, train.csv, val.csv and test.csv "
            f"(Ravi & Larochelle's split files) in one of {', '.join(str(c.resolve()) for c in candidates)}; "
            "pass --data-dir DATA_DIR"
        )

    @property
    def num_classes(self) -> int:
        return self._num_classes
