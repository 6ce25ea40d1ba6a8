"""Time the reference YOLOv8's (Ultralytics) training samples; run by benchmarks/data.py in its own venv.

This file imports ``ultralytics`` and runs only under the interpreter given as ``--reference-python``
(``pip install ultralytics==8.2.103`` in a separate virtual environment); the project never imports it.

Usage: REF_PYTHON reference_data.py JOB.json, where the job holds ``images`` (the ``images/train`` folder of
a YOLO layout, labels beside it), ``image_size``, ``cache`` (null or "ram"), ``fresh_buffer``, ``seed`` and
optionally ``mosaic_partners`` ("buffer", the default, or "dataset").
It builds the reference's ``YOLODataset`` as its trainer does for training (default hyperparameters:
mosaic, affine, HSV, flip), one thread, prints ``{"ready": true}``, then answers each line N read from
stdin with one JSON line: ``images_per_second`` over the next N samples of a shuffled epoch order (wall
clock), ``cpu_images_per_second`` (this process's CPU time) and ``decodes`` (images read from file). An
empty line or end of input stops it.

The reference draws mosaic partners from a buffer of the images it loaded last (min(N, 8 x batch, 1000))
and keeps those in memory; on a dataset no larger than that buffer (coco128) it then reads no file after
the first epoch. ``fresh_buffer`` empties it before each round, so that every sample reads its one new image
as it does on a dataset larger than the buffer. ``mosaic_partners`` "dataset" draws a mosaic's partners
uniformly over the dataset, as this project does (the reference's ``Mosaic.get_indexes(buffer=False)``), and
keeps no loaded image (``max_buffer_length`` 0), so that each of a mosaic's 4 images is read from its file,
as on a dataset much larger than the buffer.
"""

import json
import random
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from reference_partners import draw_partners_from
from ultralytics.cfg import get_cfg
from ultralytics.data.dataset import YOLODataset


class CountingImread:
    """cv2.imread that counts its calls (the reference reads image files only through it)."""

    def __init__(self) -> None:
        self.calls = 0
        self.imread = cv2.imread

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.imread(*args, **kwargs)


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    random.seed(job["seed"])
    np.random.seed(job["seed"])
    hyp = get_cfg()
    dataset = YOLODataset(
        img_path=job["images"],
        imgsz=job["image_size"],
        batch_size=16,
        augment=True,
        hyp=hyp,
        rect=False,
        cache=job["cache"],
        stride=32,
        pad=0.0,
        data={"names": {i: str(i) for i in range(1000)}, "nc": 1000},
    )
    draw_partners_from(job.get("mosaic_partners", "buffer"))
    if job.get("mosaic_partners") == "dataset":
        dataset.max_buffer_length = 0  # keeps no loaded image, as on a dataset much larger than its buffer
    counter = CountingImread()
    cv2.imread = counter
    epochs = np.random.default_rng(job["seed"])
    order: list[int] = []
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        count, decodes = int(line), counter.calls
        if job["fresh_buffer"]:
            dataset.buffer.clear()
            dataset.ims, dataset.im_hw0, dataset.im_hw = ([None] * len(dataset) for _ in range(3))
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(count):
            if not order:
                order = epochs.permutation(len(dataset)).tolist()
            dataset[order.pop()]
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        result = {"images_per_second": count / seconds, "cpu_images_per_second": count / cpu_seconds}
        print(json.dumps({**result, "decodes": counter.calls - decodes}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
