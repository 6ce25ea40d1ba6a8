"""Anchor points and the distance (l, t, r, b) box coding shared by the detection head and the loss.

Conventions (the YOLOv8 reference):
- Anchor points are cell centres (x + 0.5, y + 0.5) in grid units of their level, ordered P3, P4, P5 and
  row-major within a level (index = y * W + x).
- A box is coded as its distances (l, t, r, b) from the anchor point, in grid units.
"""

import torch
from torch import Tensor


def make_anchors(
    feature_sizes: list[tuple[int, int]], strides: list[int] | Tensor, offset: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Anchor points and their strides for feature maps of the given (H, W) sizes.

    Returns ``points`` (N, 2) as (x, y) in grid units and ``stride_per_anchor`` (N, 1) in input pixels,
    with N = sum(H * W) over the levels.
    """
    points, stride_per_anchor = [], []
    for (height, width), stride in zip(feature_sizes, strides, strict=True):
        ys = torch.arange(height, dtype=torch.float32) + offset
        xs = torch.arange(width, dtype=torch.float32) + offset
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x, grid_y), -1).view(-1, 2))
        stride_per_anchor.append(torch.full((height * width, 1), float(stride), dtype=torch.float32))
    return torch.cat(points), torch.cat(stride_per_anchor)


def dfl_expectation(logits: Tensor, bins: Tensor) -> Tensor:
    """Expected distance of a distribution-focal-loss histogram.

    ``logits`` (..., reg_max) over the bins 0..reg_max-1 and ``bins`` (reg_max,) their values; returns (...)
    the softmax-weighted mean bin.
    """
    return logits.softmax(-1) @ bins.to(logits.dtype)


def ltrb_to_xyxy(distances: Tensor, points: Tensor) -> Tensor:
    """(..., 4) distances l, t, r, b from (..., 2) points -> (..., 4) boxes x1, y1, x2, y2 (same units)."""
    left_top, right_bottom = distances.chunk(2, -1)
    return torch.cat((points - left_top, points + right_bottom), -1)


def xyxy_to_ltrb(boxes: Tensor, points: Tensor, max_distance: float) -> Tensor:
    """(..., 4) boxes x1, y1, x2, y2 -> (..., 4) distances l, t, r, b from (..., 2) points, clamped to
    [0, max_distance] (the reference uses reg_max - 1 - 0.01 so that both DFL neighbour bins exist)."""
    x1y1, x2y2 = boxes.chunk(2, -1)
    return torch.cat((points - x1y1, x2y2 - points), -1).clamp_(0, max_distance)
