"""Task-aligned label assignment (TOOD) as YOLOv8 uses it, and the CIoU it ranks anchors by.

Shapes: B images, M ground-truth slots per image (padded, ``gt_mask`` marks the real ones), N anchors,
C classes. Boxes are x1, y1, x2, y2 in input pixels.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


def complete_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Complete IoU of (..., 4) xyxy boxes, element-wise -> (...).

    Written here rather than taken from torchvision (``complete_box_iou_loss``) because the YOLOv8 reference
    places eps differently (added to both heights and to the union, not to the IoU denominator only), and the
    loss must reproduce its numbers. The aspect-ratio weight alpha is a constant for the gradient.
    """
    x1a, y1a, x2a, y2a = boxes1.unbind(-1)
    x1b, y1b, x2b, y2b = boxes2.unbind(-1)
    width_a, height_a = x2a - x1a, y2a - y1a + eps
    width_b, height_b = x2b - x1b, y2b - y1b + eps
    intersection = (torch.minimum(x2a, x2b) - torch.maximum(x1a, x1b)).clamp(min=0) * (
        torch.minimum(y2a, y2b) - torch.maximum(y1a, y1b)
    ).clamp(min=0)
    union = width_a * height_a + width_b * height_b - intersection + eps
    iou = intersection / union
    enclosing_width = torch.maximum(x2a, x2b) - torch.minimum(x1a, x1b)
    enclosing_height = torch.maximum(y2a, y2b) - torch.minimum(y1a, y1b)
    enclosing_diagonal_sq = enclosing_width**2 + enclosing_height**2 + eps
    centre_distance_sq = ((x1b + x2b - x1a - x2a) ** 2 + (y1b + y2b - y1a - y2a) ** 2) / 4
    aspect_term = (4 / math.pi**2) * (torch.atan(width_b / height_b) - torch.atan(width_a / height_a)) ** 2
    with torch.no_grad():
        alpha = aspect_term / (aspect_term - iou + (1 + eps))
    return iou - (centre_distance_sq / enclosing_diagonal_sq + aspect_term * alpha)


class Assignment(NamedTuple):
    """Per-anchor training targets: ``boxes`` (B, N, 4) xyxy pixels of the assigned GT, ``scores`` (B, N, C)
    the normalised alignment on the GT's class (0 elsewhere), ``foreground`` (B, N) bool."""

    boxes: Tensor
    scores: Tensor
    foreground: Tensor


@dataclass(frozen=True)
class AssignerConfig:
    """The assigner group of a config (``model.assigner``): ``topk`` candidates per ground-truth box, the
    exponents ``alpha`` of the class score and ``beta`` of the CIoU in the alignment metric, and
    ``min_box_side`` (pixels): ground-truth sides shorter than this count as this long in the inside test (16
    is what Ultralytics 8.4 does); null keeps the classic YOLOv8 behaviour."""

    topk: int = 10
    alpha: float = 0.5
    beta: float = 6.0
    min_box_side: float | None = None


