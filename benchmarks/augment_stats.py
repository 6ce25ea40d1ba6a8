"""Each augmentation option's training samples against the reference YOLOv8's on the same images, side by
side: boxes per sample, grey fraction, box size quartiles (sqrt of the area, px) and mean box centre height
(fraction of S), with the ratio ours / reference and each side's change from its default recipe (the first
option run on the same labels).

Usage:
    python benchmarks/augment_stats.py --reference-python REF/bin/python [--samples 1024] [--image-size 640]

Default data: coco128 (../shared/data). Every option runs alone on the default recipe (mosaic 1.0, affine
translate 0.1 and scale 0.5, flip lr 0.5), with the HSV gains off on both sides so that grey padding stays
exactly 114. Copy-paste needs polygons: its rows, and a default recipe beside them, give the reference polygon
labels (from which it also derives its boxes after the warp, keeping boxes down to 1 % of their area instead
of 10 %: its default recipe differs on them; this project does so with ``polygon_boxes``, and warps box
corners without). Samples: ``--samples`` per option and side, shuffled epochs; the reference draws its mosaic
partners from its buffer of recent images (which starts empty: the first samples' partners come from the
first few images), this project uniformly from the dataset; ``--reference-partners dataset`` makes the
reference draw them as this project does (``reference_partners.py``). The reference runs in its own venv
(``python -m venv ref && ref/bin/pip install ultralytics==8.2.103``), through benchmarks/reference_augment.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from reference_partners import add_partners_option
from sample_statistics import sample_numbers, summary

from sta_lightning.data import AugmentConfig
from sta_lightning.data.coco_index import load_coco_index
from sta_lightning.data.dataset import COCODetectionDataset
from sta_lightning.data.transforms import TrainAugmentation
from sta_lightning.data.yolo_format import write_split

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REFERENCE_SCRIPT = Path(__file__).with_name("reference_augment.py")
COLOUR_OFF = {"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}
OPTIONS = {
    "default recipe": {},
    "flipud 1.0": {"flipud": 1.0},
    "mixup 1.0": {"mixup": 1.0},
    "degrees 10": {"degrees": 10.0},
    "shear 10": {"shear": 10.0},
    "perspective 0.001": {"perspective": 0.001},
    "default recipe, polygon labels": {},
    "copy_paste 1.0": {"copy_paste": 1.0},
    "polygon_boxes": {"polygon_boxes": True},
    "copy_paste 1.0, polygon_boxes": {"copy_paste": 1.0, "polygon_boxes": True},
}
POLYGON_LABELS = {
    "default recipe, polygon labels",
    "copy_paste 1.0",
    "polygon_boxes",
    "copy_paste 1.0, polygon_boxes",
}
"""Options whose reference side reads polygon labels (from which it derives its boxes, as ``polygon_boxes``
makes this project do; the reference has no such option)."""


def our_numbers(index, size: int, option: dict, samples: int, seed: int) -> list[dict]:
    dataset = COCODetectionDataset(
        index,
        size,
        TrainAugmentation(size, AugmentConfig(**COLOUR_OFF, **option)),
        mixup=option.get("mixup", 0.0),
    )
    dataset.seed = seed
    order = np.random.default_rng(seed)
    numbers = []
    while len(numbers) < samples:
        dataset.epoch += 1
        for i in order.permutation(len(dataset)).tolist()[: samples - len(numbers)]:
            sample = dataset[i]
            numbers.append(
                sample_numbers(sample["image"].numpy().transpose(1, 2, 0), sample["boxes"].numpy(), size)
            )
    return numbers


def reference_numbers(
    python: str, images: Path, size: int, option: dict, samples: int, seed: int, workdir: Path, partners: str
) -> list[dict]:
    job = {
        "images": str(images),
        "image_size": size,
        "samples": samples,
        "seed": seed,
        "mosaic_partners": partners,
        "hyp": {**COLOUR_OFF, **{name: value for name, value in option.items() if name != "polygon_boxes"}},
    }
    job_file = workdir / "augment_job.json"
    job_file.write_text(json.dumps(job))
    environment = {
        **os.environ,
        "YOLO_OFFLINE": "1",
        "YOLO_CONFIG_DIR": str(workdir / "config"),
        "PYTHONPATH": str(REFERENCE_SCRIPT.parent),
    }
    completed = subprocess.run(
        [python, str(REFERENCE_SCRIPT), str(job_file)], capture_output=True, text=True, env=environment
    )
    if completed.returncode != 0:
        sys.exit(f"the reference failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reference-python", required=True, help="python of a venv with ultralytics==8.2.103"
    )
    parser.add_argument("--images", default=str(SHARED_DATA / "coco128" / "train2017"))
    parser.add_argument(
        "--annotations", default=str(SHARED_DATA / "coco128" / "annotations" / "instances_train2017.json")
    )
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    add_partners_option(parser)
    parser.add_argument(
        "--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS), metavar="OPTION"
    )
    args = parser.parse_args()
    index = load_coco_index(args.annotations, args.images)
    print(
        f"{len(index)} images of {args.images} at {args.image_size} px, {args.samples} samples per option "
        "and side, HSV off"
    )
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        write_split(args.annotations, args.images, workdir / "boxes", "train")
        write_split(args.annotations, args.images, workdir / "polygons", "train", polygons=True)
        print("| option | statistic | ours | reference | ratio | ours / default | reference / default |")
        print("|---|---|---|---|---|---|---|")
        defaults = {}
        for name in args.options:
            option, labels = OPTIONS[name], "polygons" if name in POLYGON_LABELS else "boxes"
            ours = summary(our_numbers(index, args.image_size, option, args.samples, args.seed))
            reference = summary(
                reference_numbers(
                    args.reference_python,
                    workdir / labels / "images/train",
                    args.image_size,
                    option,
                    args.samples,
                    args.seed,
                    workdir,
                    args.reference_partners,
                )
            )
            default = defaults.setdefault(labels, (ours, reference))
            for statistic, value in ours.items():
                effects = (value / default[0][statistic], reference[statistic] / default[1][statistic])
                print(
                    f"| {name} | {statistic} | {value:.4f} | {reference[statistic]:.4f} "
                    f"| {value / reference[statistic]:.3f} | {effects[0]:.3f} | {effects[1]:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
