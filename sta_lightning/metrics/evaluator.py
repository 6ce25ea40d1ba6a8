"""DDP-safe COCO evaluation of a validation epoch: gather every rank's detections, keep each image once,
evaluate on rank 0 and give every rank the same metrics."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sta_lightning.distributed import gather_on_rank_zero, is_distributed
from sta_lightning.metrics.coco import evaluate_coco, load_coco_annotations

ImageDetections = tuple[int, np.ndarray]  # (COCO image id, (n, 7) [image_id, x, y, w, h, score, category_id])


class COCOEvaluator:
    """Accumulates detections per rank (CPU numpy) and computes COCO bbox metrics identical to pycocotools.

    `compute` is collective under torch.distributed (every rank must call it): the ranks' detections are
    gathered, each image id is kept once (the DistributedSampler pads ranks with repeated images, which
    would otherwise count twice), rank 0 evaluates and broadcasts, so every rank returns the same dict. Only
    the images seen since `reset` are evaluated, so a validation subset or skipped (corrupt) images do not
    count as misses.
    The annotation json is read and checked when the evaluator is built (on every rank, so that a file
    evaluation cannot use fails at setup); rank 0 keeps it and reuses it across epochs.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        category_ids: Sequence[int],
        per_class: bool = False,
        verbose: bool = False,
    ) -> None:
        """category_ids: contiguous class index -> COCO category id; per_class, verbose: see evaluate_coco."""
        self.annotation_file = Path(annotation_file)
        # Read now, on every rank: a file that evaluation cannot use (e.g. annotations without "area") fails
        # before training starts, not at the first validation. Only rank 0 evaluates, so only it keeps it.
        annotations = load_coco_annotations(self.annotation_file)
        self._annotations = annotations if not is_distributed() or dist.get_rank() == 0 else None
        self.category_ids = np.asarray(category_ids, dtype=np.int64)
        self.per_class = per_class
        self.verbose = verbose
        self._detections: list[ImageDetections] = []

    def reset(self) -> None:
        """Forget the accumulated detections (call at each validation epoch start); keeps the annotations."""
        self._detections = []

    def update(self, image_ids: torch.Tensor | Sequence[int], detections: Sequence[torch.Tensor]) -> None:
        """Add one batch.

        Args:
            image_ids: (B,) COCO image ids.
            detections: B tensors (n, 6) x1, y1, x2, y2 (original image pixels), score, class index.
        """
        image_ids = image_ids.tolist() if isinstance(image_ids, torch.Tensor) else list(image_ids)
        if len(image_ids) != len(detections):
            raise ValueError(f"got {len(image_ids)} image ids but {len(detections)} detection tensors")
        for image_id, boxes in zip(image_ids, detections, strict=True):
            rows = boxes.detach().to("cpu", torch.float64).numpy()
            if rows.ndim != 2 or rows.shape[1] != 6:
                raise ValueError(
                    f"detections of image {image_id} must have shape (n, 6), got {tuple(rows.shape)}"
                )
            class_index = rows[:, 5].astype(np.int64)
            out_of_range = (class_index < 0) | (class_index >= len(self.category_ids))
            if out_of_range.any():
                raise ValueError(
                    f"image {image_id}: class index {class_index[out_of_range][0]} out of range for "
                    f"{len(self.category_ids)} category ids"
                )
            array = np.empty((len(rows), 7))
            array[:, 0] = image_id
            array[:, 1:3] = rows[:, 0:2]
            array[:, 3:5] = rows[:, 2:4] - rows[:, 0:2]
            array[:, 5] = rows[:, 4]
            array[:, 6] = self.category_ids[class_index]
            self._detections.append((int(image_id), array))

    def compute(self) -> dict:
        """The 12 COCO stats (and "map_per_class" if per_class) over the images seen by all ranks."""
        if not is_distributed():
            return self._evaluate(self._detections)
        gathered = gather_on_rank_zero(self._detections)
        outcome: dict | Exception | None = None
        if gathered is not None:  # rank 0
            try:
                outcome = self._evaluate(gathered)
            except Exception as error:  # sent to the other ranks so that they raise too instead of waiting
                outcome = error
        message = [outcome]
        if isinstance(outcome, Exception):
            message = [RuntimeError(f"COCO evaluation failed on rank 0: {outcome!r}")]
        dist.broadcast_object_list(message, src=0)
        if dist.get_rank() != 0:
            outcome = message[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _evaluate(self, detections: Iterable[ImageDetections]) -> dict:
        """Evaluate the first occurrence of each image id (the others are sampler padding)."""
        unique: dict[int, np.ndarray] = {}
        for image_id, array in detections:
            unique.setdefault(image_id, array)
        if not unique:
            raise ValueError(
                "COCOEvaluator.compute: no image was added with update() on any rank since reset()"
            )
        return evaluate_coco(
            self._annotations,
            np.concatenate(list(unique.values())),
            image_ids=unique.keys(),
            per_class=self.per_class,
            verbose=self.verbose,
        )
