"""Shared test fixtures: the location of ``../shared`` (skipping when absent) and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    return Path(os.environ.get("DG_META_SHARED", REPO.parent / "shared"))


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (or ``$DG_META_SHARED/data``); skips the test when it is absent."""
    data = shared_root() / "data"
    if not data.is_dir():
        pytest.skip(f"shared data not found at {data} (set DG_META_SHARED to the shared/ folder)")
    return data


@pytest.fixture
def mnist_root(shared_data: Path) -> Path:
    if not (shared_data / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found under {shared_data}")
    return shared_data


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m dg_meta.train ARGS`` and capture its output (text)."""
    return subprocess.run([sys.executable, "-m", "dg_meta.train", *args, "--no-progress"], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)



#: one unit of work each for pytest-xdist: modules whose module-scoped fixtures are expensive (a Slurm sweep, local
#: sweeps, TensorBoard runs), so they run once, and the threads engine's module, whose cases run two threads: two
#: such cases at once on the two workers oversubscribe two cores (measured 16 s per case instead of 0.6 s)
ONE_WORKER_MODULES = frozenset({"tests/test_slurm.py", "tests/test_sweep.py", "tests/test_tensorboard.py",
                                "tests/test_batched_tasks.py"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked slow first, the rest in file order (see ``pytest_xdist_make_scheduler``)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under ``-n 2`` (the README's command): each worker takes the next unit of work (one test, or one module of
    ``ONE_WORKER_MODULES``) when it is nearly idle, slow tests first, so the long tests start early and the two
    workers end together. xdist's default hands out contiguous chunks of the file order instead: measured
    2026-12-01, one worker ended at 491 s while the other ran the slow tests of tests/test_train.py alone until
    600 s. (``--dist loadgroup`` would do this with marks, but it does not group under pytest 9.)"""
    from xdist.scheduler import LoadScopeScheduling

    class OneTestOrOneModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER_MODULES else nodeid

    return OneTestOrOneModule(config, log)
