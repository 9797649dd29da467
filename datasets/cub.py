"""CUB-200-2011 (Wah et al. 2011) with Chen et al.'s few-shot class split, as three domains.

Layout: ``DATA_DIR/CUB_200_2011/images/<class folder>/*.jpg``, the 200 class folders of the official archive
(``001.Black_footed_Albatross`` ... ``200.Common_Yellowthroat``). The split is Chen et al.'s (ICLR 2019, "A Closer
Look at Few-shot Classification"), as wyharveychen/CloserLookFewShot ``filelists/CUB/write_CUB_filelist.py``
assigns it: the class folders sorted by name are numbered ``i = 0..199``; ``i % 2 == 0`` is ``base`` (100 training
classes), ``i % 4 == 1`` is ``val`` (50) and ``i % 4 == 3`` is ``novel`` (50 test classes). That file also keeps
``i`` as the label, so class ids here are ``i`` (``NUM_CLASSES`` 200, as its ``--num_classes`` default).

The splits are the domains ``train``, ``val`` and ``test``; the default ``--test-envs 1 2`` meta-trains on
``train`` and scores episodes on ``val`` (model selection) and ``test``, one split per episode (``per_domain``).
Images are decoded on fetch as CloserLookFewShot's evaluation transform does for its 84x84 networks
(``data/datamgr.py``, ``TransformLoader`` without augmentation): resized to 96x96 (``int(84 * 1.15)``, bilinear),
centre-cropped to 84x84 and normalised with the ImageNet mean and standard deviation. Its training augmentation
(random-resized crop, jitter, flip) is not applied: as miniImageNet here, training draws see the same images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from dg_meta.datasets.image_folder import IMG_EXTENSIONS
from dg_meta.datasets.miniimagenet import MEAN, SIDE, STD, ImageFileDomain
from dg_meta.datasets.tieredimagenet import class_folders, image_files
from PIL import Image
from torch import Tensor

from dg_meta.dataset import ClassSplitDataset
from dg_meta.errors import UsageError
from dg_meta.registry import register_dataset

SPLITS = ClassSplitDataset.ENVIRONMENTS
N_CLASSES = 200
RESIZE = int(SIDE * 1.15)  # CloserLookFewShot's Scale([int(image_size * 1.15)] * 2) before CenterCrop(image_size)
LAYOUT = "CUB_200_2011/images/<class folder>/<image>.jpg, the official archive's 200 class folders"


def split_of(index: int) -> str:
    """The split of the class folder at ``index`` in name order (CloserLookFewShot's write_CUB_filelist.py)."""
    if index % 2 == 0:
        return "train"
    return "val" if index % 4 == 1 else "test"


def load_center_crop(path: Path) -> Tensor:
    """An image resized to ``RESIZE`` x ``RESIZE``, centre-cropped to ``SIDE`` x ``SIDE``, normalised
    (float ``[3, SIDE, SIDE]``)."""
    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((RESIZE, RESIZE), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    top = int(round((RESIZE - SIDE) / 2.0))  # torchvision's CenterCrop offset
    return (x[:, top:top + SIDE, top:top + SIDE] - MEAN) / STD


class CenterCropDomain(ImageFileDomain):
    """A domain of image files decoded with ``load_center_crop`` whenever a batch is fetched."""

    def fetch(self, idx: Tensor) -> Tensor:
        x = torch.stack([load_center_crop(self.paths[i]) for i in idx.tolist()])
        return x.to(self.device, non_blocking=True)


@register_dataset
class CUB(ClassSplitDataset):
    """CUB-200-2011, 200 bird species (11,788 images) at 84x84, split 100 / 50 / 50 by class as Chen et al. 2019
    do into the domains train / val / test; val and test are the default test domains."""

    INPUT_SHAPE = (3, SIDE, SIDE)
    NUM_CLASSES = N_CLASSES

    def __init__(self, root: str | None, hparams: dict):
        super().__init__(root, hparams)
        images = Path(root or ".") / "CUB_200_2011" / "images"
        if not images.is_dir():
            raise UsageError(f"CUB-200-2011 not found: expected {LAYOUT} in {Path(root or '.').resolve()}; pass "
                             "--data-dir DATA_DIR")
        classes = class_folders(images)
        if len(classes) != N_CLASSES:
            raise UsageError(f"CUB-200-2011: {images} holds {len(classes)} class folders, not the {N_CLASSES} of the "
                             "official archive (Chen et al.'s split numbers all 200 in name order): extract "
                             "CUB_200_2011.tgz again")
        files: dict[str, list[Path]] = {split: [] for split in SPLITS}
        labels: dict[str, list[int]] = {split: [] for split in SPLITS}
        for index, folder in enumerate(classes):
            found = image_files(folder)
            if not found:
                raise UsageError(f"CUB-200-2011: class folder {folder} holds no images (expected files ending in "
                                 f"{', '.join(IMG_EXTENSIONS)})")
            files[split_of(index)] += found
            labels[split_of(index)] += [index] * len(found)
        self.domains = [CenterCropDomain(split, files[split], torch.tensor(labels[split])) for split in SPLITS]
