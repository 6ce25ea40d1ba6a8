"""The reference training recipe, run by the numpy/OpenCV functions of ``yolo_augment`` on pixel boxes.

Training runs it on images already resized to long side S by ``sta_lightning.geometry``, which also holds the
letterbox of evaluation and prediction; its functions are re-exported here for existing imports.
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from albumentations.core.transforms_interface import ImageOnlyTransform

from sta_lightning.data.config import AugmentConfig
from sta_lightning.data.yolo_augment import (
    HSVGain,
    Rect,
    affine_boxes,
    affine_matrix,
    affine_window,
    copy_paste,
    mosaic_cell,
    mosaic_center,
    overlaps,
    paste,
    place_boxes,
    warp,
)
from sta_lightning.geometry import (  # noqa: F401 (re-exported)
    PAD_VALUE,
    boxes_to_original,
    letterbox,
    read_image,
    resize_long_side,
)


@dataclass(frozen=True)
class SamplePlan:
    """The random draws of one training sample, made before any image is read.

    ``shapes``: (h, w) of its images (one, or four for a mosaic); ``canvas_hw``: the warp's input, (2S, 2S)
    with mosaic, else (S, S) (the image padded, centred); ``cells``: per image, (x1, y1, x2, y2) on that
    input and of the image part that fills it (``mosaic_cell``); ``matrix``: (3, 3) float64 input -> output
    pixels, ``gain`` its scale factor; ``window``: the part of the input the output reads; ``visible``: per
    image, whether any of it lies in the window (an image that does not is never read: its boxes would all be
    dropped); ``hsv``: ``HSVGain`` parameters; ``pixel_seeds``: one per configured albumentations transform;
    ``flipud``, ``flip``: vertical and horizontal flips; ``paste_seed``: the seed of copy-paste's choice
    (None without copy-paste, whose window is the whole input: pasted pixels come from the mirror image).
    """

    shapes: tuple[tuple[int, int], ...]
    canvas_hw: tuple[int, int]
    cells: tuple[tuple[Rect, Rect], ...]
    matrix: np.ndarray
    gain: float
    window: Rect
    visible: tuple[bool, ...]
    hsv: dict
    pixel_seeds: tuple[int, ...]
    flipud: bool
    flip: bool
    paste_seed: int | None = None


def pixel_transform(spec: dict[str, Any]) -> ImageOnlyTransform:
    """An albumentations pixel-level transform from ``{class_path, init_args}``; a ValueError names a class
    that is not one, or that changes geometry."""
    class_path = spec.get("class_path", "") if isinstance(spec, dict) else ""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"data.augment.albumentations: cannot import {class_path!r} ({error})") from error
    if not (isinstance(cls, type) and issubclass(cls, ImageOnlyTransform)):
        raise ValueError(
            f"data.augment.albumentations: {class_path} is not a pixel-level albumentations transform "
            "(ImageOnlyTransform); transforms that move pixels would leave the boxes behind"
        )
    return cls(**spec.get("init_args", {}))


class TrainAugmentation:
    """The reference training recipe on images already resized to long side S.

    Order, as in the reference: a 4-image mosaic on a 2S x 2S canvas (the three extra images come from the
    dataset) or, without mosaic, a centred pad to S x S; copy-paste on the canvas (or the single image);
    then a random warp into the S x S output (scale
    factor U[1 - scale, 1 + scale], translation +-translate of S, rotation +-degrees, shear +-shear degrees,
    perspective; boxes under 2 px a side, beyond aspect ratio 100 or under 10 % of their scaled area are
    dropped) (``render``); the dataset's mixup, if any; then the configured albumentations, HSV gains
    (``HSVGain``: hue, saturation and value factors U[1 - g, 1 + g]), vertical flip with probability flipud
    and horizontal flip with probability fliplr (``finish``). Boxes are xyxy pixels.

    A sample is planned first (``plan``: every random draw, from the stream that ``reseed`` starts) and then
    rendered: only the part of the mosaic canvas that the warp reads is built. Not thread-safe: one instance
    per process (each DataLoader worker has its copy).
    """

    def __init__(self, image_size: int, augment: AugmentConfig = AugmentConfig()) -> None:
        self.size = image_size
        self.augment = augment
        self.hsv = HSVGain(augment.hsv_h, augment.hsv_s, augment.hsv_v)
        self.pixel_transforms = [pixel_transform(spec) for spec in augment.albumentations]
        self._random = random.Random(0)

    def reseed(self, seed: int) -> None:
        """Start the random stream of the next samples (the training dataset does so for every sample)."""
        self._random.seed(seed)

    def plan(self, shapes: list[tuple[int, int]], paste: bool = True) -> SamplePlan:
        """Draw one sample's augmentation for its images' (h, w) (long side S): one image, or four for a
        mosaic (the sample's own first). Draws, in order: mosaic centre, warp, HSV gains, vertical flip (when
        flipud > 0), horizontal flip, the albumentations' seeds (when configured), copy-paste's seed (when
        copy_paste > 0 and ``paste``: the dataset turns it off with mosaic)."""
        rng, size, augment = self._random, self.size, self.augment
        paste = paste and augment.copy_paste > 0
        shapes = tuple((int(h), int(w)) for h, w in shapes)
        if len(shapes) == 4:
            center = mosaic_center(rng, size)
            canvas_hw = (2 * size, 2 * size)
            cells = tuple(mosaic_cell(corner, center, hw, 2 * size) for corner, hw in enumerate(shapes))
        else:
            ((h, w),) = shapes
            x, y = (size - w) // 2, (size - h) // 2
            canvas_hw = (size, size)
            cells = (((x, y, x + w, y + h), (0, 0, w, h)),)
        matrix, gain = affine_matrix(
            rng,
            canvas_hw,
            size,
            augment.degrees,
            augment.translate,
            augment.scale,
            augment.shear,
            augment.perspective,
        )
        window = (0, 0, *canvas_hw[::-1]) if paste else affine_window(matrix, size, canvas_hw)
        self.hsv.set_random_seed(rng.getrandbits(32))
        hsv = self.hsv.get_params()
        flipud = augment.flipud > 0 and rng.random() < augment.flipud
        flip = rng.random() < augment.fliplr
        return SamplePlan(
            shapes=shapes,
            canvas_hw=canvas_hw,
            cells=cells,
            matrix=matrix,
            gain=gain,
            window=window,
            visible=tuple(overlaps(dst, window) for dst, _ in cells),
            hsv=hsv,
            pixel_seeds=tuple(rng.getrandbits(32) for _ in self.pixel_transforms),
            flipud=flipud,
            flip=flip,
            paste_seed=rng.getrandbits(32) if paste else None,
        )

    def render(
        self,
        plan: SamplePlan,
        images: list[np.ndarray | None],
        boxes: list[np.ndarray],
        labels: list[np.ndarray],
        polygons: list[list[list[np.ndarray]]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mosaic, copy-paste and warp of a planned sample: per image of the plan, (h, w, 3) uint8 RGB (None
        where not visible), (n, 4) xyxy px boxes, (n,) labels and, for copy-paste, per box its polygons
        ((k, 2) xy px arrays) -> (S, S, 3) uint8, (m, 4) float64 boxes, (m,) labels."""
        for image, hw, visible in zip(images, plan.shapes, plan.visible, strict=True):
            if visible and (image is None or image.shape[:2] != hw):
                raise ValueError(
                    f"the plan needs an image of (h, w) = {hw}, got {getattr(image, 'shape', None)}"
                )
        x1, y1, x2, y2 = plan.window
        # New memory per sample, not a buffer kept for reuse: freeing blocks of up to 2S x 2S x 3 bytes raises
        # glibc's mmap threshold, so that the sample's other image buffers are recycled instead of being
        # mapped and page-faulted anew (measured on coco128 at 640 px: 1.9x cached samples/s, 1.2x uncached).
        window = np.empty((y2 - y1, x2 - x1, 3), np.uint8)
        paste(plan.window, list(plan.cells), images, PAD_VALUE, window)
        visible = [k for k, shown in enumerate(plan.visible) if shown]
        rows = [(*place_boxes(boxes[k], plan.shapes[k], plan.cells[k], plan.canvas_hw), k) for k in visible]
        on_canvas = np.concatenate([b[keep] for b, keep, _ in rows] or [np.zeros((0, 4))])
        on_canvas_labels = np.concatenate(
            [np.asarray(labels[k])[keep] for _, keep, k in rows] or [np.zeros(0, np.int64)]
        )
        on_canvas_polygons = None
        if polygons is not None:  # placed, and clipped to their image's cell as the boxes are
            on_canvas_polygons = []
            for _, keep, k in rows:
                (x, y, x_end, y_end), (u, v, _, _) = plan.cells[k]
                shift = np.array([x - u, y - v], dtype=np.float32)
                on_canvas_polygons += [
                    [(p + shift).clip((x, y), (x_end, y_end)) for p in polygons[k][j]]
                    for j in np.flatnonzero(keep)
                ]
        if plan.paste_seed is not None and on_canvas_polygons is not None:
            # the window is the whole canvas (``plan``): canvas pixels are window pixels
            region = (0, 0, *plan.canvas_hw[::-1]) if len(plan.shapes) == 4 else plan.cells[0][0]
            pasted, pasted_boxes, pasted_polygons = copy_paste(
                window,
                region,
                on_canvas,
                on_canvas_polygons,
                self.augment.copy_paste,
                random.Random(plan.paste_seed),
            )
            on_canvas = np.concatenate([on_canvas, pasted_boxes])
            on_canvas_labels = np.concatenate([on_canvas_labels, on_canvas_labels[pasted]])
            on_canvas_polygons += pasted_polygons
        image = warp(window, plan.matrix, self.size, PAD_VALUE, origin=(x1, y1))
        out_boxes, keep = affine_boxes(
            on_canvas,
            plan.matrix,
            plan.gain,
            self.size,
            on_canvas_polygons if self.augment.polygon_boxes else None,
        )
        return image, out_boxes, on_canvas_labels[keep]

    def finish(
        self, plan: SamplePlan, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pixel transforms and flips of a planned sample on its rendered (S, S, 3) uint8 image and (m, 4)
        xyxy px boxes -> (S, S, 3) uint8, (m, 4) float32 boxes, (m,) int64 labels."""
        for transform, seed in zip(self.pixel_transforms, plan.pixel_seeds, strict=True):
            transform.set_random_seed(seed)
            image = transform(image=image)["image"]
        image = self.hsv.apply(image, **plan.hsv)
        if plan.flipud:
            image = cv2.flip(image, 0)
            boxes = np.stack([boxes[:, 0], self.size - boxes[:, 3], boxes[:, 2], self.size - boxes[:, 1]], 1)
        if plan.flip:
            image = cv2.flip(image, 1)
            boxes = np.stack([self.size - boxes[:, 2], boxes[:, 1], self.size - boxes[:, 0], boxes[:, 3]], 1)
        return image, boxes.astype(np.float32), labels.astype(np.int64)

    def apply(
        self,
        plan: SamplePlan,
        images: list[np.ndarray | None],
        boxes: list[np.ndarray],
        labels: list[np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``render`` then ``finish``: a planned sample without mixup."""
        return self.finish(plan, *self.render(plan, images, boxes, labels))

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
        items = [(image, boxes, labels), *(mosaic_items or [])]
        plan = self.plan([im.shape[:2] for im, _, _ in items])
        return self.apply(plan, *(list(part) for part in zip(*items, strict=True)))
