"""Data pipeline throughput per worker, side by side with the reference, and the cost of an epoch start.

0. With ``--reference-python`` (the python of a venv with ``ultralytics==8.2.103``, never this project's):
   training samples per second of this project's ``COCODetectionDataset`` and of the reference's
   ``YOLODataset`` (benchmarks/reference_data.py, run by that python), one process and one thread each, on
   the same images (``--images``/``--annotations``, default coco128 from ../shared/data) at ``--image-size``
   with the default recipe (mosaic, affine, HSV, flip), JPEG decoding included, in alternating rounds of
   ``--round-images`` samples of a shuffled epoch: uncached (the reference reading one new image per sample,
   as on a dataset larger than its buffer of recent images; ours with mosaic partners from the whole dataset
   and, a third side, from groups of ``--mosaic-group`` consecutive images of the epoch's order) and cached
   (ours: ``cache="ram"``; the reference's ``cache="ram"``). One more side is the reference with mosaic
   partners drawn from the whole dataset, as ours are (its ``Mosaic.get_indexes(buffer=False)``, keeping no
   loaded image): the same kind of samples, hence the same decoding work per sample. Prints each side's
   median images/s, the decodes per sample and the ratios.
   ``--compare-only`` skips parts 1 and 2.
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
        [--reference-python REF/bin/python] [--rounds 7] [--round-images 64] [--mosaic-group 16]
        [--compare-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sta_lightning.data import COCODataModule, DemoDataModule  # noqa: E402
from sta_lightning.data.coco_index import load_coco_index  # noqa: E402
from sta_lightning.data.config import LoaderConfig, Split  # noqa: E402
from sta_lightning.data.dataset import COCODetectionDataset  # noqa: E402
from sta_lightning.data.order import epoch_order  # noqa: E402
from sta_lightning.data.transforms import TrainAugmentation  # noqa: E402
from sta_lightning.data.yolo_format import write_split  # noqa: E402

GOAL_IMAGES_PER_SECOND = 30.0
COCO_TRAIN_IMAGES = 118_287
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REFERENCE_SCRIPT = Path(__file__).with_name("reference_data.py")


class OurSamples:
    """Training samples of this project's dataset, timed round by round over its epochs' orders."""

    def __init__(self, dataset: COCODetectionDataset) -> None:
        self.dataset = dataset
        dataset.epoch = -1
        self.order: list[int] = []
        self.decodes = 0
        read = dataset._read

        def counting_read(i: int) -> np.ndarray:
            self.decodes += 1
            return read(i)

        dataset._read = counting_read

    def round(self, count: int) -> dict:
        """Images per second over the next ``count`` samples (wall clock and this process's CPU time), and the
        images decoded for them."""
        decodes, start, cpu_start = self.decodes, time.perf_counter(), time.process_time()
        for _ in range(count):
            if not self.order:
                self.dataset.epoch += 1
                self.order = epoch_order(self.dataset.seed, self.dataset.epoch, len(self.dataset)).tolist()
            self.dataset[self.order.pop(0)]
        return {
            "images_per_second": count / (time.perf_counter() - start),
            "cpu_images_per_second": count / (time.process_time() - cpu_start),
            "decodes": self.decodes - decodes,
        }


class ReferenceSamples:
    """The reference's training samples, timed by benchmarks/reference_data.py in the reference's python."""

    def __init__(
        self,
        python: str,
        images: Path,
        image_size: int,
        cache: str | None,
        workdir: Path,
        mosaic_partners: str = "buffer",
    ) -> None:
        name = f"reference-data-{cache or 'uncached'}-{mosaic_partners}"
        job = workdir / f"{name}.json"
        settings = {"images": str(images), "image_size": image_size, "cache": cache, "seed": 0}
        job.write_text(
            json.dumps({**settings, "fresh_buffer": cache is None, "mosaic_partners": mosaic_partners})
        )
        env = {
            **os.environ,
            "YOLO_OFFLINE": "1",
            "YOLO_CONFIG_DIR": str(workdir / "ultralytics"),
            "PYTHONPATH": "",
            "OMP_NUM_THREADS": "1",
        }
        self.log = (workdir / f"{name}.log").open("w")
        self.process = subprocess.Popen(
            [python, str(REFERENCE_SCRIPT), str(job)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self._answer()

    def _answer(self) -> dict:
        """The script's next JSON line (its other output, the reference's log, goes to the log file)."""
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
            self.log.write(line)
        self.log.close()
        log = Path(self.log.name).read_text().splitlines()[-20:]
        sys.exit("the reference's data script stopped; the end of its log:\n" + "\n".join(log))

    def round(self, count: int) -> dict:
        self.process.stdin.write(f"{count}\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
        self.log.close()


def compare_with_reference(args: argparse.Namespace) -> None:
    """Part 0 (module docstring): alternating rounds of ours and the reference's, uncached and cached."""
    size = args.image_size
    index = load_coco_index(args.annotations, args.images)
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        write_split(args.annotations, args.images, workdir / "yolo", "train")
        start = time.perf_counter()
        cached = COCODetectionDataset(index, size, TrainAugmentation(size), cache="ram")
        fill_seconds = time.perf_counter() - start
        sides = {
            "ours": OurSamples(COCODetectionDataset(index, size, TrainAugmentation(size))),
            f"ours, group {args.mosaic_group}": OurSamples(
                COCODetectionDataset(index, size, TrainAugmentation(size), mosaic_group=args.mosaic_group)
            ),
            "reference": ReferenceSamples(
                args.reference_python, workdir / "yolo/images/train", size, None, workdir
            ),
            "reference, dataset": ReferenceSamples(
                args.reference_python, workdir / "yolo/images/train", size, None, workdir, "dataset"
            ),
            "ours, cached": OurSamples(cached),
            "reference, cached": ReferenceSamples(
                args.reference_python, workdir / "yolo/images/train", size, "ram", workdir
            ),
        }
        results: dict[str, list[dict]] = {name: [] for name in sides}
        for round_number in range(args.rounds + 1):  # round 0 warms up and is left out
            for name, side in sides.items():
                result = side.round(args.round_images)
                if round_number:
                    results[name].append(result)
        for side in sides.values():
            if isinstance(side, ReferenceSamples):
                side.close()
    print(
        f"training samples of {len(index)} images ({args.images}) at {size} px, mosaic, 1 process, 1 thread; "
        f"median of {args.rounds} alternating rounds of {args.round_images} samples, by the wall clock (by "
        "each process's CPU time, less sensitive to other load on the machine)"
    )
    rates = {}
    for clock in ("images_per_second", "cpu_images_per_second"):
        rates[clock] = {name: statistics.median(r[clock] for r in rounds) for name, rounds in results.items()}
    for name, rounds in results.items():
        decodes = sum(r["decodes"] for r in rounds) / (len(rounds) * args.round_images)
        print(
            f"  {name:>18}: {rates['images_per_second'][name]:6.1f} images/s "
            f"({rates['cpu_images_per_second'][name]:6.1f}), {decodes:.2f} images decoded per sample"
        )
    print(
        f"  our cache: {cached.cache.nbytes / 2**20:.1f} MiB of shared memory, filled in {fill_seconds:.1f} "
        "s; the reference's uncached rounds read one new image per sample (its buffer emptied per round), "
        "'reference, dataset' draws mosaic partners from the whole dataset, as ours does"
    )
    for ours, reference in (
        ("ours", "reference"),
        ("ours", "reference, dataset"),
        (f"ours, group {args.mosaic_group}", "reference"),
        ("ours, cached", "reference"),
        ("ours, cached", "reference, cached"),
    ):
        wall, cpu = (rates[clock][ours] / rates[clock][reference] for clock in rates)
        print(f"  {ours} / {reference}: {wall:.2f}x ({cpu:.2f}x)")


