"""Data pipeline throughput: images per second for ONE worker (one process, one thread), JPEG decode included.

Training pipeline (read, resize, 4-image mosaic, affine, colour, flip, collate) and validation pipeline
(read, resize, letterbox, collate) at the input size, on coco128 from ../shared/data when present, else the
demo data.
Prints the median over batches and the ratio to the 30 img/s per worker goal.

    python benchmarks/data.py [--image-size 640] [--batch-size 16] [--batches 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import torch  # noqa: E402

from sta_lightning.data import COCODataModule, DemoDataModule  # noqa: E402

GOAL_IMAGES_PER_SECOND = 30.0
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_datamodule(image_size: int, batch_size: int, workdir: Path) -> tuple[COCODataModule, str]:
    common = dict(image_size=image_size, batch_size=batch_size, num_workers=0)
    coco128 = SHARED_DATA / "coco128"
    if coco128.is_dir():
        split = (str(coco128 / "train2017"), str(coco128 / "annotations" / "instances_train2017.json"))
        dm = COCODataModule(*split, *split, **common)
        return dm, "coco128 (real COCO JPEGs)"
    dm = DemoDataModule(root=str(workdir / "demo"), **common)
    dm.prepare_data()
    return dm, "demo shapes (coco128 not found)"


def images_per_second(loader, batches: int) -> float:
    """Median images/s over ``batches`` batches (at most one epoch; the first, warm-up batch excluded)."""
    batches = min(batches, len(loader) - 1)
    rates = []
    iterator = iter(loader)
    next(iterator)
    for _ in range(batches):
        start = time.perf_counter()
        batch = next(iterator)
        rates.append(len(batch["image_ids"]) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as workdir:
        dm, source = make_datamodule(args.image_size, args.batch_size, Path(workdir))
        dm.setup("fit")
        torch.manual_seed(0)
        train = images_per_second(dm.train_dataloader(), args.batches)
        val = images_per_second(dm.val_dataloader(), args.batches)
    print(f"data: {source}, input {args.image_size}, batch {args.batch_size}, 1 process, 1 thread")
    ratio = train / GOAL_IMAGES_PER_SECOND
    print(f"train pipeline (mosaic): {train:6.1f} img/s per worker = {ratio:.2f}x the 30 img/s goal")
    print(f"val pipeline (letterbox): {val:6.1f} img/s per worker = {val / train:.1f}x the train pipeline")


if __name__ == "__main__":
    main()
