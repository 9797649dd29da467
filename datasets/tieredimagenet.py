"""tieredImageNet (Ren et al. 2018) with its class split by ImageNet super-category, as three domains.

Layout: the image-folder form ``DATA_DIR/tiered-imagenet/{train,val,test}/<wnid>/*.jpg`` (``tieredImageNet`` or
``tiered_imagenet`` are accepted for the top folder; any of ``IMG_EXTENSIONS``). The pickled original release
(``{split}_images_png.pkl`` + ``{split}_labels.pkl``) is not read: extract it into that layout first. The full
dataset has 351 / 97 / 160 classes from 20 / 6 / 8 ImageNet super-categories (Ren et al., ICLR 2018, Sec. 5):
the split is whatever the three folders hold, and a wnid found in two of them is refused.

The splits are the domains ``train``, ``val`` and ``test``; the default ``--test-envs 1 2`` meta-trains on
``train`` and scores episodes on the novel classes of ``val`` (model selection) and ``test``, one split per
episode (``per_domain``), as for miniImageNet. Class ids are global: the sorted wnids of ``train``, then of
``val``, then of ``test``. Images are decoded on fetch, resized to 84x84 (bilinear; the release's images are
84x84 already) and normalised with the ImageNet mean and standard deviation, as miniImageNet's.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from dg_meta.datasets.image_folder import IMG_EXTENSIONS
from dg_meta.datasets.miniimagenet import SIDE, ImageFileDomain

from dg_meta.dataset import ClassSplitDataset
from dg_meta.errors import UsageError
from dg_meta.registry import register_dataset

SPLITS = ClassSplitDataset.ENVIRONMENTS
FOLDERS = ["tiered-imagenet", "tieredImageNet", "tiered_imagenet"]
LAYOUT = "{train,val,test}/<wnid>/<image>.jpg, the image-folder form of tieredImageNet"


def class_folders(folder: Path) -> list[Path]:
    """The class folders of one split, sorted by name."""
    return sorted(Path(e.path) for e in os.scandir(folder) if e.is_dir())


def image_files(folder: Path) -> list[Path]:
    """The image files of one class folder, sorted by name."""
    return sorted(Path(e.path) for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))


@register_dataset
class TieredImageNet(ClassSplitDataset):
    """tieredImageNet, 608 ImageNet classes at 84x84 split 351 / 97 / 160 by super-category into the domains
    train / val / test (Ren et al. 2018); val and test are the default test domains."""

    INPUT_SHAPE = (3, SIDE, SIDE)
    NUM_CLASSES = 608

    def __init__(self, root: str | None, hparams: dict):
        super().__init__(root, hparams)
        base = self._find(Path(root or "."))
        seen: dict[str, str] = {}
        for split in SPLITS:
            classes = class_folders(base / split)
            if not classes:
                raise UsageError(f"tieredImageNet: {base / split} holds no class folders (expected {LAYOUT})")
            paths: list[Path] = []
            labels: list[int] = []
            for folder in classes:
                if folder.name in seen:
                    raise UsageError(f"tieredImageNet: class {folder.name} is in both {seen[folder.name]}/ and "
                                     f"{split}/ of {base}; a class belongs to one split: remove one copy")
                seen[folder.name] = split
                images = image_files(folder)
                if not images:
                    raise UsageError(f"tieredImageNet: class folder {folder} holds no images (expected files "
                                     f"ending in {', '.join(IMG_EXTENSIONS)})")
                paths += images
                labels += [len(seen) - 1] * len(images)
            self.domains.append(ImageFileDomain(split, paths, torch.tensor(labels)))
        self._num_classes = len(seen)

    @staticmethod
    def _find(base: Path) -> Path:
        candidates = [base / name for name in FOLDERS] + [base]
        for candidate in candidates:
            if all((candidate / split).is_dir() for split in SPLITS):
                return candidate
        raise UsageError(f"tieredImageNet not found: expected {LAYOUT} (the pickled *_images_png.pkl release is not "
                         f"read: extract it into that layout) in one of "
                         f"{', '.join(str(c.resolve()) for c in candidates)}; pass --data-dir DATA_DIR")

    @property
    def num_classes(self) -> int:
        return self._num_classes
