"""Image geometry of evaluation and deployment: reading, long-side resize, letterbox and the way back.

Every image is first resized so that its long side is the input size S (INTER_LINEAR, sides rounded up, as the
reference does), keeping the ratio ``scale = S / max(h0, w0)``. Evaluation and prediction then pad it to
S x S, centred, with grey 114 (``letterbox``): a box in input pixels maps back with
``original = (box - pad) / scale``. Only cv2, numpy and torch: the ONNX runtime (``sta_lightning.deploy``)
uses it without Lightning or albumentations.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch

PAD_VALUE = 114
"""Grey level of letterbox, mosaic and affine borders (the reference value)."""


def read_image(path: str | Path, apply_exif_orientation: bool = False) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB; raises OSError naming the file when it cannot be decoded.

    Images of an annotation file are read in its frame: the stored pixels, unless the annotation's width and
    height are those of the EXIF-oriented view only (``sta_lightning.data.coco``); prediction without an
    annotation file honours the EXIF orientation, as a viewer does.
    """
    flags = cv2.IMREAD_COLOR if apply_exif_orientation else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imread(str(path), flags)
    if image is None:
        raise OSError(f"cannot decode image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize_long_side(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Resize (H, W, 3) so that max(H, W) == size (up or down); returns (image, ratio size / max(H, W))."""
    h0, w0 = image.shape[:2]
    ratio = size / max(h0, w0)
    if ratio != 1.0:
        new_w, new_h = min(math.ceil(w0 * ratio), size), min(math.ceil(h0 * ratio), size)
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return image, ratio


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad an image whose sides are <= size to (size, size, 3), centred, with PAD_VALUE.

    Returns (padded image, (pad_x, pad_y)) = the left and top padding in pixels. cv2 is called directly (not
    A.PadIfNeeded) because the offsets must be known exactly to map boxes back to the original image.
    """
    h, w = image.shape[:2]
    pad_x, pad_y = (size - w) // 2, (size - h) // 2
    padded = cv2.copyMakeBorder(
        image, pad_y, size - h - pad_y, pad_x, size - w - pad_x, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3
    )
    return padded, (pad_x, pad_y)


def boxes_to_original(
    boxes: torch.Tensor | np.ndarray,
    scale: float | torch.Tensor,
    pad: tuple[float, float] | torch.Tensor | np.ndarray,
    orig_size: tuple[int, int] | torch.Tensor | np.ndarray,
) -> torch.Tensor | np.ndarray:
    """Map (n, 4) xyxy boxes in input pixels to original pixels: (box - pad) / scale, clipped to the image.

    ``pad`` is (x, y) and ``orig_size`` is (h, w), as in a batch's ``pads`` and ``orig_sizes`` rows. Returns a
    new array of the input's type (float).
    """
    as_numpy = isinstance(boxes, np.ndarray)
    boxes_t = torch.as_tensor(boxes, dtype=torch.float32 if as_numpy else None).float()
    pad_x, pad_y = (float(v) for v in torch.as_tensor(pad).flatten()[:2])
    height, width = (float(v) for v in torch.as_tensor(orig_size).flatten()[:2])
    shift = boxes_t.new_tensor([pad_x, pad_y, pad_x, pad_y])
    limit = boxes_t.new_tensor([width, height, width, height])
    original = ((boxes_t - shift) / float(scale)).clamp(min=0.0)
    original = torch.minimum(original, limit)
    return original.numpy() if as_numpy else original
