"""Train and predict with the reference YOLOv8 (Ultralytics); run by benchmarks/accuracy.py in its own venv.

This file imports ``ultralytics`` and runs only under the interpreter given as ``--reference-python``
(``pip install ultralytics==8.2.103`` in a separate virtual environment); the project never imports it.

Usage: REF_PYTHON reference_yolov8.py JOB.json, where the job holds ``data_yaml``, ``out_dir``, ``train``
(keyword arguments of ``YOLO.train``), ``model`` (a model yaml such as yolov8n.yaml), ``val_images`` (paths),
``predict`` (keyword arguments of ``YOLO.predict``) and optionally ``mosaic_partners``: "buffer" (the
reference's own choice, a mosaic's 3 partners from its buffer of recently loaded images) or "dataset"
(uniform over the dataset, as this project draws them: its ``Mosaic.get_indexes(buffer=False)``). Writes
``result.json`` in ``out_dir``: ``fit_seconds`` and ``detections``, per image path a list of
[x1, y1, x2, y2, score, class index] in original pixels, from the final (EMA) weights.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
from reference_partners import draw_partners_from
from ultralytics import YOLO
from ultralytics.utils import SETTINGS

# ultralytics 8.2 computes AP with np.trapz, which numpy 2.4 removed (np.trapezoid is the same function); its
# final validation needs it where its venv has numpy >= 2.4 (its own pin is numpy < 2, but a venv that shares
# this project's packages has the newer one).
if not hasattr(np, "trapz"):
    np.trapz = np.trapezoid

# The reference's integrations (W&B, TensorBoard, MLflow, ..., its usage events) stay off: the benchmark reads
# only its result, and W&B, importable in a venv that shares this project's packages, rejects the run's
# project path as a name. dict.update changes them for this process only (SETTINGS.update saves the file).
INTEGRATIONS = ("clearml", "comet", "dvc", "hub", "mlflow", "neptune", "raytune", "tensorboard", "wandb")
dict.update(SETTINGS, {name: False for name in (*INTEGRATIONS, "sync")})


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    out_dir = Path(job["out_dir"])
    draw_partners_from(job.get("mosaic_partners", "buffer"))
    model = YOLO(job["model"])
    start = time.perf_counter()
    model.train(data=job["data_yaml"], project=str(out_dir), name="train", exist_ok=True, **job["train"])
    fit_seconds = time.perf_counter() - start
    trained = YOLO(str(out_dir / "train" / "weights" / "last.pt"))
    detections = {}
    for path in job["val_images"]:
        (result,) = trained.predict(source=path, verbose=False, **job["predict"])
        boxes = result.boxes
        rows = boxes.xyxy.tolist()
        detections[path] = [
            [*row, score, int(cls)]
            for row, score, cls in zip(rows, boxes.conf.tolist(), boxes.cls.tolist(), strict=True)
        ]
    result_file = out_dir / "result.json"
    result_file.write_text(json.dumps({"fit_seconds": fit_seconds, "detections": detections}))


if __name__ == "__main__":
    main(sys.argv[1])
