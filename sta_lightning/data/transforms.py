"""Image geometry and augmentation: reading, long-side resize, letterbox, the reference training recipe.

Every image is first resized so that its long side is the input size S (INTER_LINEAR, sides rounded up, as the
reference does), keeping the ratio ``scale = S / max(h0, w0)``. Evaluation and prediction then pad it to
S x S, centred, with grey 114 (``letterbox``): a box in input pixels maps back with
``original = (box - pad) / scale``. Training runs the reference recipe on the resized image with
albumentations 2.0.8 and the transforms of ``yolo_augment`` (``TrainAugmentation``).
"""

from __future__ import annotations

import math
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch

from sta_lightning.data.yolo_augment import HSVGain, YOLOAffine, YOLOMosaic

PAD_VALUE = 114
"""Grey level of letterbox, mosaic and affine borders (the reference value)."""


def read_image(path: str | Path, apply_exif_orientation: bool = False) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB; raises OSError naming the file when it cannot be decoded.

    Annotated datasets are read without EXIF rotation so that pixels match the annotation file's width, height
    and boxes (the frame the image scan checks); prediction may honour the EXIF orientation, as a viewer does.
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


class TrainAugmentation:
    """The reference training recipe on images already resized to long side S (albumentations 2.0.8).

    Order, as in the reference: a 4-image mosaic on a 2S x 2S canvas (``YOLOMosaic``; the three extra
    images come from the dataset) or, without mosaic, a centred pad to S x S; then a random affine into the
    S x S output (``YOLOAffine``: scale factor U[1 - scale, 1 + scale], translation +-translate of S,
    rotation +-degrees; boxes under 2 px a side, beyond aspect ratio 100 or under 10 % of their scaled area
    are dropped); HSV gains (``HSVGain``: hue, saturation and value factors U[1 - g, 1 + g]); horizontal flip
    with probability fliplr. Boxes are pascal_voc (xyxy pixels).
    """

    def __init__(
        self,
        image_size: int,
        degrees: float = 0.0,
        translate: float = 0.1,
        scale: float = 0.5,
        hsv_h: float = 0.015,
        hsv_s: float = 0.7,
        hsv_v: float = 0.4,
        fliplr: float = 0.5,
    ) -> None:
        size = image_size
        affine_colour_flip = [
            YOLOAffine(size, degrees=degrees, translate=translate, scale=scale, fill=PAD_VALUE),
            HSVGain(hue=hsv_h, saturation=hsv_s, value=hsv_v),
            A.HorizontalFlip(p=fliplr),
        ]
        pad = A.PadIfNeeded(size, size, position="center", border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE)
        mosaic = YOLOMosaic(size, fill=PAD_VALUE)
        self.with_mosaic = A.Compose([mosaic, *affine_colour_flip], bbox_params=self._bbox_params())
        self.without_mosaic = A.Compose([pad, *affine_colour_flip], bbox_params=self._bbox_params())

    @staticmethod
    def _bbox_params() -> A.BboxParams:
        return A.BboxParams(
            format="pascal_voc",
            label_fields=["labels"],
            # YOLOAffine drops boxes by the reference's rule; the library's filters stay off.
            min_width=0.0,
            min_height=0.0,
            min_visibility=0.0,
            clip=True,
            filter_invalid_bboxes=True,
        )

    def reseed(self, seed: int) -> None:
        """Seed both pipelines (each DataLoader worker, epoch and rank must get its own seed)."""
        self.with_mosaic.set_random_seed(seed)
        self.without_mosaic.set_random_seed(seed)

    def __call__(
        self,
        image: np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        mosaic_items: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(H, W, 3) uint8, (n, 4) xyxy px float32, (n,) int64 -> (S, S, 3) uint8, (m, 4) float32, (m,) int64.

        With ``mosaic_items`` (three (image, boxes, labels) triples) the mosaic is built, otherwise it is not.
        """
        inputs = {"image": image, "bboxes": boxes, "labels": labels}
        if mosaic_items is not None:
            inputs["mosaic_metadata"] = [
                {"image": im, "bboxes": bx, "labels": lb} for im, bx, lb in mosaic_items
            ]
            out = self.with_mosaic(**inputs)
        else:
            out = self.without_mosaic(**inputs)
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        out_labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        return out["image"], out_boxes, out_labels
