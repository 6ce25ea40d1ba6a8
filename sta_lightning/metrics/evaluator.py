"""COCO evaluation of a validation epoch as a torchmetrics ``Metric``, exact and DDP-safe: torchmetrics
gathers every rank's detections, each image is kept once, rank 0 evaluates and every rank gets the same
metrics."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from sta_lightning.distributed import is_distributed
from sta_lightning.metrics.coco import evaluate_coco, load_coco_annotations


class COCOEvaluator(Metric):
    """Accumulates detections per rank and computes COCO bbox metrics identical to pycocotools.

    States (torchmetrics list states, concatenated across ranks by torchmetrics' own sync, in rank order):
    ``image_ids`` (B,) int64 and ``num_detections`` (B,) int64 per batch, ``detections`` (n, 6) float64
    x1, y1, x2, y2 (original image pixels), score, class index per batch, the images' rows one after
    another. ``compute`` is collective under torch.distributed (every rank must call it): after the sync,
    the first occurrence of each image id is kept (the DistributedSampler pads ranks with repeated images,
    which would otherwise count twice), rank 0 evaluates with faster-coco-eval against the annotation
    file (its areas and crowd regions) and broadcasts, so every rank returns the same dict. Only the
    images seen since ``reset`` are evaluated, so a validation subset or skipped (corrupt) images do not
    count as misses.

    ``last_detections``: on the rank that evaluated (rank 0), the (N, 7) [image_id, x, y, w, h, score,
    category_id] detections of the last ``compute`` (original pixels, the annotation file's ids), for writing
    them as COCO results; None elsewhere and before.

    The annotation json is read and checked when the evaluator is built (on every rank, so that a file
    evaluation cannot use fails at setup); rank 0 keeps it and reuses it across epochs.

    Args:
        annotation_file: COCO instances json of the evaluated split.
        category_ids: contiguous class index -> COCO category id.
        per_class, curves, confusion, verbose: see ``evaluate_coco``.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        category_ids: Sequence[int],
        per_class: bool = False,
        curves: bool = False,
        confusion: bool = False,
        verbose: bool = False,
    ) -> None:
        super().__init__()
        self.annotation_file = Path(annotation_file)
        # Read now, on every rank: a file that evaluation cannot use (e.g. annotations without "area") fails
        # before training starts, not at the first validation. Only rank 0 evaluates, so only it keeps it.
        annotations = load_coco_annotations(self.annotation_file)
        self._annotations = annotations if not is_distributed() or dist.get_rank() == 0 else None
        self.category_ids = np.asarray(category_ids, dtype=np.int64)
        self.options = dict(per_class=per_class, curves=curves, confusion=confusion, verbose=verbose)
        self.last_detections: np.ndarray | None = None
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")
        self.add_state("num_detections", default=[], dist_reduce_fx="cat")
        self.add_state("detections", default=[], dist_reduce_fx="cat")

    def update(self, image_ids: Tensor | Sequence[int], detections: Sequence[Tensor]) -> None:
        """Add one batch.

        Args:
            image_ids: (B,) COCO image ids.
            detections: B tensors (n, 6) x1, y1, x2, y2 (original image pixels), score, class index.
        """
        ids = torch.as_tensor(image_ids, dtype=torch.int64).to(self.device)
        if len(ids) != len(detections):
            raise ValueError(f"got {len(ids)} image ids but {len(detections)} detection tensors")
        if not len(ids):
            return
        for image_id, boxes in zip(ids.tolist(), detections, strict=True):
            if boxes.ndim != 2 or boxes.shape[1] != 6:
                raise ValueError(
                    f"detections of image {image_id} must have shape (n, 6), got {tuple(boxes.shape)}"
                )
        rows = torch.cat([boxes.detach().to(self.device, torch.float64) for boxes in detections])
        counts = torch.tensor([len(boxes) for boxes in detections], dtype=torch.int64, device=self.device)
        out_of_range = (rows[:, 5] < 0) | (rows[:, 5] >= len(self.category_ids))
        if out_of_range.any():
            first = int(out_of_range.nonzero()[0, 0])
            image_id = int(torch.repeat_interleave(ids, counts)[first])
            raise ValueError(
                f"image {image_id}: class index {int(rows[first, 5])} out of range for "
                f"{len(self.category_ids)} category ids"
            )
        self.image_ids.append(ids)
        self.num_detections.append(counts)
        self.detections.append(rows)

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """torchmetrics' sync, after giving a rank that saw no image empty states of the right shape and
        dtype (torchmetrics would send one 1-D tensor of the default dtype, which cannot be gathered with the
        other ranks' (n, 6) float64 rows)."""
        empty = {
            "image_ids": torch.zeros(0, dtype=torch.int64, device=self.device),
            "num_detections": torch.zeros(0, dtype=torch.int64, device=self.device),
            "detections": torch.zeros(0, 6, dtype=torch.float64, device=self.device),
        }
        for name, placeholder in empty.items():
            state = getattr(self, name)
            if isinstance(state, list) and not state:
                state.append(placeholder)
        super().sync(*args, **kwargs)

    def compute(self) -> dict:
        """The 12 COCO stats (and the entries asked for) over the images seen by all ranks."""
        if not is_distributed():
            return self._evaluate()
        outcome: dict | Exception | None = None
        if dist.get_rank() == 0:
            try:
                outcome = self._evaluate()
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

    def _evaluate(self) -> dict:
        """Evaluate the first occurrence of each image id (the others are sampler padding)."""
        image_ids = _concatenated(self.image_ids, torch.zeros(0, dtype=torch.int64))
        if not len(image_ids):
            raise ValueError(
                "COCOEvaluator.compute: no image was added with update() on any rank since reset()"
            )
        counts = _concatenated(self.num_detections, torch.zeros(0, dtype=torch.int64))
        rows = _concatenated(self.detections, torch.zeros(0, 6, dtype=torch.float64))
        first_seen = np.zeros(len(image_ids), dtype=bool)
        first_seen[np.unique(image_ids, return_index=True)[1]] = True
        row_kept = np.repeat(first_seen, counts)
        kept = rows[row_kept]
        detections = np.empty((len(kept), 7))
        detections[:, 0] = np.repeat(image_ids, counts)[row_kept]
        detections[:, 1:3] = kept[:, 0:2]
        detections[:, 3:5] = kept[:, 2:4] - kept[:, 0:2]
        detections[:, 5] = kept[:, 4]
        detections[:, 6] = self.category_ids[kept[:, 5].astype(np.int64)]
        self.last_detections = detections
        return evaluate_coco(self._annotations, detections, image_ids=image_ids[first_seen], **self.options)


def _concatenated(state: list[Tensor] | Tensor, empty: Tensor) -> np.ndarray:
    """A list state (or its synced concatenation) as one CPU numpy array; ``empty`` when it holds nothing."""
    if isinstance(state, list):
        state = torch.cat(state) if state else empty
    return state.cpu().numpy()