class TaskAlignedAssigner:
    """Assigns each GT the ``topk`` anchors with the best alignment ``score**alpha * CIoU**beta`` among the
    anchors whose centres lie strictly inside it; an anchor claimed by several GTs keeps the one it overlaps
    most. Target scores are the alignment rescaled so that each GT's best anchor gets that GT's best CIoU.

    ``min_box_side`` (pixels, default off = classic YOLOv8) enlarges shorter GT sides to that length around
    the box centre for the inside test only, as Ultralytics 8.4 does with 16 px.
    """

    def __init__(
        self,
        num_classes: int,
        topk: int = 10,
        alpha: float = 0.5,
        beta: float = 6.0,
        eps: float = 1e-9,
        min_box_side: float | None = None,
    ):
        self.num_classes = num_classes
        self.topk = topk
        self.alpha = alpha
        self.beta = beta
        self.eps = eps
        self.min_box_side = min_box_side

    @torch.no_grad()
    def __call__(
        self,
        pred_scores: Tensor,
        pred_boxes: Tensor,
        anchor_points: Tensor,
        gt_labels: Tensor,
        gt_boxes: Tensor,
        gt_mask: Tensor,
    ) -> Assignment:
        """``pred_scores`` (B, N, C) probabilities, ``pred_boxes`` (B, N, 4) and ``anchor_points`` (N, 2) in
        pixels, ``gt_labels`` (B, M) long, ``gt_boxes`` (B, M, 4) pixels, ``gt_mask`` (B, M) bool."""
        num_anchors = pred_scores.shape[1]
        num_slots = gt_boxes.shape[1]
        if num_slots == 0:
            background = torch.zeros(pred_scores.shape[:2], dtype=torch.bool, device=pred_scores.device)
            return Assignment(torch.zeros_like(pred_boxes), torch.zeros_like(pred_scores), background)

        candidates = self._centres_inside(anchor_points, gt_boxes) & gt_mask.unsqueeze(-1)  # (B, M, N)
        # CIoU and class score only for the candidate pairs; every other pair has alignment 0.
        image, slot, anchor = candidates.nonzero(as_tuple=True)
        overlaps = torch.zeros(candidates.shape, dtype=pred_boxes.dtype, device=pred_boxes.device)
        pair_overlaps = complete_iou(gt_boxes[image, slot], pred_boxes[image, anchor]).clamp_(min=0)
        pair_scores = pred_scores[image, anchor, gt_labels[image, slot]]
        overlaps[image, slot, anchor] = pair_overlaps
        alignment = torch.zeros_like(overlaps)
        alignment[image, slot, anchor] = pair_scores.pow(self.alpha) * pair_overlaps.pow(self.beta)

        top_anchors = alignment.topk(min(self.topk, num_anchors), dim=-1).indices
        selected = torch.zeros_like(candidates).scatter_(-1, top_anchors, True) & candidates

        # An anchor selected by several ground-truth boxes goes to the one it overlaps most (computed for
        # every anchor rather than behind a host-side test: no GPU synchronisation).
        claimed_by_several = selected.sum(1) > 1  # (B, N)
        best_gt = torch.nn.functional.one_hot(overlaps.argmax(1), num_slots).transpose(1, 2).bool()
        selected = torch.where(claimed_by_several.unsqueeze(1), best_gt, selected)

        foreground = selected.any(1)
        gt_index = selected.to(torch.uint8).argmax(1)  # (B, N); 0 for background anchors
        target_labels = gt_labels.gather(1, gt_index)
        target_boxes = gt_boxes.gather(1, gt_index.unsqueeze(-1).expand(-1, -1, 4))

        alignment = alignment * selected
        best_alignment = alignment.amax(-1, keepdim=True)  # (B, M, 1)
        best_overlap = (overlaps * selected).amax(-1, keepdim=True)
        normalised = (alignment * best_overlap / (best_alignment + self.eps)).amax(1)  # (B, N)
        target_scores = torch.zeros_like(pred_scores).scatter_(
            -1, target_labels.unsqueeze(-1), (normalised * foreground).unsqueeze(-1)
        )
        return Assignment(boxes=target_boxes, scores=target_scores, foreground=foreground)

    def _centres_inside(self, anchor_points: Tensor, gt_boxes: Tensor) -> Tensor:
        """(B, M, N) bool: anchor centre strictly inside the GT (by more than eps)."""
        if self.min_box_side is not None:
            centres = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
            half_sides = ((gt_boxes[..., 2:] - gt_boxes[..., :2]) / 2).clamp(min=self.min_box_side / 2)
            gt_boxes = torch.cat((centres - half_sides, centres + half_sides), -1)
        # Smallest of the four margins (B, M, N), taken per axis to avoid a (B, M, N, 4) tensor.
        x, y = anchor_points.unbind(-1)
        margin_x = torch.minimum(x - gt_boxes[..., 0:1], gt_boxes[..., 2:3] - x)
        margin_y = torch.minimum(y - gt_boxes[..., 1:2], gt_boxes[..., 3:4] - y)
        return torch.minimum(margin_x, margin_y) > self.eps
