"""The YOLOv8 detection loss: task-aligned assignment, BCE classification, CIoU box and DFL terms."""

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sta_lightning.distributed import is_distributed, sum_over_processes
from sta_lightning.models.assigner import AssignerConfig, TaskAlignedAssigner, complete_iou
from sta_lightning.models.box_coding import dfl_expectation, ltrb_to_xyxy, make_anchors, xyxy_to_ltrb


def pad_targets(
    batch_idx: Tensor, cls: Tensor, bboxes: Tensor, batch_size: int, num_classes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Flat targets (M,) image index, (M,) class, (M, 4) boxes -> per image, padded to the largest count K:
    labels (B, K) long, boxes (B, K, 4), mask (B, K) bool marking the real slots (order kept per image).

    Image indices must lie in [0, B) and classes in [0, num_classes) (ValueError otherwise). The checks and
    K come from one read of five numbers on the host: one synchronisation of a GPU per batch."""
    if bboxes.ndim != 2 or bboxes.shape[-1] != 4:
        raise ValueError(f"targets['bboxes'] must have shape (M, 4), got {tuple(bboxes.shape)}")
    if not (batch_idx.shape[0] == cls.shape[0] == bboxes.shape[0]):
        raise ValueError(
            f"targets disagree in length: batch_idx {batch_idx.shape[0]}, cls {cls.shape[0]}, "
            f"bboxes {bboxes.shape[0]}"
        )
    batch_idx = batch_idx.long()
    counts = torch.bincount(batch_idx.clamp(0, batch_size - 1), minlength=batch_size)
    num_slots = 0
    if batch_idx.numel():
        extremes = torch.stack(
            [batch_idx.min(), batch_idx.max(), cls.min().long(), cls.max().long(), counts.max()]
        )
        first_image, last_image, first_class, last_class, num_slots = extremes.tolist()
        if first_image < 0 or last_image >= batch_size:
            found = batch_idx.unique().tolist()
            raise ValueError(f"targets['batch_idx'] must lie in [0, {batch_size}), got {found}")
        if first_class < 0 or last_class >= num_classes:
            raise ValueError(f"targets['cls'] must lie in [0, {num_classes}), got {cls.unique().tolist()}")
    order = torch.argsort(batch_idx, stable=True)
    image = batch_idx[order]
    slot = torch.arange(image.numel(), device=image.device) - (counts.cumsum(0) - counts)[image]
    labels = torch.zeros((batch_size, num_slots), dtype=torch.long, device=bboxes.device)
    boxes = torch.zeros((batch_size, num_slots, 4), dtype=bboxes.dtype, device=bboxes.device)
    mask = torch.zeros((batch_size, num_slots), dtype=torch.bool, device=bboxes.device)
    labels[image, slot] = cls.view(-1).long()[order]
    boxes[image, slot] = bboxes[order]
    mask[image, slot] = True
    return labels, boxes, mask


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """(P, 4, reg_max) DFL logits and (P, 4) target distances in bins (< reg_max - 1) -> (P,) the
    cross-entropy to the two neighbouring bins, weighted by proximity and averaged over the 4 sides."""
    reg_max = logits.shape[-1]
    left = target.long()
    right = left + 1
    left_weight = right - target
    right_weight = 1 - left_weight
    flat_logits = logits.reshape(-1, reg_max)
    left_ce = F.cross_entropy(flat_logits, left.view(-1), reduction="none").view(left.shape)
    right_ce = F.cross_entropy(flat_logits, right.view(-1), reduction="none").view(left.shape)
    return (left_ce * left_weight + right_ce * right_weight).mean(-1)


@dataclass(frozen=True)
class LossGains:
    """The loss group of a config (``model.loss``): weights of the box (CIoU), class (BCE) and DFL terms,
    and per-class positive weights of the BCE (``class_weights``: one per class, "auto" from the training
    split's object counts by ``class_weights_from_counts`` with ``class_weight_power``, or None)."""

    box_gain: float = 7.5
    cls_gain: float = 0.5
    dfl_gain: float = 1.5
    class_weights: tuple[float, ...] | Literal["auto"] | None = None
    class_weight_power: float = 1.0


def class_weights_from_counts(counts: np.ndarray, power: float = 1.0) -> np.ndarray:
    """(C,) objects per class -> (C,) positive weights proportional to count^-power (1: inverse frequency,
    0.5: its square root, 0: none), scaled so that their mean over the objects is 1 (the positive part of
    the classification loss keeps its size). Classes without objects get 1 (they have no positives)."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.ones_like(counts)
    if present.any():
        raw = counts[present] ** -power
        weights[present] = raw * counts[present].sum() / (counts[present] * raw).sum()
    return weights


class YOLOv8Loss(nn.Module):
    """YOLOv8 detection loss (no learnable parameters).

    ``loss(preds, targets)``: ``preds`` the train-mode head output, a list of (B, 4 * reg_max + C, H/s, W/s)
    maps for ``strides``; ``targets`` a dict with ``batch_idx`` (M,) long, ``cls`` (M,) long and ``bboxes``
    (M, 4) xyxy input pixels. Returns ``(total, items)``: ``items`` (3,) detached = gain-scaled (box, cls,
    dfl) per-batch values, ``total`` = their sum with gradient times the batch size (what the reference
    backpropagates). The box and DFL terms are in grid units, summed over foreground anchors weighted by the
    target score; all three terms are divided by max(sum of target scores, 1).

    ``all_processes=True`` (collective under DDP: every process must call it) makes the losses of a batch
    split over W processes sum to the loss of the whole batch. Process r holds B_r images with gain-weighted
    loss sums L_r and target-score sum S_r; one process given all of them computes ``total = B L / S`` with
    B = sum B_r, L = sum L_r, S = max(sum S_r, 1), and backpropagates g = (B / S) sum grad L_r. Here S and B
    are all-reduced (no gradient: the target scores come from detached predictions) and process r returns
    ``total_r = B L_r / S``. DDP averages the W gradients and the training step multiplies the loss by W, so
    the gradient applied is sum_r grad total_r = g, exactly (with BatchNorm synchronised, L_r is what one
    process computes for those images). The reference normalises per process (``total_r = B_r L_r / S_r``),
    which equals g only when every S_r = S B_r / B. The ``items`` of process r are W L_r / S, so their mean
    over the processes (what a logger with ``sync_dist`` shows) is the whole batch's. Without a process group
    of more than one process the flag changes nothing.
    """

    def __init__(
        self,
        num_classes: int,
        reg_max: int = 16,
        strides: tuple[int, ...] = (8, 16, 32),
        gains: LossGains = LossGains(),
        assigner: AssignerConfig = AssignerConfig(),
    ):
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = tuple(strides)
        self.gains = (gains.box_gain, gains.cls_gain, gains.dfl_gain)
        self.assigner = TaskAlignedAssigner(
            num_classes, assigner.topk, assigner.alpha, assigner.beta, min_box_side=assigner.min_box_side
        )
        # (C,) BCE positive weights, or None; not in state dicts (the config or the data gives them).
        self.register_buffer("positive_weights", None, persistent=False)

    def set_class_weights(
        self, weights: Tensor | np.ndarray | None, device: torch.device | str | None = None
    ) -> None:
        """Weigh the positive BCE term of class c by ``weights[c]`` ((C,)), or by 1 (None); kept on
        ``device``, that of the predictions."""
        if weights is None:
            self.positive_weights = None
            return
        weights = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        if weights.shape != (self.num_classes,) or not bool((weights > 0).all()):
            raise ValueError(
                f"model.loss.class_weights: {self.num_classes} positive values needed, got {weights.tolist()}"
            )
        self.positive_weights = weights.to(device)

    def forward(
        self, preds: list[Tensor], targets: dict[str, Tensor], all_processes: bool = False
    ) -> tuple[Tensor, Tensor]:
        if len(preds) != len(self.strides):
            raise ValueError(f"YOLOv8Loss: {len(preds)} prediction maps for {len(self.strides)} strides")
        expected_channels = 4 * self.reg_max + self.num_classes
        if any(p.shape[1] != expected_channels for p in preds):
            raise ValueError(
                f"YOLOv8Loss: prediction maps need {expected_channels} channels (4 * {self.reg_max} DFL + "
                f"{self.num_classes} classes), got {[p.shape[1] for p in preds]}"
            )
        batch_size = preds[0].shape[0]
        device = preds[0].device
        # (B, N, 4 * reg_max) and (B, N, C), contiguous, in float32 whatever the autocast dtype of the head
        # (float64 stays float64).
        flat = torch.cat([p.flatten(2) for p in preds], 2)
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
        dist_logits, cls_logits = (
            part.transpose(1, 2).contiguous() for part in flat.split((4 * self.reg_max, self.num_classes), 1)
        )
        num_anchors = flat.shape[2]

        points, stride = make_anchors([p.shape[-2:] for p in preds], self.strides)
        points, stride = points.to(device), stride.to(device)
        bins = torch.arange(self.reg_max, dtype=flat.dtype, device=device)
        dist_logits = dist_logits.reshape(batch_size, num_anchors, 4, self.reg_max)
        pred_boxes = ltrb_to_xyxy(dfl_expectation(dist_logits, bins), points)  # (B, N, 4) grid units

        gt_labels, gt_boxes, gt_mask = pad_targets(
            targets["batch_idx"].to(device),
            targets["cls"].to(device),
            targets["bboxes"].to(device, flat.dtype),
            batch_size,
            self.num_classes,
        )
        assignment = self.assigner(
            cls_logits.detach().sigmoid(),
            pred_boxes.detach() * stride,
            points * stride,
            gt_labels,
            gt_boxes,
            gt_mask,
        )
        target_scores_sum = assignment.scores.sum()
        total_batch_size, process_count = batch_size, 1
        if all_processes and is_distributed():
            sums = sum_over_processes(
                torch.stack([target_scores_sum, target_scores_sum.new_tensor(batch_size)])
            )
            target_scores_sum, total_batch_size = sums[0], sums[1]
            process_count = dist.get_world_size()
        target_scores_sum = target_scores_sum.clamp(min=1)
        cls_loss = F.binary_cross_entropy_with_logits(
            cls_logits, assignment.scores, pos_weight=self.positive_weights, reduction="none"
        ).sum()

        foreground = assignment.foreground
        weight = assignment.scores.sum(-1)[foreground]  # (P,)
        fg_points = points.expand(batch_size, -1, -1)[foreground]
        fg_targets = (assignment.boxes / stride)[foreground]  # (P, 4) grid units
        box_loss = ((1 - complete_iou(pred_boxes[foreground], fg_targets)) * weight).sum()
        target_ltrb = xyxy_to_ltrb(fg_targets, fg_points, self.reg_max - 1 - 0.01)
        dfl_loss = (distribution_focal_loss(dist_logits[foreground], target_ltrb) * weight).sum()

        gains = torch.tensor(self.gains, device=device)
        items = torch.stack((box_loss, cls_loss, dfl_loss)) / target_scores_sum * gains
        return items.sum() * total_batch_size, items.detach() * process_count
