"""The multi-domain dataset interface that every dataset family in ``dg_meta.datasets`` implements.

A dataset is a list of domains; each domain holds labels and fetches inputs by index, so samplers only
ever deal in indices. Small datasets are tensors in memory (moved once to the training device);
image-folder datasets implement ``Domain.fetch`` by decoding files.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from dg_meta.hparams import HParam, int_log2_uniform, positive
from dg_meta.splits import DomainSplits, split_domains

EPISODE_PROTOCOLS = ("class_pool", "per_domain")


class Domain:
    """One domain: ``labels`` (long, CPU) and ``batch(idx)`` giving ``(x, y)`` on the domain's device."""

    def __init__(self, name: str, labels: Tensor):
        self.name = name
        self.labels = labels.long().cpu()
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.labels)

    def fetch(self, idx: Tensor) -> Tensor:
        """The inputs at ``idx`` (a CPU long tensor), on ``self.device``."""
        raise NotImplementedError

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.fetch(idx), self.labels[idx].to(self.device, non_blocking=True)

    def fetch_part(self, idx: Tensor, part: slice) -> Tensor:
        """The inputs at ``idx[part]``, with the random draws of a fetch of all of ``idx`` (one process's share
        of a minibatch on several processes: the RNG moves on as in a single process). Default: ``fetch``, for
        domains whose fetch draws nothing."""
        own = idx[part]
        return self.fetch(own) if len(own) else torch.empty(0, device=self.device)

    def batch_part(self, idx: Tensor, part: slice) -> tuple[Tensor, Tensor]:
        """``batch(idx)`` restricted to ``idx[part]``, with the random draws of all of ``idx`` (``fetch_part``)."""
        return self.fetch_part(idx, part), self.labels[idx[part]].to(self.device, non_blocking=True)

    def for_training(self) -> Domain:
        """The domain as training samplers draw from it: with training-time augmentation where the dataset
        has one (image folders), else the domain itself. Evaluation always uses the domain itself."""
        return self

    def to(self, device: torch.device | str) -> Domain:
        self.device = torch.device(device)
        return self


class TensorDomain(Domain):
    """A domain held as one input tensor in memory (on the training device after ``to``)."""

    def __init__(self, name: str, x: Tensor, labels: Tensor):
        if len(x) != len(labels):
            raise ValueError(f"domain {name}: {len(x)} inputs but {len(labels)} labels")
        super().__init__(name, labels)
        self.x = x
        self._labels_dev = self.labels

    def fetch(self, idx: Tensor) -> Tensor:
        return self.x[idx.to(self.x.device)]

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        idx = idx.to(self.x.device, non_blocking=True)  # no host-device sync per training step
        return self.x[idx], self._labels_dev[idx]

    def batch_part(self, idx: Tensor, part: slice) -> tuple[Tensor, Tensor]:
        return self.batch(idx[part])  # indexing draws nothing

    def to(self, device: torch.device | str) -> TensorDomain:
        super().to(device)
        self.x = self.x.to(self.device)
        self._labels_dev = self.labels.to(self.device)
        return self


class MultiDomainDataset:
    """Base class of every dataset: its domains plus the protocol defaults that belong to the data.

    Subclasses set ``ENVIRONMENTS`` (domain names), ``INPUT_SHAPE``, ``NUM_CLASSES``, ``N_STEPS`` (default
    training steps), ``CHECKPOINT_FREQ`` and fill ``self.domains`` in ``__init__(root, hparams)``.
    ``HPARAMS`` declared here are shared by every algorithm trained on the dataset.

    ``EPISODE_PROTOCOL`` says how few-shot episodes are drawn (``dg_meta.samplers.EpisodeSampler``):
    ``"per_domain"`` (the default: DG and cross-domain few-shot datasets) draws each episode's classes from
    one domain; ``"class_pool"`` (class-split few-shot datasets whose domains are groups of globally numbered
    classes, e.g. Omniglot's alphabets) draws them from the pooled classes of all training domains, or of all
    held-out domains at test time. ``--episode-protocol`` overrides it.
    """

    ENVIRONMENTS: ClassVar[list[str]] = []
    INPUT_SHAPE: ClassVar[tuple[int, ...]] = ()
    NUM_CLASSES: ClassVar[int] = 0
    N_STEPS: ClassVar[int] = 5001
    CHECKPOINT_FREQ: ClassVar[int] = 100
    DEFAULT_TEST_ENVS: ClassVar[list[int]] = [0]
    EPISODE_PROTOCOL: ClassVar[str] = "per_domain"
    HPARAMS: ClassVar[dict[str, HParam]] = {
        "batch_size": HParam(64, int_log2_uniform(3, 9), positive, "a positive integer",
                             "examples per training domain per step"),
    }

    def __init__(self, root: str | None, hparams: dict):
        self.root = root
        self.hparams = hparams
        self.domains: list[Domain] = []

    def __len__(self) -> int:
        return len(self.domains)

    def __getitem__(self, i: int) -> Domain:
        return self.domains[i]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.INPUT_SHAPE)

    @property
    def num_classes(self) -> int:
        return self.NUM_CLASSES

    def split(self, test_envs: list[int], trial_seed: int, holdout_fraction: float) -> DomainSplits:
        """The in/out split of every domain: DomainBed's seeded holdout unless the dataset ships official
        splits (e.g. PACS's lists)."""
        return split_domains([len(d) for d in self.domains], test_envs, trial_seed, holdout_fraction)

    def to(self, device: torch.device | str) -> MultiDomainDataset:
        for domain in self.domains:
            domain.to(device)
        return self


class ClassSplitDataset(MultiDomainDataset):
    """A few-shot benchmark whose domains are its class splits ``train`` / ``val`` / ``test`` (miniImageNet,
    tieredImageNet, CUB, CIFAR-FS, FC100): episodes are drawn within one split (``per_domain``), ``val`` and
    ``test`` are held out by default, and training runs 60,001 episodes with a checkpoint every 2,000."""

    ENVIRONMENTS: ClassVar[list[str]] = ["train", "val", "test"]
    N_STEPS: ClassVar[int] = 60001
    CHECKPOINT_FREQ: ClassVar[int] = 2000
    DEFAULT_TEST_ENVS: ClassVar[list[int]] = [1, 2]
    EPISODE_PROTOCOL: ClassVar[str] = "per_domain"
