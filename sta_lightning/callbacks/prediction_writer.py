"""Write ``predict`` results as COCO json (and optionally images with the boxes drawn), and the detections
that ``test`` evaluated as a COCO results file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import cv2
import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from sta_lightning.callbacks.drawing import draw_detections
from sta_lightning.callbacks.image_logging import run_folder
from sta_lightning.distributed import gather_on_rank_zero
from sta_lightning.geometry import read_image
from sta_lightning.metrics.coco import coco_results
from sta_lightning.training.module import DetectionModule

DETECTIONS_FILE = "predictions.json"
IMAGES_FILE = "images.json"
TEST_RESULTS_FILE = "test_results.json"


class PredictionWriter(BasePredictionWriter):
    """Collects ``DetectionModule.predict_step`` outputs and, at the end, writes into ``output_dir``:

    - ``predictions.json``: COCO results, a list of {"image_id", "category_id", "bbox" [x, y, w, h] in
      original image pixels, "score"}; class indices are mapped to the model's category ids;
    - ``images.json``: {"images": [{"id", "file_name", "height", "width"}], "categories": [{"id", "name"}],
      "annotations": []}, so ``COCO("images.json").loadRes("predictions.json")`` works;
    - with ``render``: ``images/<image id>_<file stem>.<image_format>`` (ids number the inputs from 0, so
      equal names from different folders do not collide), each image with its boxes and "class score"
      labels.

    Under DDP the ranks' results are gathered and written once by rank 0 (images repeated by the sampler's
    padding are kept once). ``output_dir`` None means ``predictions/`` in the run folder (the logger's log
    dir). With an annotation file (``data.predict_annotations``) image ids and category ids are that
    file's; without one, ids number the inputs from 0.

    After ``test``, the detections that the COCO evaluation scored (gathered from every rank, each image
    once) are written by global rank 0 as ``test_results.json`` in the run folder: COCO results with the
    annotation file's image and category ids and exact boxes in its pixel frame, the format of a COCO
    test-dev submission; pycocotools scores it to the metrics that ``test`` logged.
    """

    def __init__(
        self, output_dir: str | None = None, render: bool = False, image_format: Literal["jpg", "png"] = "jpg"
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.render = render
        self.image_format = image_format
        self._results: list[dict[str, Any]] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._results = []

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        for result in prediction:
            self._results.append({**result, "detections": result["detections"].numpy()})

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: DetectionModule) -> None:
        results = gather_on_rank_zero(self._results)
        if results is not None:  # global rank 0
            unique = {result["image_id"]: result for result in results}
            self.write(sorted(unique.values(), key=lambda r: r["image_id"]), trainer, pl_module)
        self._results = []

    def on_test_end(self, trainer: L.Trainer, pl_module: DetectionModule) -> None:
        evaluator = pl_module.evaluation.evaluator
        detections = None if evaluator is None else evaluator.last_detections
        if detections is None or not trainer.is_global_zero:
            return
        path = Path(run_folder(trainer)) / TEST_RESULTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(coco_results(detections)))
        images = len(np.unique(detections[:, 0]))
        rank_zero_info(f"Wrote the {len(detections)} test detections (on {images} images) to {path}")

    def resolved_output_dir(self, trainer: L.Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(run_folder(trainer)) / "predictions"  # on rank 0 only: no trainer.log_dir broadcast

    def write(self, results: list[dict[str, Any]], trainer: L.Trainer, pl_module: DetectionModule) -> None:
        """Write the json files (and images) of ``results`` (one dict per image, see ``predict_step``)."""
        category_ids, class_names = pl_module.classes.category_ids, pl_module.classes.names
        output_dir = self.resolved_output_dir(trainer)
        output_dir.mkdir(parents=True, exist_ok=True)
        detections, images = [], []
        for result in results:
            height, width = result["orig_size"]
            path = Path(result["path"]) if result["path"] else None
            images.append(
                {
                    "id": result["image_id"],
                    "file_name": path.name if path else "",
                    "height": height,
                    "width": width,
                }
            )
            found = result["detections"].astype(np.float64).reshape(-1, 6)
            rows = np.column_stack(
                [
                    np.full(len(found), result["image_id"]),
                    found[:, :2],
                    found[:, 2:4] - found[:, :2],
                    found[:, 4],
                    np.asarray(category_ids)[found[:, 5].astype(np.int64)],
                ]
            )
            detections.extend(coco_results(rows, box_decimals=2, score_decimals=5))
            if self.render and path is not None:
                self._render(result, path, output_dir / "images", class_names)
        categories = [{"id": i, "name": name} for i, name in zip(category_ids, class_names, strict=True)]
        (output_dir / DETECTIONS_FILE).write_text(json.dumps(detections))
        (output_dir / IMAGES_FILE).write_text(
            json.dumps({"images": images, "categories": categories, "annotations": []})
        )
        rank_zero_info(
            f"Wrote {len(detections)} detections on {len(images)} images to {output_dir / DETECTIONS_FILE}"
        )

    def _render(self, result: dict[str, Any], path: Path, folder: Path, class_names: list[str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        found = result["detections"]
        labels = [f"{class_names[int(c)]} {s:.2f}" for s, c in zip(found[:, 4], found[:, 5], strict=True)]
        # The boxes are in the frame the image was predicted in: EXIF-oriented, or the stored pixels when an
        # annotation file says so (told apart by size; a 180-degree EXIF turn is drawn on the oriented view).
        image = read_image(path, apply_exif_orientation=True)
        if image.shape[:2] != tuple(result["orig_size"]):
            image = read_image(path)
        drawn = draw_detections(image, found[:, :4], labels)
        cv2.imwrite(
            str(folder / f"{result['image_id']:06d}_{path.stem}.{self.image_format}"),
            cv2.cvtColor(np.ascontiguousarray(drawn), cv2.COLOR_RGB2BGR),
        )