def make_datamodule(
    image_size: int, batch_size: int, workdir: Path, num_workers: int = 0, persistent_workers: bool = True
) -> tuple[COCODataModule, str]:
    loader = LoaderConfig(
        batch_size=batch_size, num_workers=num_workers, persistent_workers=persistent_workers
    )
    common = dict(image_size=image_size, loader=loader)
    coco128 = SHARED_DATA / "coco128"
    if coco128.is_dir():
        split = Split(str(coco128 / "train2017"), str(coco128 / "annotations" / "instances_train2017.json"))
        dm = COCODataModule(train=split, val=split, **common)
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
    parser.add_argument("--reference-python", help="python of a venv with ultralytics==8.2.103 (part 0)")
    parser.add_argument("--images", default=str(SHARED_DATA / "coco128" / "train2017"), help="part 0")
    parser.add_argument(
        "--annotations", default=str(SHARED_DATA / "coco128" / "annotations" / "instances_train2017.json")
    )
    parser.add_argument("--rounds", type=int, default=7, help="part 0: rounds measured per side")
    parser.add_argument("--round-images", type=int, default=64, help="part 0: samples per round")
    parser.add_argument(
        "--mosaic-group", type=int, default=16, help="part 0: data.augment.mosaic_group of the grouped side"
    )
    parser.add_argument("--compare-only", action="store_true", help="run part 0 only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if args.reference_python:
        compare_with_reference(args)
    if args.compare_only:
        return
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
            loader = LoaderConfig(num_workers=2, persistent_workers=persistent)
            dm = DemoDataModule(root=demo.root, image_size=256, loader=loader)
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
