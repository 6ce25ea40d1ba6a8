"""The reference training recipe (albumentations 2.0.8 and the transforms of ``yolo_augment``).

Training runs it on images already resized to long side S by ``sta_lightning.geometry``, which also holds the
letterbox of evaluation and prediction; its functions are re-exported here for existing imports.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from sta_lightning.data.yolo_augment import HSVGain, YOLOAffine, YOLOMosaic
from sta_lightning.geometry import (  # noqa: F401 (re-exported)
    PAD_VALUE,
    boxes_to_original,
    letterbox,
    read_image,
    resize_long_side,
)


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
        """Seed both pipelines (the training dataset does so for every sample, see ``sample_seed``)."""
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
