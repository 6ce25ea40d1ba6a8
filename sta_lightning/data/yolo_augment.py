"""The reference YOLOv8 training augmentations: numpy/OpenCV functions on pixel boxes (``TrainAugmentation``
runs them) and the same as albumentations 2.0.8 transforms of our own.

The library's ``A.Mosaic``, ``A.Affine`` and ``A.ColorJitter`` differ in effect from the reference recipe
(images centred in their mosaic cells with grey gaps, grey borders where the reference shows more mosaic,
a hue shift instead of a hue gain), so these reproduce what the reference does:

- mosaic (``mosaic_center``, ``mosaic_cell``, ``place_boxes``; ``YOLOMosaic``): four images on a 2S x 2S grey
  canvas, each against a random centre (cx, cy) drawn from U[S/2, 3S/2]: the first image ends at the centre
  (top left), the others extend from it to the top right, bottom left and bottom right; the canvas edges crop
  what sticks out.
- affine (``affine_matrix``, ``warp``, ``affine_boxes``; ``YOLOAffine``): perspective, rotation and scale,
  and shear about the input's centre, then a translation that puts that centre at U[0.5 - t, 0.5 + t] x S
  of an S x S output. On a 2S mosaic canvas a zoomed-out output shows more of the canvas, not grey. Boxes
  keep the reference's candidates: both sides > 2 px, aspect ratio < 100 and more than 10 % of the box's
  area (times scale^2) left after clipping.
- copy-paste (``copy_paste``): on the mosaic canvas (or the single image) before the warp, objects are
  mirrored left-right within it and pasted by their polygons where the mirror image covers less than 30 % of
  every object's box; a ``fraction`` of those candidates, rounded, is pasted.
- ``HSVGain``: hue, saturation and value multiplied by gains drawn from U[1 - g, 1 + g] (OpenCV HSV, hue in
  0..179, wrapping), through lookup tables.

In the functions boxes are (n, 4) float64 xyxy pixels. Inside an ``A.Compose`` they are the library's
normalised xyxy rows with extra label columns; the transforms change only the first four columns and drop
rows.
"""

from __future__ import annotations

import math
import random
from typing import Any

import cv2
import numpy as np
from albumentations.augmentations.mixing.functional import preprocess_selected_mosaic_items
from albumentations.core.bbox_utils import denormalize_bboxes, normalize_bboxes
from albumentations.core.transforms_interface import DualTransform, ImageOnlyTransform

from sta_lightning.geometry import box_area, box_intersection

MIN_BOX_SIDE = 2.0
"""Pixels: a box whose side is not longer than this after the affine is dropped."""
MAX_ASPECT_RATIO = 100.0
MIN_AREA_FRACTION = 0.1
"""A box keeps more than this fraction of its area (scaled by the affine) after clipping, or is dropped."""
MIN_POLYGON_AREA_FRACTION = 0.01
"""The same for a box derived from its object's warped polygon (the reference's rule on polygon labels)."""
POLYGON_POINTS = 1000
"""Points per polygon along which a warped polygon's box is measured (the reference resamples to 1000)."""
MAX_PASTE_OVERLAP = 0.3
"""Copy-paste: a mirrored object is a candidate when it covers under this fraction of every object's box."""

Rect = tuple[int, int, int, int]
"""(x1, y1, x2, y2) in pixels, x2 and y2 exclusive."""


def _shape(height: int, width: int) -> dict[str, int]:
    return {"height": height, "width": width}


def mosaic_center(rng: random.Random, size: int) -> tuple[int, int]:
    """The mosaic's random centre (cx, cy) on the 2S canvas: U[S/2, 3S/2] each, truncated to pixels."""
    return int(rng.uniform(size / 2, 3 * size / 2)), int(rng.uniform(size / 2, 3 * size / 2))


