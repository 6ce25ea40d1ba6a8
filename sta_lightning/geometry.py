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
JPEG_SUFFIXES = (".jpg", ".jpeg")
_REDUCED_COLOR = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
_DECODE_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10 decodes to RGB at no extra cost


def read_image(path: str | Path, apply_exif_orientation: bool = False, reduction: int = 1) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB; raises OSError naming the file when it cannot be decoded.

    Images of an annotation file are read in its frame: the stored pixels, unless the annotation's width and
    height are those of the EXIF-oriented view only (``sta_lightning.data.exif``); prediction without an
    annotation file honours the EXIF orientation, as a viewer does. ``reduction`` 2, 4 or 8 decodes a JPEG
    at that fraction of its size directly (libjpeg's DCT scaling; sides ceil(side / reduction)).
    """
    flags = _REDUCED_COLOR[reduction]
    if not apply_exif_orientation:
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
    if _DECODE_RGB is not None:
        flags = flags & ~cv2.IMREAD_COLOR | _DECODE_RGB
    image = cv2.imread(str(path), flags)
    if image is None:
        raise OSError(f"cannot decode image {path}")
    return image if _DECODE_RGB is not None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resized_shape(hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(h, w) of an (h0, w0) image resized to long side ``size``: sides rounded up, at most ``size``."""
    h0, w0 = (int(v) for v in hw)
    ratio = size / max(h0, w0)
    if ratio == 1.0:
        return h0, w0
    return min(math.ceil(h0 * ratio), size), min(math.ceil(w0 * ratio), size)


def resize_long_side(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Resize (H, W, 3) so that max(H, W) == size (up or down); returns (image, ratio size / max(H, W))."""
    ratio = size / max(image.shape[:2])
    h, w = resized_shape(image.shape[:2], size)
    if (h, w) != image.shape[:2]:
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    return image, ratio


def jpeg_reduction(path: str | Path, hw: tuple[int, int], size: int) -> int:
    """The largest of 8, 4, 2 by which a JPEG of (h0, w0) pixels can be decoded and still have a long side
    of at least ``size`` (so it is only ever shrunk afterwards); 1 for smaller images and other formats."""
    if Path(path).suffix.lower() not in JPEG_SUFFIXES:
        return 1
    return next((f for f in (8, 4, 2) if max(hw) >= f * size), 1)


def read_resized(
    path: str | Path,
    hw: tuple[int, int],
    size: int,
    apply_exif_orientation: bool = False,
    reduced: bool = False,
) -> np.ndarray:
    """An image file of (h0, w0) = ``hw`` pixels (its annotation's frame) decoded and resized to long side
    ``size``: (h, w, 3) uint8 RGB with (h, w) = ``resized_shape(hw, size)``, as ``resize_long_side`` makes it.

    ``reduced``: a JPEG at least twice as large as needed is decoded at 1/2, 1/4 or 1/8 of its size
    (``jpeg_reduction``) and resized from there: faster, and the shape (hence every box) is the same, but the
    pixels differ from a full decode + INTER_LINEAR resize, most along fine texture (libjpeg scales in the DCT
    domain where INTER_LINEAR samples 2 x 2 pixels of the full image). Raises OSError when the file's size
    is not ``hw``.
    """
    reduction = jpeg_reduction(path, hw, size) if reduced else 1
    image = read_image(path, apply_exif_orientation, reduction)
    h0, w0 = (int(v) for v in hw)
    if image.shape[:2] != (-(-h0 // reduction), -(-w0 // reduction)):
        raise OSError(
            f"{path} decodes to {image.shape[1]} x {image.shape[0]} pixels at 1/{reduction} of its size, "
            f"its annotation says {w0} x {h0}"
        )
    h, w = resized_shape(hw, size)
    if (h, w) != image.shape[:2]:
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    return image


def letterbox(image: np.ndarray, size: int | tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad an image no larger than ``size`` (S, or (h, w)) to (S, S, 3) or (h, w, 3), centred, with PAD_VALUE.

    Returns (padded image, (pad_x, pad_y)) = the left and top padding in pixels. cv2 is called directly (not
    A.PadIfNeeded) because the offsets must be known exactly to map boxes back to the original image.
    """
    h, w = image.shape[:2]
    height, width = (size, size) if isinstance(size, int) else size
    pad_x, pad_y = (width - w) // 2, (height - h) // 2
    borders = (pad_y, height - h - pad_y, pad_x, width - w - pad_x)
    padded = cv2.copyMakeBorder(image, *borders, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return padded, (pad_x, pad_y)


def box_area(boxes: np.ndarray) -> np.ndarray:
    """(n, 4) xyxy boxes -> (n,) areas (0 for an empty box)."""
    return (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)


def box_intersection(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(n, 4) and (m, 4) xyxy boxes -> (n, m) areas of their intersections."""
    top_left = np.maximum(boxes[:, None, :2], others[None, :, :2])
    bottom_right = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
    return (bottom_right - top_left).clip(0).prod(axis=2)


def boxes_to_original(
    boxes: torch.Tensor | np.ndarray,
    ratio: float | torch.Tensor,
    pad: tuple[float, float] | torch.Tensor | np.ndarray,
    orig_size: tuple[int, int] | torch.Tensor | np.ndarray,
) -> torch.Tensor | np.ndarray:
    """Map (n, 4) xyxy boxes in input pixels to original pixels: (box - pad) / ratio, clipped to the image.

    ``pad`` is (x, y) and ``orig_size`` is (h, w), as in a batch's ``pads`` and ``orig_sizes`` rows. Returns a
    new array of the input's type (float).
    """
    as_numpy = isinstance(boxes, np.ndarray)
    boxes_t = torch.as_tensor(boxes, dtype=torch.float32 if as_numpy else None).float()
    pad_x, pad_y = (float(v) for v in torch.as_tensor(pad).flatten()[:2])
    height, width = (float(v) for v in torch.as_tensor(orig_size).flatten()[:2])
    shift = boxes_t.new_tensor([pad_x, pad_y, pad_x, pad_y])
    limit = boxes_t.new_tensor([width, height, width, height])
    original = ((boxes_t - shift) / float(ratio)).clamp(min=0.0)
    original = torch.minimum(original, limit)
    return original.numpy() if as_numpy else original
