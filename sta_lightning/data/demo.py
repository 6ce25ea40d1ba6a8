"""A small synthetic COCO-format dataset of coloured shapes, generated on the spot (no download).

Five classes (``DEMO_CLASS_NAMES``) of filled, rotated shapes, one colour drawn per instance, on noisy
gradient backgrounds with thin clutter lines; images 240-480 px a side in varied aspect ratios, 1-6 objects
each with moderate overlap, a few empty images, and a few iscrowd regions (clusters of tiny shapes) that
evaluation ignores. Objects have a circumradius of 14 px up to 0.23 x the image's short side (at most
110 px) at the native size. The output is deterministic: the same
bytes for the same seed (each image has its own random stream, so changing the counts leaves the other
images unchanged).

Layout under ``root``: ``train/*.jpg``, ``val/*.jpg``, ``annotations/instances_{train,val}.json``.
``python -m sta_lightning.data.demo data/demo [--num-train N --num-val N --seed S]`` generates it by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import cv2
import numpy as np

DEMO_CLASS_NAMES = ("circle", "square", "triangle", "star", "cross")
DEMO_CATEGORY_IDS = (1, 2, 3, 4, 5)
_FORMAT_VERSION = 1
_SPLIT_CODES = {"train": 0, "val": 1}
_EMPTY_FRACTION = 0.04
_CROWD_FRACTION = 0.03


def annotation_path(root: str | Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def _generator_info(num_train: int, num_val: int, seed: int) -> dict:
    return {"num_train": num_train, "num_val": num_val, "seed": seed, "format": _FORMAT_VERSION}


def demo_is_complete(root: str | Path, num_train: int, num_val: int, seed: int) -> bool:
    """Whether ``root`` holds a finished demo dataset made with these settings (json is written last)."""
    expected = _generator_info(num_train, num_val, seed)
    for split in _SPLIT_CODES:
        try:
            info = json.loads(annotation_path(root, split).read_text())["info"]["generator"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if info != expected:
            return False
    return True


def _shape_polygon(kind: str, center: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """(k, 2) int32 vertices of a shape of circumradius ``radius`` px, rotated by ``angle`` radians."""
    if kind == "circle":
        cx, cy = (int(round(v)) for v in center)
        return cv2.ellipse2Poly((cx, cy), (int(round(radius)),) * 2, 0, 0, 360, 8).astype(np.int32)
    if kind == "square":
        angles, radii = np.arange(4) * math.pi / 2 + math.pi / 4, np.full(4, radius)
    elif kind == "triangle":
        angles, radii = np.arange(3) * 2 * math.pi / 3 - math.pi / 2, np.full(3, radius)
    elif kind == "star":
        angles, radii = np.arange(10) * math.pi / 5 - math.pi / 2, np.tile([radius, 0.45 * radius], 5)
    else:  # cross: a plus sign with arms 0.6 * radius wide whose outer corners lie on the circumcircle
        half = 0.3
        reach = math.sqrt(1.0 - half**2)
        corner_xy = np.array(
            [
                (half, -reach),
                (half, -half),
                (reach, -half),
                (reach, half),
                (half, half),
                (half, reach),
                (-half, reach),
                (-half, half),
                (-reach, half),
                (-reach, -half),
                (-half, -half),
                (-half, -reach),
            ]
        )
        angles = np.arctan2(corner_xy[:, 1], corner_xy[:, 0])
        radii = radius * np.hypot(corner_xy[:, 0], corner_xy[:, 1])
    points = np.stack([np.cos(angles + angle), np.sin(angles + angle)], axis=1) * radii[:, None] + center
    return np.round(points).astype(np.int32)


def _hsv_colour(
    rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]
) -> tuple:
    """An RGB colour (ints 0..255) with a uniform hue and saturation / value in the given ranges."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(*saturation) * 255, rng.uniform(*value) * 255]]])
    return tuple(int(v) for v in cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0])


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: a muted two-colour gradient, low-frequency texture and a few thin clutter lines."""
    start = np.array(_hsv_colour(rng, (0.0, 0.3), (0.2, 0.8)), dtype=np.float32)
    stop = np.array(_hsv_colour(rng, (0.0, 0.3), (0.2, 0.8)), dtype=np.float32)
    direction = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xs * math.cos(direction) + ys * math.sin(direction)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    image = start + (stop - start) * t[..., None]
    coarse = rng.normal(0, 18, size=(max(2, height // 24), max(2, width // 24), 3)).astype(np.float32)
    image += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(0, 7)):
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.line(
            image, p1, p2, _hsv_colour(rng, (0.0, 0.3), (0.1, 0.9)), int(rng.integers(1, 3)), cv2.LINE_AA
        )
    return image


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with (n, 4) xyxy boxes."""
    lt, rb = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


