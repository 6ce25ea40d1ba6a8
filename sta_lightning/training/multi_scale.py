"""Multi-scale training: a batch resized on the device to the input size of its iteration."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def resized_batch(
    images: Tensor, boxes: Tensor, size: int, memory_format: torch.memory_format = torch.contiguous_format
) -> tuple[Tensor, Tensor]:
    """float (B, 3, S, S) images and (M, 4) xyxy boxes in their pixels -> (B, 3, size, size) images
    (bilinear, as the reference resizes) in ``memory_format`` and the boxes scaled by size / S."""
    scale = size / images.shape[-1]
    resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return resized.contiguous(memory_format=memory_format), boxes * scale
