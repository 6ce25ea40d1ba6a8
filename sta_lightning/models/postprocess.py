"""Detection post-processing: confidence filtering and class-aware non-maximum suppression."""

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_convert


@dataclass(frozen=True)
class NMSConfig:
    """NMS settings (``non_max_suppression``'s keyword arguments); the defaults are those of validation."""

    conf_threshold: float = 0.001
    iou_threshold: float = 0.7
    max_det: int = 300
    multi_label: bool = True


PREDICT_NMS = NMSConfig(conf_threshold=0.25, multi_label=False)
"""NMS of prediction (``predict`` and exported models): each box's best class, scores above 0.25."""


def non_max_suppression(
    decoded: Tensor,
    conf_threshold: float = 0.001,
    iou_threshold: float = 0.7,
    max_det: int = 300,
    multi_label: bool = True,
    max_candidates: int = 30000,
) -> list[Tensor]:
    """Class-aware NMS of the eval-mode head output.

    ``decoded`` (B, 4 + C, N): cx, cy, w, h in input pixels, then class probabilities. With ``multi_label``
    (validation) every (box, class) pair scoring above ``conf_threshold`` is a candidate; without it
    (prediction) only each box's best class. The ``max_candidates`` best candidates per image go through NMS.

    Returns per image an (n, 6) tensor x1, y1, x2, y2 (input pixels), score, class index (as float), sorted by
    descending score, n <= ``max_det``. Unlike the reference there is no time limit: no image is ever dropped.
    """
    if decoded.ndim != 3 or decoded.shape[1] < 5:
        raise ValueError(f"non_max_suppression expects (B, 4 + num_classes, N), got {tuple(decoded.shape)}")
    boxes = box_convert(decoded[:, :4].transpose(1, 2), "cxcywh", "xyxy")  # (B, N, 4)
    class_probs = decoded[:, 4:].transpose(1, 2)  # (B, N, C)
    detections = []
    for image_boxes, image_probs in zip(boxes, class_probs, strict=True):
        if multi_label:
            box_index, labels = (image_probs > conf_threshold).nonzero(as_tuple=True)
            scores = image_probs[box_index, labels]
        else:
            scores, labels = image_probs.max(1)
            box_index = (scores > conf_threshold).nonzero().squeeze(1)
            scores, labels = scores[box_index], labels[box_index]
        if scores.numel() > max_candidates:
            best = scores.topk(max_candidates).indices
            box_index, labels, scores = box_index[best], labels[best], scores[best]
        candidate_boxes = image_boxes[box_index]
        keep = batched_nms(candidate_boxes.float(), scores.float(), labels, iou_threshold)[:max_det]
        detections.append(
            torch.cat((candidate_boxes[keep], scores[keep, None], labels[keep, None].to(scores.dtype)), 1)
        )
    return detections
