"""Class-aware NMS with a fixed output shape, for exported graphs (ONNX, TorchScript, torch.export)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, nms

from sta_lightning.models.postprocess import PREDICT_NMS

MAX_CANDIDATES = 1000
"""Default number of best candidates per image that enter NMS."""


class PaddedNMS(nn.Module):
    """decoded (B, 4 + nc, N) -> (B, max_det, 6): x1, y1, x2, y2 (input pixels), score, class index.

    The selection of ``non_max_suppression`` with the same arguments: candidates are the boxes' best class
    (or every (box, class) pair with ``multi_label``) scoring above ``conf_threshold``, at most
    ``max_candidates`` of them (the best) per image, then greedy NMS within each class and image. Rows are
    sorted by descending score and padded with zeros. Shapes stay fixed for any input: all images and classes
    go through one ``torchvision.ops.nms`` (ONNX ``NonMaxSuppression``), moved apart by coordinate offsets
    (class along x, image along y), and candidates at or below the threshold get score 0, which leaves the
    others untouched (greedy NMS lets a box suppress only lower-scored ones). The thresholds are constants of
    the exported graph.
    """

    def __init__(
        self,
        conf_threshold: float = PREDICT_NMS.conf_threshold,
        iou_threshold: float = PREDICT_NMS.iou_threshold,
        max_det: int = PREDICT_NMS.max_det,
        multi_label: bool = PREDICT_NMS.multi_label,
        max_candidates: int = MAX_CANDIDATES,
    ) -> None:
        super().__init__()
        checks = (
            (0.0 <= conf_threshold < 1.0, f"conf_threshold must be in [0, 1), got {conf_threshold}"),
            (0.0 < iou_threshold <= 1.0, f"iou_threshold must be in (0, 1], got {iou_threshold}"),
            (max_det >= 1, f"max_det must be >= 1, got {max_det}"),
            (max_candidates >= 1, f"max_candidates must be >= 1, got {max_candidates}"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"PaddedNMS: {message}")
        self.conf_threshold = float(conf_threshold)
        self.iou_threshold = float(iou_threshold)
        self.max_det = int(max_det)
        self.multi_label = bool(multi_label)
        self.max_candidates = int(max_candidates)

    def settings(self) -> dict[str, float | int | bool]:
        """The thresholds, as the JSON sidecar states them."""
        return {
            "conf_threshold": self.conf_threshold,
            "iou_threshold": self.iou_threshold,
            "max_det": self.max_det,
            "multi_label": self.multi_label,
            "max_candidates": self.max_candidates,
        }

    def forward(self, decoded: Tensor) -> Tensor:
        decoded = decoded.float()  # ONNX NonMaxSuppression takes float32 only
        boxes = box_convert(decoded[:, :4].transpose(1, 2), "cxcywh", "xyxy")  # (B, N, 4)
        probs = decoded[:, 4:].transpose(1, 2)  # (B, N, C)
        batch, anchors, classes = probs.shape
        if self.multi_label:  # pair n * C + c is box n in class c
            scores = probs.flatten(1)
            labels = torch.arange(classes, device=probs.device).repeat(anchors).expand(batch, -1)
            boxes = boxes.repeat_interleave(classes, dim=1)
        else:
            scores, labels = probs.max(2)
        scores, candidates = scores.topk(min(self.max_candidates, scores.shape[1]), dim=1)
        scores = torch.where(scores > self.conf_threshold, scores, 0.0)
        boxes = boxes.gather(1, candidates.unsqueeze(-1).expand(-1, -1, 4))  # (B, K, 4)
        labels = labels.gather(1, candidates)

        span = boxes.max() - boxes.min() + 1  # wider than any box: offset groups cannot overlap
        images = torch.arange(batch, device=boxes.device).unsqueeze(1).expand_as(labels)
        offsets = torch.stack((labels, images), -1).repeat(1, 1, 2).to(boxes) * span
        keep = nms((boxes + offsets).flatten(0, 1), scores.flatten(), self.iou_threshold)
        kept = scores.new_zeros(scores.numel()).scatter(0, keep, scores.new_ones(keep.shape)).view_as(scores)

        top_scores, order = (scores * kept).topk(min(self.max_det, scores.shape[1]), dim=1)
        rows = torch.cat(
            (
                boxes.gather(1, order.unsqueeze(-1).expand(-1, -1, 4)),
                top_scores.unsqueeze(-1),
                labels.gather(1, order).unsqueeze(-1).to(boxes),
            ),
            -1,
        )
        rows = rows * (top_scores > 0).unsqueeze(-1)
        return F.pad(rows, (0, 0, 0, self.max_det - rows.shape[1]))
