"""Omniglot (Lake et al. 2015): alphabets as domains, 28x28 images, rotations as extra classes.

- ``Omniglot``: torchvision's layout ``DATA_DIR/omniglot-py/images_background/<alphabet>/<character>/*.png``
  and ``images_evaluation``; the 30 background alphabets train, the 20 evaluation alphabets are the
  default ``--test-envs`` (the few-shot class split as a leave-domains-out split).
- ``OmniglotSmall``: the two reduced background sets ``images_background_small1`` / ``_small2``; domains
  are their 8 distinct alphabets, the 3 found only in small2 are the default test domains.
- ``load_one_shot_runs``: the official 20 runs of 20-way within-alphabet one-shot classification.

Images are inverted (strokes 1, background 0) and resized with Lanczos to 28x28. With the hparam
``rotation_classes`` every character rotated by 90, 180 and 270 degrees is a class of its own (the
standard augmentation of Santoro et al. 2016 and Vinyals et al. 2016): class ``4 c + r``.

Character ids are global (numbered across alphabets in domain order), so the episode protocol is
``class_pool``: an episode's classes are drawn from all training alphabets together, and test episodes
from all held-out alphabets together, rather than one alphabet per episode: Vinyals et al. 2016 (Sec. 4.1.1)
split Omniglot by character (1,200 train, 423 test), and MAML's official ``data_generator.py``
(``DataGenerator.__init__``, ``'omniglot'``) shuffles all characters into one pool before splitting and
samples each task's classes from that pool. Here the pools are whole alphabets (Lake et al.'s split).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dg_meta.dataset import Domain, MultiDomainDataset
from dg_meta.errors import UsageError
from dg_meta.hparams import HParam, choice
from dg_meta.registry import register_dataset

SIDE = 28
BACKGROUND_ALPHABETS = [
    "Alphabet_of_the_Magi", "Anglo-Saxon_Futhorc", "Arcadian", "Armenian", "Asomtavruli_(Georgian)", "Balinese",
    "Bengali", "Blackfoot_(Canadian_Aboriginal_Syllabics)", "Braille", "Burmese_(Myanmar)", "Cyrillic",
    "Early_Aramaic", "Futurama", "Grantha", "Greek", "Gujarati", "Hebrew", "Inuktitut_(Canadian_Aboriginal_Syllabics)",
    "Japanese_(hiragana)", "Japanese_(katakana)", "Korean", "Latin", "Malay_(Jawi_-_Arabic)", "Mkhedruli_(Georgian)",
    "N_Ko", "Ojibwe_(Canadian_Aboriginal_Syllabics)", "Sanskrit", "Syriac_(Estrangelo)", "Tagalog", "Tifinagh",
]
EVALUATION_ALPHABETS = [
    "Angelic", "Atemayar_Qelisayer", "Atlantean", "Aurek-Besh", "Avesta", "Ge_ez", "Glagolitic", "Gurmukhi",
    "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sylheti",
    "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG",
]
SMALL1_ALPHABETS = ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
SMALL2_ONLY_ALPHABETS = ["Japanese_(katakana)", "Sanskrit", "Tagalog"]
ROTATION_HPARAM = {
    "rotation_classes": HParam(True, choice([True, False]),
                               doc="characters rotated by 90/180/270 degrees are extra classes"),
}


def load_image(path: Path, side: int = SIDE) -> Tensor:
    """One Omniglot PNG as a float ``[1, side, side]`` tensor, strokes 1 and background 0."""
    with Image.open(path) as image:
        gray = image.convert("L").resize((side, side), Image.LANCZOS)
    return torch.from_numpy(1.0 - np.asarray(gray, dtype=np.float32) / 255.0).unsqueeze(0)


def _find_root(root: str | None, needed: list[str], what: str, layout: str) -> Path:
    base = Path(root or ".")
    candidates = [base, base / "omniglot-py", base / "omniglot"]
    for candidate in candidates:
        if all((candidate / name).is_dir() for name in needed):
            return candidate
    looked = ", ".join(str(c.resolve()) for c in candidates)
    raise UsageError(f"{what} not found: expected {' and '.join(f'{n}/' for n in needed)} ({layout}) in one of "
                     f"{looked}; pass --data-dir DATA_DIR")


def _read_alphabet(folder: Path) -> list[Tensor]:
    """Every character of the alphabet in ``folder`` (sorted), each ``[drawings, 1, 28, 28]``."""
    characters = sorted(p for p in folder.iterdir() if p.is_dir())
    out = []
    for character in characters:
        drawings = sorted(character.glob("*.png"))
        if not drawings:
            raise UsageError(f"Omniglot character folder {character} holds no .png drawings")
        out.append(torch.stack([load_image(p) for p in drawings]))
    if not out:
        raise UsageError(f"Omniglot alphabet folder {folder} holds no character folders")
    return out


class RotatedClassesDomain(Domain):
    """A domain of base images whose rotated copies are extra classes, rotated on fetch.

    Example ``r * M + i`` (``M`` base images) is base image ``i`` rotated by ``r * 90`` degrees, with
    label ``rotations * base_label + r``; ``rotations = 1`` is the plain domain.
    """

    def __init__(self, name: str, images: Tensor, base_labels: Tensor, rotations: int):
        labels = torch.cat([base_labels * rotations + r for r in range(rotations)])
        super().__init__(name, labels)
        self.images = images
        self.n_base = len(images)

    def fetch(self, idx: Tensor) -> Tensor:
        idx = idx.cpu()
        turns = idx // self.n_base
        x = self.images[(idx % self.n_base).to(self.images.device)]
        for k in turns.unique().tolist():
            if k:
                mask = (turns == k).to(x.device)
                x[mask] = torch.rot90(x[mask], k, (2, 3))
        return x

    def to(self, device: torch.device | str) -> RotatedClassesDomain:
        super().to(device)
        self.images = self.images.to(self.device)
        return self


class _OmniglotDomains(MultiDomainDataset):
    """Shared construction: one domain per alphabet folder, global character ids in domain order."""

    INPUT_SHAPE = (1, SIDE, SIDE)
    EPISODE_PROTOCOL = "class_pool"
    N_STEPS = 5001
    CHECKPOINT_FREQ = 500
    HPARAMS = ROTATION_HPARAM

    def _build(self, folders: list[Path]) -> None:
        rotations = 4 if self.hparams.get("rotation_classes", True) else 1
        first = 0
        for name, folder in zip(self.ENVIRONMENTS, folders):
            characters = _read_alphabet(folder)
            labels = torch.cat([torch.full((len(c),), first + i) for i, c in enumerate(characters)])
            self.domains.append(RotatedClassesDomain(name, torch.cat(characters), labels, rotations))
            first += len(characters)
        self._num_classes = first * rotations

    @property
    def num_classes(self) -> int:
        return self._num_classes


@register_dataset
class Omniglot(_OmniglotDomains):
    """Omniglot in torchvision's layout: 50 alphabets as domains (30 background then 20 evaluation),
    1,623 characters x 20 drawings, 28x28; the evaluation alphabets are the default test domains."""

    ENVIRONMENTS = BACKGROUND_ALPHABETS + EVALUATION_ALPHABETS
    NUM_CLASSES = 1623
    DEFAULT_TEST_ENVS = list(range(len(BACKGROUND_ALPHABETS), len(BACKGROUND_ALPHABETS) + len(EVALUATION_ALPHABETS)))

    def __init__(self, root: str | None, hparams: dict):
        super().__init__(root, hparams)
        layout = "torchvision's omniglot-py layout, <alphabet>/<character>/<drawing>.png"
        base = _find_root(root, ["images_background", "images_evaluation"], "Omniglot", layout)
        folders = [base / "images_background" / a for a in BACKGROUND_ALPHABETS]
        folders += [base / "images_evaluation" / a for a in EVALUATION_ALPHABETS]
        missing = [f"{f.parent.name}/{f.name}" for f in folders if not f.is_dir()]
        if missing:
            raise UsageError(f"Omniglot in {base} lacks {len(missing)} of the 50 alphabet folders "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        self._build(folders)


@register_dataset
class OmniglotSmall(_OmniglotDomains):
    """Omniglot's two reduced background sets: the 8 distinct alphabets of ``images_background_small1``
    (5) and ``images_background_small2`` (5; Greek and Latin are in both) as domains, 242 characters x
    20 drawings, 28x28; the 3 alphabets only in small2 are the default test domains."""

    ENVIRONMENTS = SMALL1_ALPHABETS + SMALL2_ONLY_ALPHABETS
    NUM_CLASSES = 242
    DEFAULT_TEST_ENVS = [5, 6, 7]
    N_STEPS = 2001
    CHECKPOINT_FREQ = 250

    def __init__(self, root: str | None, hparams: dict):
        super().__init__(root, hparams)
        sets = ["images_background_small1", "images_background_small2"]
        base = _find_root(root, sets, "Omniglot small sets", "<alphabet>/<character>/<drawing>.png")
        folders = [base / sets[0] / a for a in SMALL1_ALPHABETS] + [base / sets[1] / a for a in SMALL2_ONLY_ALPHABETS]
        missing = [f"{f.parent.name}/{f.name}" for f in folders if not f.is_dir()]
        if missing:
            raise UsageError(f"Omniglot small sets in {base} lack the alphabet folders {', '.join(missing)}")
        self._build(folders)


@dataclass
class OneShotRun:
    """One official 20-way one-shot run: 20 training images (labels 0..19) and 20 test images."""

    name: str
    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


def load_one_shot_runs(root: str | Path | None) -> list[OneShotRun]:
    """The official runs ``one_shot_runs/run01..run20`` (``training/classNN.png``, ``test/itemNN.png``,
    ``class_labels.txt`` pairing each test image with its training image), found in ``root``,
    ``root/omniglot`` or ``root/omniglot-py``."""
    layout = "run01..run20, each with training/, test/ and class_labels.txt"
    folder = _find_root(str(root) if root is not None else None, ["one_shot_runs"], "Omniglot one-shot runs",
                        layout) / "one_shot_runs"
    runs = []
    for i in range(1, 21):
        run_dir = folder / f"run{i:02d}"
        labels_file = run_dir / "class_labels.txt"
        if not labels_file.is_file():
            raise UsageError(f"Omniglot one-shot run {run_dir} lacks class_labels.txt (expected {layout})")
        train_names = sorted(p.name for p in (run_dir / "training").glob("*.png"))
        pairs = [line.split() for line in labels_file.read_text().splitlines() if line.strip()]
        query_y = [train_names.index(Path(train).name) for _, train in pairs]
        runs.append(OneShotRun(
            name=run_dir.name,
            support_x=torch.stack([load_image(run_dir / "training" / n) for n in train_names]),
            support_y=torch.arange(len(train_names)),
            query_x=torch.stack([load_image(folder / test) for test, _ in pairs]),
            query_y=torch.tensor(query_y),
        ))
    return runs
