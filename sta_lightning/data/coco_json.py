"""A COCO instances json, checked: the file, its categories and its objects, with errors naming the file,
record and field of any fault.

The json is parsed with ``json`` rather than pycocotools' ``COCO`` because ``COCO.createIndex`` stops with a
bare KeyError; the evaluator reads the same file with faster-coco-eval's ``COCO`` (the pycocotools API).
Boxes become xyxy training targets clipped to their image; crowd regions are never targets (evaluation reads
them from the json itself). An object's ``segmentation`` polygons travel with its box (copy-paste pastes by
them); RLE masks and malformed polygons are noted and leave the object with none.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sta_lightning.data.errors import EXAMPLES_SHOWN, AnnotationError, warn_data

CLIP_TOLERANCE_PX = 1.0  # COCO boxes overrun their image by float rounding; only larger overruns are reported


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(path: Path, where: str, record: object, key: str, check, expected: str):
    """record[key] if it passes ``check``, else an AnnotationError naming file, record and field."""
    if not isinstance(record, dict):
        raise AnnotationError(f"{path}: {where} must be a JSON object, got {record!r:.80}")
    if key not in record:
        raise AnnotationError(f"{path}: {where} has no '{key}' field")
    value = record[key]
    if not check(value):
        raise AnnotationError(f"{path}: {where} field '{key}' must be {expected}, got {value!r:.80}")
    return value


def load_annotation_json(path: str | Path, annotations_required: bool = True) -> dict:
    """Read an instances json; errors name the file (missing file, invalid JSON, missing top-level list).

    With ``annotations_required=False`` a file without an ``annotations`` list (an image info file, such as
    COCO's test-dev list, that names the images to predict) reads as one with no objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    if not annotations_required:
        data.setdefault("annotations", [])
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise AnnotationError(f"{path}: missing the top-level '{key}' list")
        if not isinstance(data[key], list):
            raise AnnotationError(f"{path}: top-level '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def parse_categories(path: str | Path, data: dict) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(category ids sorted ascending, their names): contiguous class index k is category_ids[k]."""
    path = Path(path)
    names: dict[int, str] = {}
    for i, category in enumerate(data["categories"]):
        where = f"categories[{i}]"
        category_id = _require(path, where, category, "id", _is_int, "an integer")
        name = _require(path, where, category, "name", lambda v: isinstance(v, str), "a string")
        if category_id in names:
            raise AnnotationError(f"{path}: {where} repeats category id {category_id}")
        names[category_id] = name
    if not names:
        raise AnnotationError(f"{path}: the 'categories' list is empty")
    ids = tuple(sorted(names))
    return ids, tuple(names[i] for i in ids)


def read_categories(path: str | Path) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The category ids (sorted) and names of an annotation file."""
    return parse_categories(path, load_annotation_json(path, annotations_required=False))


@dataclass
class COCOInstances:
    """The checked content of an instances json: categories (ids sorted, names), ``images`` id -> (file
    name, height, width), ``boxes_of`` id -> [(x1, y1, x2, y2, class index)] clipped to the image,
    ``polygons_of`` id -> per box, its polygons ((k, 2) float32 xy pixels each, none for an object without
    them), and what was dropped, clipped or left out (crowd regions; ``polygon_issues``: RLE masks and
    malformed polygons, read as none)."""

    category_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    images: dict[int, tuple[str, int, int]]
    boxes_of: dict[int, list[tuple[float, float, float, float, int]]]
    polygons_of: dict[int, list[list[np.ndarray]]]
    num_crowd: int = 0
    dropped_boxes: list[str] = field(default_factory=list)
    clipped_boxes: list[str] = field(default_factory=list)
    polygon_issues: list[str] = field(default_factory=list)


def clip_to_image(bbox: list[float], width: int, height: int) -> tuple[float, float, float, float] | None:
    """COCO [x, y, w, h] -> xyxy clipped to a width x height image; None when nothing is left of it."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    return None if x2 <= x1 or y2 <= y1 else (x1, y1, x2, y2)


def parse_polygons(segmentation: object, where: str, issues: list[str]) -> list[np.ndarray]:
    """An annotation's ``segmentation`` -> its polygons, (k, 2) float32 xy pixels each (k >= 3). None
    (absent) reads as no polygon; an RLE mask, or a polygon that is not an even count of at least 6
    finite numbers, reads as none too, with a line in ``issues`` naming ``where``."""
    if segmentation is None or segmentation == []:
        return []
    if isinstance(segmentation, dict):
        issues.append(f"{where} segmentation is an RLE mask")
        return []
    polygons = segmentation if isinstance(segmentation, list) else [segmentation]
    for k, polygon in enumerate(polygons):
        if not (
            isinstance(polygon, list)
            and len(polygon) >= 6
            and len(polygon) % 2 == 0
            and all(_is_number(v) and math.isfinite(v) for v in polygon)
        ):
            issues.append(f"{where} segmentation[{k}] is not an even count of at least 6 numbers")
            return []
    return [np.asarray(polygon, dtype=np.float32).reshape(-1, 2) for polygon in polygons]


def warn_box_fixes(name: str, dropped: list[str], clipped: list[str]) -> None:
    """One DataWarning for the boxes of annotation file ``name`` that were dropped or clipped, if any."""
    if dropped or clipped:
        warn_data(
            f"{name}: {len(dropped)} boxes with non-positive or non-finite sides or wholly outside their "
            f"image were dropped and {len(clipped)} boxes reaching outside their image were clipped to it. "
            f"First: {'; '.join((dropped + clipped)[:EXAMPLES_SHOWN])}"
        )


def read_instances(annotation_file: Path) -> COCOInstances:
    """Read and check ``annotation_file`` (an image info file, without annotations, too)."""
    data = load_annotation_json(annotation_file, annotations_required=False)  # image info files too
    category_ids, class_names = parse_categories(annotation_file, data)
    class_of = {category_id: k for k, category_id in enumerate(category_ids)}

    images: dict[int, tuple[str, int, int]] = {}  # id -> (file_name, height, width)
    for i, image in enumerate(data["images"]):
        where = f"images[{i}]"
        image_id = _require(annotation_file, where, image, "id", _is_int, "an integer")
        file_name = _require(
            annotation_file, where, image, "file_name", lambda v: isinstance(v, str) and v, "a file name"
        )
        width = _require(
            annotation_file, where, image, "width", lambda v: _is_int(v) and v > 0, "a positive integer"
        )
        height = _require(
            annotation_file, where, image, "height", lambda v: _is_int(v) and v > 0, "a positive integer"
        )
        if image_id in images:
            raise AnnotationError(f"{annotation_file}: {where} repeats image id {image_id}")
        images[image_id] = (file_name, height, width)

    boxes_of: dict[int, list[tuple[float, float, float, float, int]]] = {image_id: [] for image_id in images}
    polygons_of: dict[int, list[list[np.ndarray]]] = {image_id: [] for image_id in images}
    num_crowd = 0
    dropped: list[str] = []
    clipped: list[str] = []
    polygon_issues: list[str] = []
    for i, annotation in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        annotation_id = _require(annotation_file, where, annotation, "id", _is_int, "an integer")
        where = f"annotation {annotation_id}"
        image_id = _require(annotation_file, where, annotation, "image_id", _is_int, "an integer")
        category_id = _require(annotation_file, where, annotation, "category_id", _is_int, "an integer")
        bbox = _require(
            annotation_file,
            where,
            annotation,
            "bbox",
            lambda v: isinstance(v, list) and len(v) == 4 and all(_is_number(x) for x in v),
            "a list of 4 numbers [x, y, width, height]",
        )
        iscrowd = annotation.get("iscrowd", 0)
        if iscrowd not in (0, 1) or isinstance(iscrowd, bool):
            raise AnnotationError(
                f"{annotation_file}: {where} field 'iscrowd' must be 0 or 1, got {iscrowd!r:.80}"
            )
        if image_id not in images:
            raise AnnotationError(
                f"{annotation_file}: {where} refers to image_id {image_id}, which the 'images' list lacks"
            )
        if category_id not in class_of:
            raise AnnotationError(
                f"{annotation_file}: {where} has category_id {category_id}, which the 'categories' list "
                f"lacks (known ids: {', '.join(map(str, category_ids))})"
            )
        if iscrowd:
            num_crowd += 1
            continue
        _, height, width = images[image_id]
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            dropped.append(f"annotation {annotation_id} bbox {bbox} has non-positive or non-finite sides")
            continue
        clipped_box = clip_to_image(bbox, width, height)
        if clipped_box is None:
            dropped.append(f"annotation {annotation_id} bbox {bbox} lies outside its {width}x{height} image")
            continue
        x1, y1, x2, y2 = clipped_box
        overrun = max(x1 - x, y1 - y, x + w - x2, y + h - y2)
        if overrun > CLIP_TOLERANCE_PX:
            clipped.append(f"annotation {annotation_id} bbox {bbox} clipped to its {width}x{height} image")
        boxes_of[image_id].append((x1, y1, x2, y2, class_of[category_id]))
        polygons_of[image_id].append(parse_polygons(annotation.get("segmentation"), where, polygon_issues))

    return COCOInstances(
        category_ids, class_names, images, boxes_of, polygons_of, num_crowd, dropped, clipped, polygon_issues
    )
