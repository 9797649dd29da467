"""Images per second through the image-folder training pipeline (decode + DomainBed augmentation + collate).

Runs PACS (default: ``../shared/data/PACS_small``) through ``Domain.for_training().fetch`` exactly as the
training sampler does: batches of ``--batch-size`` random indices, cycling over the domains, for 1, 2 and
the default number of DataLoader workers (``min(8, usable CPUs)``). Worker start-up (the first batch) is
reported separately as ``startup_s``. Prints one JSON object; ``--output`` also writes it to a file.

    python bench/image_pipeline.py [--data-dir DIR] [--image-size 224] [--batches 12] [--output out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from dg_meta.datasets.image_folder import PACS, default_num_workers

from dg_meta.atomic import atomic_write_text
from dg_meta.hparams import declared_hparams, resolve

REPO = Path(__file__).resolve().parents[1]


def measure(root: str, workers: int, image_size: int, batch_size: int, batches: int, seed: int = 0) -> dict:
    """Images/s of ``batches`` training fetches with ``workers`` DataLoader workers."""
    hparams = resolve(declared_hparams(PACS), 0, {"image_size": image_size})
    dataset = PACS(root, hparams, num_workers=workers)
    generator = torch.Generator().manual_seed(seed)
    domains = [d.for_training() for d in dataset.domains]

    def fetch(i: int) -> None:
        domain = domains[i % len(domains)]
        domain.fetch(torch.randperm(len(domain), generator=generator)[:batch_size])

    start = time.perf_counter()
    fetch(0)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(1, batches + 1):
        fetch(i)
    elapsed = time.perf_counter() - start
    dataset.close()
    return {"workers": workers, "images_per_s": round(batches * batch_size / elapsed, 1),
            "s_per_batch": round(elapsed / batches, 4), "startup_s": round(startup, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "PACS_small"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker counts to measure (default: 1, 2 and the default count)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args()
    counts = args.workers or sorted({1, 2, default_num_workers()})
    torch.manual_seed(0)
    result = {
        "benchmark": "image_pipeline", "dataset": "PACS", "data_dir": args.data_dir,
        "image_size": args.image_size, "batch_size": args.batch_size, "batches": args.batches,
        "default_workers": default_num_workers(), "cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__, "python": platform.python_version(),
        "runs": [measure(args.data_dir, w, args.image_size, args.batch_size, args.batches) for w in counts],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        atomic_write_text(args.output, text + "\n")


if __name__ == "__main__":
    main()