def mosaic_cell(
    corner: int, center: tuple[int, int], image_hw: tuple[int, int], canvas: int
) -> tuple[Rect, Rect]:
    """Where image ``corner`` (0 top left, 1 top right, 2 bottom left, 3 bottom right) goes on the canvas.

    Returns ((x1, y1, x2, y2) on the canvas, (x1, y1, x2, y2) of the part of the image that fills it), in
    pixels; both boxes have the same size. The image touches the centre with its opposite corner.
    """
    cx, cy = center
    h, w = image_hw
    if corner == 0:
        dst = (max(cx - w, 0), max(cy - h, 0), cx, cy)
        src = (w - (dst[2] - dst[0]), h - (dst[3] - dst[1]), w, h)
    elif corner == 1:
        dst = (cx, max(cy - h, 0), min(cx + w, canvas), cy)
        src = (0, h - (dst[3] - dst[1]), dst[2] - dst[0], h)
    elif corner == 2:
        dst = (max(cx - w, 0), cy, cx, min(cy + h, canvas))
        src = (w - (dst[2] - dst[0]), 0, w, dst[3] - dst[1])
    else:
        dst = (cx, cy, min(cx + w, canvas), min(cy + h, canvas))
        src = (0, 0, dst[2] - dst[0], dst[3] - dst[1])
    return dst, src


