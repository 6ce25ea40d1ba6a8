"""The YOLOv8 anchor-free decoupled detection head with distribution focal loss (DFL) box regression."""

import math

import torch
from torch import Tensor, nn

from sta_lightning.models.box_coding import dfl_expectation, ltrb_to_xyxy, make_anchors
from sta_lightning.nn.yolo_blocks import Conv


class DFLProjection(nn.Module):
    """Expected box side distances from DFL logits. ``bins`` = arange(reg_max) is a frozen parameter
    (requires_grad=False), counted in the parameters like the reference's fixed 1x1 DFL conv."""

    def __init__(self, reg_max: int):
        super().__init__()
        self.reg_max = reg_max
        self.bins = nn.Parameter(torch.arange(reg_max, dtype=torch.float32), requires_grad=False)

    def forward(self, box_logits: Tensor) -> Tensor:
        """(B, 4 * reg_max, N) logits (channel = side * reg_max + bin) -> (B, N, 4) distances l, t, r, b
        in grid units."""
        batch = box_logits.shape[0]
        per_side = box_logits.view(batch, 4, self.reg_max, -1).permute(0, 3, 1, 2)
        return dfl_expectation(per_side, self.bins)


class DetectHead(nn.Module):
    """Per level (P3, P4, P5): a box branch (3x3 Conv, 3x3 Conv, 1x1 conv -> 4 * reg_max DFL logits) and a
    class branch (3x3 Conv, 3x3 Conv, 1x1 conv -> num_classes logits).

    Registration order is the reference one (box branches of the three levels, class branches, then the DFL
    projection) so that a reference checkpoint converts by position.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: tuple[int, ...],
        strides: tuple[int, ...] = (8, 16, 32),
        reg_max: int = 16,
    ):
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"DetectHead: {len(in_channels)} input levels but {len(strides)} strides")
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = tuple(strides)
        box_width = max(16, in_channels[0] // 4, 4 * reg_max)
        class_width = max(in_channels[0], min(num_classes, 100))
        self.box_branches = nn.ModuleList(
            nn.Sequential(
                Conv(c, box_width, 3), Conv(box_width, box_width, 3), nn.Conv2d(box_width, 4 * reg_max, 1)
            )
            for c in in_channels
        )
        self.class_branches = nn.ModuleList(
            nn.Sequential(
                Conv(c, class_width, 3),
                Conv(class_width, class_width, 3),
                nn.Conv2d(class_width, num_classes, 1),
            )
            for c in in_channels
        )
        self.dfl = DFLProjection(reg_max)
        self.reset_biases()

    @torch.no_grad()
    def reset_biases(self) -> None:
        """The reference prior: box logits bias 1.0 (it cancels in the DFL softmax) and class bias
        log(5 / nc / (640 / stride)^2), i.e. about 5 objects per 640x640 image spread over the level's
        cells."""
        for box_branch, class_branch, stride in zip(
            self.box_branches, self.class_branches, self.strides, strict=True
        ):
            box_branch[-1].bias.fill_(1.0)
            class_branch[-1].bias.fill_(math.log(5 / self.num_classes / (640 / stride) ** 2))

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Per-level features (B, C_i, H_i, W_i) -> per-level maps (B, 4 * reg_max + nc, H_i, W_i): the DFL
        logits (channel = side * reg_max + bin, sides l, t, r, b), then the class logits."""
        return [
            torch.cat((box_branch(x), class_branch(x)), 1)
            for x, box_branch, class_branch in zip(
                features, self.box_branches, self.class_branches, strict=True
            )
        ]

    def decode(self, maps: list[Tensor]) -> Tensor:
        """Per-level maps -> (B, 4 + nc, N): cx, cy, w, h in input pixels, then class probabilities.

        N = sum(H_i * W_i), anchors ordered P3, P4, P5 and row-major within a level.
        """
        points, stride_per_anchor = make_anchors([m.shape[-2:] for m in maps], self.strides)
        points = points.to(maps[0])
        stride_per_anchor = stride_per_anchor.to(maps[0])
        flat = torch.cat([m.flatten(2) for m in maps], 2)
        box_logits, class_logits = flat.split((4 * self.reg_max, self.num_classes), 1)
        x1y1, x2y2 = ltrb_to_xyxy(self.dfl(box_logits), points).chunk(2, -1)
        xywh = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), -1) * stride_per_anchor
        return torch.cat((xywh.transpose(1, 2), class_logits.sigmoid()), 1)
