"""Floating-point operations of a model's forward pass."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def giga_flops(model: torch.nn.Module, image_size: int) -> float:
    """GFLOPs of one forward of ``model`` on a (1, 3, image_size, image_size) input: 2 x the multiply-adds
    of its convolutions and matrix products (``FlopCounterMode``), the convention of thop MACs x 2."""
    parameter = next(model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, 3, image_size, image_size, dtype=parameter.dtype, device=parameter.device))
    return counter.get_total_flops() / 1e9