def _annotation(points: np.ndarray, category_id: int, iscrowd: int) -> dict:
    """COCO fields of an object polygon, or of a crowd region (the rectangle around its shapes' points)."""
    x1, y1 = points.min(axis=0)
    x2, y2 = points.max(axis=0) + 1  # a filled polygon covers its extreme pixels
    if iscrowd:
        points = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])
    return {
        "category_id": category_id,
        "bbox": [int(x1), int(y1), int(x2 - x1), int(y2 - y1)],
        "area": float(max(cv2.contourArea(points.astype(np.float32)), 1.0)),
        "segmentation": [points.reshape(-1).astype(float).tolist()],
        "iscrowd": iscrowd,
    }


def _draw_image(rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """One RGB image and its annotations (without ids)."""
    height, width = (int(v) for v in rng.integers(240, 481, size=2))
    image = _background(rng, height, width)
    annotations: list[dict] = []
    if rng.random() < _CROWD_FRACTION:
        kind = int(rng.integers(len(DEMO_CLASS_NAMES)))
        region = np.array([rng.uniform(0, width - 90), rng.uniform(0, height - 90)])
        colour = _hsv_colour(rng, (0.6, 1.0), (0.6, 1.0))
        tiny = [
            _shape_polygon(
                DEMO_CLASS_NAMES[kind], region + rng.uniform(6, 84, size=2), rng.uniform(3, 5), 0.0
            )
            for _ in range(rng.integers(6, 13))
        ]
        cv2.fillPoly(image, tiny, colour, cv2.LINE_AA)
        annotations.append(_annotation(np.concatenate(tiny), DEMO_CATEGORY_IDS[kind], iscrowd=1))
    if rng.random() >= _EMPTY_FRACTION:
        placed = np.zeros((0, 4))
        for _ in range(rng.integers(1, 7)):
            radius = rng.uniform(14, 0.23 * min(height, width))
            for _attempt in range(20):
                center = rng.uniform([radius + 1, radius + 1], [width - radius - 2, height - radius - 2])
                box = np.concatenate([center - radius, center + radius])
                if len(placed) == 0 or _box_iou(box, placed).max() < 0.3:
                    break
            else:
                continue
            kind = int(rng.integers(len(DEMO_CLASS_NAMES)))
            polygon = _shape_polygon(DEMO_CLASS_NAMES[kind], center, radius, rng.uniform(0, 2 * math.pi))
            cv2.fillPoly(image, [polygon], _hsv_colour(rng, (0.55, 1.0), (0.5, 1.0)), cv2.LINE_AA)
            annotations.append(_annotation(polygon, DEMO_CATEGORY_IDS[kind], iscrowd=0))
            placed = np.vstack([placed, box])
    noise = rng.normal(0, rng.uniform(2, 8), size=image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), annotations


def _write_split(root: Path, split: str, count: int, seed: int, info: dict) -> None:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
        image, objects = _draw_image(rng)
        file_name = f"{i:06d}.jpg"
        ok, encoded = cv2.imencode(
            ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]
        )
        if not ok:
            raise OSError(f"JPEG encoding failed for {folder / file_name}")
        (folder / file_name).write_bytes(encoded.tobytes())
        image_id = i + 1
        images.append(
            {"id": image_id, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]}
        )
        for annotation in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
    document = {
        "info": {"description": "sta_lightning demo shapes (synthetic)", "generator": info},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": category_id, "name": name, "supercategory": "shape"}
            for category_id, name in zip(DEMO_CATEGORY_IDS, DEMO_CLASS_NAMES, strict=True)
        ],
    }
    target = annotation_path(root, split)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".json.partial")
    partial.write_text(json.dumps(document))
    os.replace(partial, target)


def generate_demo_dataset(root: str | Path, num_train: int = 400, num_val: int = 100, seed: int = 0) -> Path:
    """Write the demo dataset under ``root`` (replacing the annotation files there) and return ``root``."""
    root = Path(root)
    info = _generator_info(num_train, num_val, seed)
    for split, count in (("train", num_train), ("val", num_val)):
        _write_split(root, split, count, seed, info)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the sta_lightning demo dataset (COCO format).")
    parser.add_argument("root", nargs="?", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = generate_demo_dataset(args.root, args.num_train, args.num_val, args.seed)
    print(f"demo dataset written to {root}: {args.num_train} train and {args.num_val} val images")


if __name__ == "__main__":
    main()