def place_boxes(
    boxes: np.ndarray, image_hw: tuple[int, int], cell: tuple[Rect, Rect], canvas_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(n, 4) xyxy pixel boxes of an (h, w) image -> (n, 4) float64 boxes on the (H, W) canvas where
    ``cell`` (``mosaic_cell``) puts the image, clipped to the image and to the canvas, and (n,) bool: the
    ones with something left."""
    (h, w), (ch, cw) = image_hw, canvas_hw
    (x1, y1, _, _), (u1, v1, _, _) = cell
    placed = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).clip(0, (w, h, w, h))
    placed = (placed + (x1 - u1, y1 - v1, x1 - u1, y1 - v1)).clip(0, (cw, ch, cw, ch))
    return placed, (placed[:, 2] > placed[:, 0]) & (placed[:, 3] > placed[:, 1])


def paste(
    window: Rect, cells: list[tuple[Rect, Rect]], images: list[np.ndarray | None], fill: int, out: np.ndarray
) -> np.ndarray:
    """The ``window`` of a canvas filled with ``fill`` on which each image is pasted where its cell puts it:
    ``out`` (the window's (h, w, 3) uint8) written and returned. Images that miss the window may be None."""
    wx1, wy1, wx2, wy2 = window
    out.fill(fill)
    for ((x1, y1, x2, y2), (u1, v1, _, _)), image in zip(cells, images, strict=True):
        ix1, iy1, ix2, iy2 = max(x1, wx1), max(y1, wy1), min(x2, wx2), min(y2, wy2)
        if ix1 < ix2 and iy1 < iy2:
            out[iy1 - wy1 : iy2 - wy1, ix1 - wx1 : ix2 - wx1] = image[
                v1 + iy1 - y1 : v1 + iy2 - y1, u1 + ix1 - x1 : u1 + ix2 - x1
            ]
    return out


def overlaps(a: Rect, b: Rect) -> bool:
    """Whether two rectangles share any pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def affine_matrix(
    rng: random.Random,
    input_hw: tuple[int, int],
    size: int,
    degrees: float,
    translate: float,
    scale: float,
    shear: float = 0.0,
    perspective: float = 0.0,
) -> tuple[np.ndarray, float]:
    """The random warp from an (H, W) input to the (S, S) output: (3, 3) float64 on pixel coordinates (an
    affine, or a homography with ``perspective``), and its scale factor. About the input's centre: the
    perspective row, then rotation and scale, then shear; then the translation. Draws, in this order: x and y
    perspective (only when ``perspective``), angle, scale factor, x and y shear angles (only when ``shear``),
    x and y translation."""
    height, width = input_hw
    center = np.array([[1, 0, -width / 2], [0, 1, -height / 2], [0, 0, 1]], dtype=np.float64)
    project = np.eye(3)
    if perspective:
        project[2, 0] = rng.uniform(-perspective, perspective)
        project[2, 1] = rng.uniform(-perspective, perspective)
    angle = rng.uniform(-degrees, degrees)
    gain = rng.uniform(1 - scale, 1 + scale)
    rotate = np.eye(3)
    rotate[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=gain)
    slant = np.eye(3)
    if shear:
        slant[0, 1] = math.tan(math.radians(rng.uniform(-shear, shear)))
        slant[1, 0] = math.tan(math.radians(rng.uniform(-shear, shear)))
    shift = np.eye(3)
    shift[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * size
    shift[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * size
    return shift @ slant @ rotate @ project @ center, gain  # products with identities are exact


def is_projective(matrix: np.ndarray) -> bool:
    """Whether a (3, 3) warp has a perspective row (it is not an affine)."""
    return bool(matrix[2, 0] or matrix[2, 1])


def affine_window(matrix: np.ndarray, size: int, input_hw: tuple[int, int]) -> Rect:
    """The part of an (H, W) input that bilinear sampling of the (S, S) output under ``matrix`` reads, with
    a pixel to spare on each side, clipped to the input (one pixel at least). Under a perspective warp, the
    whole input (a line of the output may map through infinity)."""
    height, width = input_hw
    if is_projective(matrix):
        return 0, 0, width, height
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]], np.float64)
    mapped = corners @ cv2.invertAffineTransform(matrix[:2]).T
    x1, y1 = (
        min(max(math.floor(v) - 1, 0), limit - 1)
        for v, limit in zip(mapped.min(0), (width, height), strict=True)
    )
    x2, y2 = (min(math.floor(v) + 3, limit) for v, limit in zip(mapped.max(0), (width, height), strict=True))
    return x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)


def warp(
    image: np.ndarray, matrix: np.ndarray, size: int, fill: int, origin: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """(S, S, C) output of ``matrix`` (3, 3) on an input of which ``image`` is the part from ``origin`` (x, y)
    on: bilinear, ``fill`` outside the input."""
    options = dict(flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(fill,) * 3)
    if is_projective(matrix):
        moved = matrix @ np.array([[1, 0, origin[0]], [0, 1, origin[1]], [0, 0, 1]], dtype=np.float64)
        return cv2.warpPerspective(image, moved, dsize=(size, size), **options)
    affine = matrix[:2].copy()
    affine[:, 2] += affine[:, :2] @ np.asarray(origin, dtype=np.float64)
    return cv2.warpAffine(image, affine, dsize=(size, size), **options)


def map_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(..., 2) xy pixels of the input -> the same under the (3, 3) warp ``matrix``, float64."""
    homogeneous = np.concatenate([points, np.ones_like(points[..., :1])], axis=-1).astype(np.float64)
    if is_projective(matrix):
        projected = homogeneous @ matrix.T
        return projected[..., :2] / projected[..., 2:]
    return homogeneous @ matrix[:2].T


def resample_polygon(polygon: np.ndarray, count: int = POLYGON_POINTS) -> np.ndarray:
    """(k, 2) polygon -> (count, 2) points along it, closed, evenly spaced in vertex index (the reference's
    resampling: an edge gets the same share of points whatever its length)."""
    closed = np.concatenate([polygon, polygon[:1]]).astype(np.float64)
    at, vertices = np.linspace(0, len(closed) - 1, count), np.arange(len(closed))
    return np.stack([np.interp(at, vertices, closed[:, 0]), np.interp(at, vertices, closed[:, 1])], 1)


def affine_boxes(
    boxes: np.ndarray,
    matrix: np.ndarray,
    gain: float,
    size: int,
    polygons: list[list[np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(n, 4) xyxy pixel boxes of the input -> (m, 4) float64 boxes in the (S, S) output (the mapped corners'
    enclosing box, clipped) and (n,) bool: the m kept by ``box_candidates``.

    With ``polygons`` (per box, its (k, 2) xy polygons; none for a box without), a box with polygons becomes
    the reference's polygon box instead: the enclosing box of its polygons' points (``resample_polygon``)
    that the warp maps inside the output, kept down to ``MIN_POLYGON_AREA_FRACTION`` of its scaled area."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    mapped = map_points(
        np.stack([np.stack([x, y], 1) for x, y in ((x1, y1), (x2, y1), (x1, y2), (x2, y2))]), matrix
    )
    new = np.concatenate([mapped.min(0), mapped.max(0)], axis=1).clip(0, size)
    area_fraction = np.full(len(boxes), MIN_AREA_FRACTION)
    for j, shapes in enumerate(polygons or []):
        if shapes:
            points = map_points(np.concatenate([resample_polygon(p) for p in shapes]), matrix)
            inside = points[((points >= 0) & (points <= size)).all(1)]
            new[j] = np.concatenate([inside.min(0), inside.max(0)]) if len(inside) else 0.0
            area_fraction[j] = MIN_POLYGON_AREA_FRACTION
    keep = box_candidates(boxes, new, gain, area_fraction)
    return new[keep], keep


def box_candidates(
    before: np.ndarray, after: np.ndarray, gain: float, area_fraction: float | np.ndarray = MIN_AREA_FRACTION
) -> np.ndarray:
    """(n, 4) xyxy boxes before and after an affine of scale ``gain`` -> (n,) bool: the ones to keep (sides
    over 2 px, aspect ratio under 100, more than ``area_fraction`` (scalar or (n,)) of the scaled area)."""
    w0, h0 = (before[:, 2] - before[:, 0]) * gain, (before[:, 3] - before[:, 1]) * gain
    w1, h1 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    aspect = np.maximum(w1 / (h1 + 1e-16), h1 / (w1 + 1e-16))
    return (
        (w1 > MIN_BOX_SIDE)
        & (h1 > MIN_BOX_SIDE)
        & (w1 * h1 / (w0 * h0 + 1e-16) > area_fraction)
        & (aspect < MAX_ASPECT_RATIO)
    )


def copy_paste(
    image: np.ndarray,
    region: Rect,
    boxes: np.ndarray,
    polygons: list[list[np.ndarray]],
    fraction: float,
    rng: random.Random,
) -> tuple[np.ndarray, np.ndarray, list[list[np.ndarray]]]:
    """The reference's copy-paste, in place on ``image`` (H, W, 3): objects mirrored left-right within
    ``region`` (the mosaic canvas, or the single image's part of it) and pasted by their polygons.

    ``boxes`` (n, 4) xyxy and ``polygons`` (per box, (k, 2) xy arrays; none for an object without) are
    pixels of ``image``. A mirrored object with polygons is a candidate when it covers less than 30 % of
    every object's box (its own included); ``round(fraction * candidates)`` of them, drawn by ``rng``, are
    pasted: the mirror image's pixels inside their mirrored polygons replace the image's. Returns the
    pasted objects' indices (k,), their mirrored boxes (k, 4) and their mirrored polygons, in the order drawn.
    """
    x1, y1, x2, y2 = region
    mirrored = boxes.copy()
    mirrored[:, 0], mirrored[:, 2] = x1 + x2 - boxes[:, 2], x1 + x2 - boxes[:, 0]
    flip, shift = np.array([-1, 1], np.float32), np.array([x1 + x2, 0], np.float32)
    cover = box_intersection(mirrored, boxes) / (box_area(boxes) + 1e-7)
    candidates = [int(j) for j in np.flatnonzero((cover < MAX_PASTE_OVERLAP).all(1)) if polygons[j]]
    chosen = rng.sample(candidates, k=round(fraction * len(candidates)))
    if chosen:
        mask = np.zeros(image.shape[:2], np.uint8)
        for j in chosen:
            for polygon in polygons[j]:
                cv2.fillPoly(mask, [polygon.astype(np.int32)], 1)
        part = image[y1:y2, x1:x2]
        pasted = cv2.flip(mask[y1:y2, x1:x2], 1).astype(bool)
        part[pasted] = cv2.flip(part, 1)[pasted]
    mirrored_polygons = [[polygon * flip + shift for polygon in polygons[j]] for j in chosen]
    return np.asarray(chosen, dtype=np.int64), mirrored[chosen].reshape(-1, 4), mirrored_polygons


class YOLOMosaic(DualTransform):
    """4-image mosaic on a (2S, 2S) canvas around a random centre; the output is the whole canvas.

    The three other images come as ``mosaic_metadata``, a list of dicts with ``image`` (H, W, 3) and, when the
    pipeline has boxes, ``bboxes`` and the label fields, as for ``A.Mosaic``. Boxes are clipped to the canvas
    and dropped when nothing of them is left.

    Args:
        size: S, the training input size in pixels; the canvas is 2S a side.
        fill: grey level of the canvas where no image lies.
    """

    def __init__(self, size: int, fill: int = 114, metadata_key: str = "mosaic_metadata", p: float = 1.0):
        super().__init__(p=p)
        self.size = size
        self.fill = fill
        self.metadata_key = metadata_key

    @property
    def targets_as_params(self) -> list[str]:
        return [self.metadata_key]

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        others = data.get(self.metadata_key) or []
        if len(others) != 3:
            raise ValueError(f"YOLOMosaic needs 3 other images in '{self.metadata_key}', got {len(others)}")
        if "bboxes" in data:
            others = preprocess_selected_mosaic_items(others, self.get_processor("bboxes"), None)
        center = mosaic_center(self.py_random, self.size)
        items = [{"image": data["image"], "bboxes": data.get("bboxes")}, *others]
        cells = [
            (item, mosaic_cell(corner, center, item["image"].shape[:2], 2 * self.size))
            for corner, item in enumerate(items)
        ]
        return {"cells": cells}

    def apply(self, img: np.ndarray, cells: list, **params: Any) -> np.ndarray:
        canvas = np.empty((2 * self.size, 2 * self.size, *img.shape[2:]), dtype=img.dtype)
        window = (0, 0, 2 * self.size, 2 * self.size)
        images = [item["image"] for item, _ in cells]
        return paste(window, [cell for _, cell in cells], images, self.fill, canvas)

    def apply_to_bboxes(self, bboxes: np.ndarray, cells: list, **params: Any) -> np.ndarray:
        canvas = (2 * self.size, 2 * self.size)
        placed = []
        for item, cell in cells:
            rows = item["bboxes"]
            if rows is None or len(rows) == 0:
                continue
            image_hw = item["image"].shape[:2]
            pixels = denormalize_bboxes(np.asarray(rows, dtype=np.float64), _shape(*image_hw))
            pixels[:, :4], keep = place_boxes(pixels[:, :4], image_hw, cell, canvas)
            placed.append(normalize_bboxes(pixels[keep], _shape(*canvas)))
        if not placed:
            return np.zeros((0, bboxes.shape[1]), dtype=bboxes.dtype)
        return np.concatenate(placed).astype(bboxes.dtype)


class YOLOAffine(DualTransform):
    """Random rotation, scale, shear, perspective and translation of any input into a (S, S) output,
    reference style (``affine_matrix``).

    The input's centre is rotated by U[-degrees, degrees] and scaled by U[1 - scale, 1 + scale] about
    itself (after the perspective row, before the shear), then placed at (U[0.5 - translate, 0.5 +
    translate] S, the same for y) in the output; the output's uncovered pixels are ``fill``. Box corners
    are mapped, the enclosing box clipped to the output, and boxes that fail the reference's candidate test
    (module docstring) are dropped.
    """

    def __init__(
        self,
        size: int,
        degrees: float = 0.0,
        translate: float = 0.1,
        scale: float = 0.5,
        shear: float = 0.0,
        perspective: float = 0.0,
        fill: int = 114,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.size = size
        self.degrees = degrees
        self.translate = translate
        self.scale = scale
        self.shear = shear
        self.perspective = perspective
        self.fill = fill

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        input_hw = params["shape"][:2]
        matrix, gain = affine_matrix(
            self.py_random,
            input_hw,
            self.size,
            self.degrees,
            self.translate,
            self.scale,
            self.shear,
            self.perspective,
        )
        return {"matrix": matrix, "gain": gain, "input_hw": input_hw}

    def apply(self, img: np.ndarray, matrix: np.ndarray, **params: Any) -> np.ndarray:
        return warp(img, matrix, self.size, self.fill)

    def apply_to_bboxes(
        self, bboxes: np.ndarray, matrix: np.ndarray, gain: float, input_hw: tuple[int, int], **params: Any
    ) -> np.ndarray:
        if len(bboxes) == 0:
            return bboxes
        rows = denormalize_bboxes(np.asarray(bboxes, dtype=np.float64), _shape(*input_hw))
        new, keep = affine_boxes(rows[:, :4], matrix, gain, self.size)
        out = rows[keep].copy()
        out[:, :4] = new
        return normalize_bboxes(out, _shape(self.size, self.size)).astype(bboxes.dtype)


class HSVGain(ImageOnlyTransform):
    """Multiply hue, saturation and value of an RGB uint8 image by gains from U[1 - g, 1 + g], g being
    ``hsv_h``, ``hsv_s`` and ``hsv_v`` (the reference's names).

    Hue is OpenCV's 0..179 and wraps around; saturation and value saturate at 255.
    """

    def __init__(self, hsv_h: float = 0.015, hsv_s: float = 0.7, hsv_v: float = 0.4, p: float = 1.0):
        super().__init__(p=p)
        self.gains = (hsv_h, hsv_s, hsv_v)

    def get_params(self) -> dict[str, Any]:
        return {"factors": tuple(1 + self.py_random.uniform(-1, 1) * g for g in self.gains)}

    def apply(self, img: np.ndarray, factors: tuple[float, float, float], **params: Any) -> np.ndarray:
        if not any(self.gains):
            return img
        levels = np.arange(256, dtype=np.float64)
        tables = (
            np.mod(levels * factors[0], 180),
            np.clip(levels * factors[1], 0, 255),
            np.clip(levels * factors[2], 0, 255),
        )
        channels = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV))
        hsv = cv2.merge([cv2.LUT(c, t.astype(np.uint8)) for c, t in zip(channels, tables, strict=True)])
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
