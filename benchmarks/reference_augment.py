"""The reference YOLOv8's (Ultralytics) training samples under one augmentation setting, as numbers; run by
benchmarks/augment_stats.py in the reference's own venv (``pip install ultralytics==8.2.103``), never
imported by the project.

Usage: REF_PYTHON reference_augment.py JOB.json, where the job holds ``images`` (the ``images/train`` folder
of a YOLO layout, labels beside it), ``image_size``, ``samples``, ``seed`` and ``hyp`` (overrides of the
reference's default hyperparameters) and optionally ``mosaic_partners`` ("buffer", its default, or "dataset":
``reference_partners``). Prints one JSON line: ``sample_numbers`` of each sample.
"""

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from reference_partners import draw_partners_from
from sample_statistics import sample_numbers
from ultralytics.cfg import get_cfg
from ultralytics.data.dataset import YOLODataset


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    random.seed(job["seed"])
    np.random.seed(job["seed"])
    torch.manual_seed(job["seed"])
    draw_partners_from(job.get("mosaic_partners", "buffer"))
    size = job["image_size"]
    dataset = YOLODataset(
        img_path=job["images"],
        imgsz=size,
        batch_size=16,
        augment=True,
        hyp=get_cfg(overrides=job["hyp"]),
        rect=False,
        cache=None,
        stride=32,
        pad=0.0,
        data={"names": {i: str(i) for i in range(1000)}, "nc": 1000},
    )
    order = np.random.default_rng(job["seed"])
    numbers = []
    while len(numbers) < job["samples"]:
        for i in order.permutation(len(dataset)).tolist()[: job["samples"] - len(numbers)]:
            sample = dataset[i]
            image = sample["img"].numpy().transpose(1, 2, 0)
            cx, cy, w, h = (sample["bboxes"].numpy().reshape(-1, 4) * size).T  # normalised xywh
            boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
            numbers.append(sample_numbers(image, boxes, size))
    print(json.dumps(numbers))


if __name__ == "__main__":
    main(sys.argv[1])
