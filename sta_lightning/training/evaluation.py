"""The evaluation glue of the DetectionModule: a COCO evaluator per stage, boxes back to original pixels,
the 12 COCO statistics logged."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from sta_lightning.classes import Classes
from sta_lightning.geometry import boxes_to_original
from sta_lightning.metrics import COCO_STATS, COCOEvaluator
from sta_lightning.training.data_contract import DetectionData


def detections_to_original(detections: list[Tensor], batch: dict[str, Any]) -> list[Tensor]:
    """Map each image's (n, 6) detections (x1, y1, x2, y2 input pixels, score, class) back to original
    pixels: undo the letterbox of ``batch`` (its ``ratios``, ``pads`` and ``orig_sizes``)."""
    return [
        torch.cat([boxes_to_original(found[:, :4], ratio, pad, size), found[:, 4:]], dim=1)
        for found, ratio, pad, size in zip(
            detections, batch["ratios"], batch["pads"], batch["orig_sizes"], strict=True
        )
    ]


class COCOEvaluation:
    """Scores one stage's detections with a ``COCOEvaluator`` and logs the COCO statistics.

    ``metrics`` holds the full result of the last ``log_epoch`` (per-class AP, curves, confusion matrix) for
    the dashboard callbacks; ``evaluator`` (None when the data has no annotations for the stage) keeps the
    last scored detections for ``test_results.json``.
    """

    def __init__(self) -> None:
        self.evaluator: COCOEvaluator | None = None
        self.metrics: dict[str, Any] | None = None

    def setup(self, data: DetectionData | None, stage: str, classes: Classes) -> None:
        """Build the evaluator of ``stage`` from the data's annotation file (every rank checks the file)."""
        annotation_file = None if data is None else data.annotation_file(stage)
        if annotation_file is None:
            rank_zero_warn(
                f"DetectionModule: no annotation file for '{stage}', so no COCO metrics are computed"
            )
            self.evaluator = None
            return
        self.evaluator = COCOEvaluator(
            annotation_file, classes.category_ids, per_class=True, curves=True, confusion=True
        )

    def update(self, batch: dict[str, Any], detections: list[Tensor]) -> None:
        """Add a batch's (n, 6) detections in input pixels."""
        if self.evaluator is not None:
            self.evaluator.update(batch["image_ids"], detections_to_original(detections, batch))

    def log_epoch(self, module: L.LightningModule, prefix: str) -> None:
        """Compute the epoch's COCO metrics (collective under DDP: every rank gets them all), log them as
        ``<prefix>/<name>`` and reset the evaluator for the next epoch."""
        if self.evaluator is None:
            return
        try:
            self.metrics = self.evaluator.compute()
        finally:
            self.evaluator.reset()
        for stat in COCO_STATS:
            # Identical on every rank already: the sync (a mean of equal values) only tells Lightning so.
            value = float(self.metrics[stat.key])
            module.log(
                f"{prefix}/{stat.logged}", value, prog_bar=stat.key in ("map", "map_50"), sync_dist=True
            )
