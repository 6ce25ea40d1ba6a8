"""Data pipeline throughput per worker, and the cost of an epoch start with new or persistent workers.

1. Images per second for ONE worker (one process, one thread), JPEG decode included: training pipeline
   (read, resize, 4-image mosaic, affine, colour, flip, collate) and validation pipeline (read, resize,
   letterbox, collate) at the input size, on coco128 from ../shared/data when present, else the demo data.
   Prints the median over batches and the ratio to the 30 img/s per worker goal.
2. Epoch start: seconds from the start of an epoch (``iter`` of the training loader) to its first batch,
   median over epochs 2 to ``--epochs`` (epoch 1 starts the workers either way), with workers started anew
   for every epoch (``persistent_workers=False``, as before) and kept (the default), side by side, for
   (a) the demo config (demo data, 256 px, batch 16, 2 workers) and (b) a COCO-scale index (the data's
   images listed 118,287 times, as COCO train2017, 640 px, batch 16, 8 workers).

    python benchmarks/data.py [--image-size 640] [--batch-size 16] [--batches 6] [--epochs 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sta_lightning.data import COCODataModule, DemoDataModule  # noqa: E402

GOAL_IMAGES_PER_SECOND = 30.0
COCO_TRAIN_IMAGES = 118_287
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_datamodule(
    image_size: int, batch_size: int, workdir: Path, num_workers: int = 0, persistent_workers: bool = True
) -> tuple[COCODataModule, str]:
    common = dict(
        image_size=image_size,
        batch_size=batch_size,
        num_workers=num_workers,
        persistent_workers=persistent_workers,
    )
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


def epoch_start_seconds(dm: COCODataModule, epochs: int) -> float:
    """Median over epochs 2..``epochs`` of the seconds from ``iter`` of one training loader to its first batch
    (the rest of each epoch is not drawn)."""
    loader = dm.training_loader(0)
    times = []
    for epoch in range(epochs):
        dm.set_epoch(epoch, 10_000)
        loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        next(iter(loader))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def coco_scale(dm: COCODataModule) -> None:
    """List the training split's images over and over, up to the size of COCO train2017."""
    dataset = dm.datasets["train"]
    index = dataset.index
    tiles = -(-COCO_TRAIN_IMAGES // len(index))
    keep = np.arange(COCO_TRAIN_IMAGES) % len(index)
    counts = np.diff(index.box_starts)[keep]
    rows = np.tile(np.arange(len(index.boxes)), tiles)[: counts.sum()]  # boxes are stored in image order
    dataset.index = dataclasses.replace(
        index,
        image_ids=np.arange(COCO_TRAIN_IMAGES),
        file_names=index.file_names[keep],
        sizes=index.sizes[keep],
        exif_oriented=index.exif_oriented[keep],
        box_starts=np.concatenate([[0], np.cumsum(counts)]),
        boxes=index.boxes[rows],
        labels=index.labels[rows],
    )


def compare_epoch_starts(name: str, make, epochs: int) -> None:
    """Print the median epoch start with new and with persistent workers, and the saving."""
    seconds = {}
    for persistent in (False, True):
        dm = make(persistent)
        seconds[persistent] = epoch_start_seconds(dm, epochs)
    saving = seconds[False] - seconds[True]
    print(
        f"{name}: epoch start {seconds[False]:.2f} s with new workers, {seconds[True]:.2f} s with persistent "
        f"ones ({seconds[False] / seconds[True]:.1f}x; {saving:.2f} s saved per epoch start)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument(
        "--epochs", type=int, default=6, help="epoch starts measured per loader (first dropped)"
    )
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

    print(f"epoch starts, median of epochs 2-{args.epochs} (epoch 1 starts the workers either way):")
    with tempfile.TemporaryDirectory() as workdir:
        demo = DemoDataModule(root=str(Path(workdir) / "demo"), image_size=256)
        demo.prepare_data()

        def demo_config(persistent: bool) -> COCODataModule:
            dm = DemoDataModule(root=demo.root, image_size=256, num_workers=2, persistent_workers=persistent)
            dm.setup("fit")
            return dm

        def coco_sized(persistent: bool) -> COCODataModule:
            dm, _ = make_datamodule(640, 16, Path(workdir), num_workers=8, persistent_workers=persistent)
            dm.setup("fit")
            coco_scale(dm)
            return dm

        compare_epoch_starts("demo config (2 workers)", demo_config, args.epochs)
        compare_epoch_starts(
            f"COCO-scale index ({COCO_TRAIN_IMAGES} images, 8 workers)", coco_sized, args.epochs
        )


if __name__ == "__main__":
    main()
