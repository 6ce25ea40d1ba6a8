"""The convolutional building blocks of the YOLOv8 detector: Conv, Bottleneck, C2f, SPPF and Concat.

Submodule names and registration order follow the YOLOv8 reference (``conv``/``bn``, ``cv1``/``cv2``/``m``) so
that parameters come out in the reference order and reference checkpoints convert by position.
"""

import torch
from torch import Tensor, nn

BATCHNORM_EPS = 1e-3
BATCHNORM_MOMENTUM = 0.03


class Conv(nn.Module):
    """Conv2d (no bias, 'same' padding for odd kernels) -> BatchNorm2d (eps 1e-3, momentum 0.03) -> SiLU.

    (B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BATCHNORM_EPS, momentum=BATCHNORM_MOMENTUM)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 Convs at constant width, plus the input when ``shortcut`` (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, shortcut: bool):
        super().__init__()
        self.cv1 = Conv(channels, channels, 3)
        self.cv2 = Conv(channels, channels, 3)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        out = self.cv2(self.cv1(x))
        return x + out if self.shortcut else out


class C2f(nn.Module):
    """CSP block with two halves: 1x1 Conv to 2c, ``repeats`` Bottlenecks chained on the second half, every
    intermediate kept, concatenated ((2 + repeats) * c channels) and fused by a 1x1 Conv
    (c = out_channels / 2).

    (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, repeats: int, shortcut: bool):
        super().__init__()
        hidden = out_channels // 2
        self.cv1 = Conv(in_channels, 2 * hidden, 1)
        self.cv2 = Conv((2 + repeats) * hidden, out_channels, 1)
        self.m = nn.ModuleList(Bottleneck(hidden, shortcut) for _ in range(repeats))

    def forward(self, x: Tensor) -> Tensor:
        parts = list(self.cv1(x).chunk(2, 1))
        for bottleneck in self.m:
            parts.append(bottleneck(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: 1x1 Conv to C/2, three chained 5x5 stride-1 max-pools, concatenation of
    the four maps, 1x1 Conv. (B, in_channels, H, W) -> (B, out_channels, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, pool_size: int = 5):
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = Conv(in_channels, hidden, 1)
        self.cv2 = Conv(4 * hidden, out_channels, 1)
        self.m = nn.MaxPool2d(pool_size, stride=1, padding=pool_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        pooled = [self.cv1(x)]
        for _ in range(3):
            pooled.append(self.m(pooled[-1]))
        return self.cv2(torch.cat(pooled, 1))


class Concat(nn.Module):
    """Channel concatenation of a list of (B, C_i, H, W) maps -> (B, sum C_i, H, W)."""

    def forward(self, maps: list[Tensor]) -> Tensor:
        return torch.cat(maps, 1)
