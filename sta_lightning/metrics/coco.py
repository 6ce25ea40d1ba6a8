"""Exact COCO bbox evaluation with faster-coco-eval (same numbers as pycocotools' COCOeval, several
times faster: benchmarks/metrics.py).

Stats follow COCOeval: AP/AR in [0, 1]; -1 where a value is undefined (no ground truth in that area range,
or for a category without ground truth in the evaluated images).
"""

from __future__ import annotations

import os
from collections.abc import Container, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from sta_lightning.data.coco_json import load_annotation_json
from sta_lightning.data.errors import AnnotationError
from sta_lightning.metrics.confusion import image_confusion_matrix
from sta_lightning.metrics.curves import PrecisionRecallCurves


class COCOStat(NamedTuple):
    """One of the 12 COCOeval statistics."""

    key: str  # key in evaluate_coco's result
    logged: str  # name logged by DetectionModule, after "val/" or "test/"
    description: str  # the wording of COCOeval's printed summary


# COCOeval.stats order (iouType "bbox", maxDets [1, 10, 100], area ranges all/small/medium/large).
COCO_STATS = (
    COCOStat("map", "mAP", "AP @ IoU=0.50:0.95, area=all, maxDets=100"),
    COCOStat("map_50", "mAP50", "AP @ IoU=0.50, area=all, maxDets=100"),
    COCOStat("map_75", "mAP75", "AP @ IoU=0.75, area=all, maxDets=100"),
    COCOStat("map_small", "mAP_small", "AP @ IoU=0.50:0.95, area=small, maxDets=100"),
    COCOStat("map_medium", "mAP_medium", "AP @ IoU=0.50:0.95, area=medium, maxDets=100"),
    COCOStat("map_large", "mAP_large", "AP @ IoU=0.50:0.95, area=large, maxDets=100"),
    COCOStat("mar_1", "mAR1", "AR @ IoU=0.50:0.95, area=all, maxDets=1"),
    COCOStat("mar_10", "mAR10", "AR @ IoU=0.50:0.95, area=all, maxDets=10"),
    COCOStat("mar_100", "mAR100", "AR @ IoU=0.50:0.95, area=all, maxDets=100"),
    COCOStat("mar_small", "mAR_small", "AR @ IoU=0.50:0.95, area=small, maxDets=100"),
    COCOStat("mar_medium", "mAR_medium", "AR @ IoU=0.50:0.95, area=medium, maxDets=100"),
    COCOStat("mar_large", "mAR_large", "AR @ IoU=0.50:0.95, area=large, maxDets=100"),
)
STAT_NAMES = tuple(stat.key for stat in COCO_STATS)

_REQUIRED_KEYS = {
    "images": ("id",),
    "annotations": ("id", "image_id", "category_id", "bbox", "area"),
    "categories": ("id",),
}
_DETECTION_KEYS = ("image_id", "bbox", "score", "category_id")


def load_coco_annotations(annotation_file: str | os.PathLike) -> COCO:
    """Load and index a COCO instances json; errors name the file (and the entry) if missing or malformed.

    Load once and pass the result to `evaluate_coco` to evaluate repeatedly (full COCO val takes ~1 s).
    """
    path = Path(annotation_file)
    dataset = load_annotation_json(path)  # file, JSON and top-level lists checked, errors naming the file
    for section, keys in _REQUIRED_KEYS.items():
        for index, entry in enumerate(dataset[section]):
            if not isinstance(entry, dict) or any(key not in entry for key in keys):
                raise AnnotationError(
                    f"COCO annotation file {path}: {section}[{index}] must be an object with keys {keys}, "
                    f"got {entry!r:.200}"
                )
    coco = COCO(dataset)
    coco.annotation_file = str(path)  # COCO stores its source (here the parsed dict): keep the file name
    return coco


def detections_to_array(detections: np.ndarray | Sequence[dict]) -> np.ndarray:
    """COCO result dicts (image_id, category_id, bbox x,y,w,h, score) or an array -> (N, 7) float64
    [image_id, x, y, w, h, score, category_id], boxes in original image pixels."""
    if isinstance(detections, np.ndarray):
        if detections.size == 0:
            return np.zeros((0, 7))
        if detections.ndim != 2 or detections.shape[1] != 7:
            raise ValueError(
                "detections array must have shape (N, 7) [image_id, x, y, w, h, score, category_id], "
                f"got {detections.shape}"
            )
        return detections.astype(np.float64)
    rows = []
    for index, detection in enumerate(detections):
        missing = [key for key in _DETECTION_KEYS if key not in detection]
        if missing or len(detection["bbox"]) != 4:
            raise ValueError(
                f"detections[{index}] must have keys {_DETECTION_KEYS} and a 4-value bbox, "
                f"got {detection!r:.200}"
            )
        rows.append((detection["image_id"], *detection["bbox"], detection["score"], detection["category_id"]))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 7)


def coco_results(
    detections: np.ndarray, box_decimals: int | None = None, score_decimals: int | None = None
) -> list[dict]:
    """(N, 7) [image_id, x, y, w, h, score, category_id] -> COCO result dicts {"image_id", "category_id",
    "bbox" [x, y, w, h], "score"} (the results format of COCO's evaluation server), values rounded to the
    given decimals or kept exact (``COCO.loadRes`` then reads back the same array)."""

    def rounded(value: float, decimals: int | None) -> float:
        return value if decimals is None else round(value, decimals)

    return [
        {
            "image_id": int(image_id),
            "category_id": int(category_id),
            "bbox": [rounded(v, box_decimals) for v in (x, y, w, h)],
            "score": rounded(score, score_decimals),
        }
        for image_id, x, y, w, h, score, category_id in np.asarray(detections, dtype=np.float64).tolist()
    ]


def _check_known_ids(ids: np.ndarray | Sequence[int], known: Container[int], what: str, source: str) -> None:
    """Raise ValueError naming up to 10 ids that are not integers or not among the annotation file's ids."""
    unique = np.unique(np.asarray(ids, dtype=np.float64))
    unknown = [value for value in unique.tolist() if value != int(value) or int(value) not in known]
    if unknown:
        shown = ", ".join(f"{value:.15g}" for value in unknown[:10])
        raise ValueError(f"{len(unknown)} {what} not in COCO annotations {source}: {shown}")


def _silent(*args, **kwargs) -> None:
    """Print function that discards faster-coco-eval's progress and summary lines."""


def evaluate_coco(
    annotation_file: str | os.PathLike | COCO,
    detections: np.ndarray | Sequence[dict],
    image_ids: Iterable[int] | None = None,
    per_class: bool = False,
    curves: bool = False,
    confusion: bool = False,
    verbose: bool = False,
) -> dict:
    """COCO bbox metrics of `detections` against the ground truth, identical to pycocotools' COCOeval.

    Args:
        annotation_file: COCO instances json path, or a `load_coco_annotations` result to reuse.
        detections: COCO result dicts or an (N, 7) array [image_id, x, y, w, h, score, category_id], boxes in
            original image pixels. Detections on images outside `image_ids` are ignored (as COCOeval does).
        image_ids: the images to evaluate (COCOeval params.imgIds); None = every image of the annotation file.
        per_class: also return "map_per_class": {category_id: AP@[.5:.95]} (-1 for categories without ground
            truth in the evaluated images), from COCOeval's precision array (area all, maxDets 100).
        curves: also return "curves": that precision array and its scores, a `PrecisionRecallCurves`.
        confusion: also return "confusion_matrix": (K + 1, K + 1) int64 counts over the evaluated images
            (`sta_lightning.metrics.confusion`, default thresholds), rows true and columns predicted, classes
            in ascending category id order, then background.
        verbose: print COCOeval's summary table to stdout (silent by default).

    Returns:
        dict with the 12 `STAT_NAMES` as floats (COCOeval.stats; -1 where undefined), plus the entries asked
        for.
    """
    coco = annotation_file if isinstance(annotation_file, COCO) else load_coco_annotations(annotation_file)
    source = coco.annotation_file if isinstance(coco.annotation_file, str) else "(in-memory annotations)"
    array = detections_to_array(detections)
    if not np.isfinite(array).all():
        bad_row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise ValueError(f"detection row {bad_row} has a non-finite value: {array[bad_row].tolist()}")
    _check_known_ids(array[:, 0], coco.imgs, "detection image ids", source)
    _check_known_ids(array[:, 6], coco.cats, "detection category ids", source)
    if image_ids is None:
        evaluated_ids = sorted(coco.getImgIds())
    else:
        evaluated_ids = sorted({int(image_id) for image_id in image_ids})
        if not evaluated_ids:
            raise ValueError("image_ids is empty: there is no image to evaluate")
        _check_known_ids(evaluated_ids, coco.imgs, "image_ids", source)

    print_function = print if verbose else _silent
    coco.print_function = print_function  # COCOeval(print_function=print) sets it on coco for good otherwise
    evaluator = COCOeval_faster(coco, coco.loadRes(array), iouType="bbox", print_function=print_function)
    evaluator.params.imgIds = evaluated_ids
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    metrics = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats, strict=True)}
    precision_recall = _precision_recall_curves(evaluator)
    if per_class:
        ap = precision_recall.average_precision("0.5:0.95")
        metrics["map_per_class"] = dict(zip(precision_recall.category_ids.tolist(), ap.tolist(), strict=True))
    if curves:
        metrics["curves"] = precision_recall
    if confusion:
        metrics["confusion_matrix"] = _confusion_matrix(coco, array, evaluated_ids, evaluator.params.catIds)
    return metrics


def _precision_recall_curves(evaluator: COCOeval_faster) -> PrecisionRecallCurves:
    """COCOeval's accumulated precision and scores at area "all", maxDets 100: (T, R, K) each."""
    return PrecisionRecallCurves(
        iou_thresholds=np.asarray(evaluator.params.iouThrs, dtype=np.float64),
        recall_thresholds=np.asarray(evaluator.params.recThrs, dtype=np.float64),
        category_ids=np.asarray(evaluator.params.catIds, dtype=np.int64),
        precision=np.asarray(evaluator.eval["precision"][:, :, :, 0, -1], dtype=np.float64),
        scores=np.asarray(evaluator.eval["scores"][:, :, :, 0, -1], dtype=np.float64),
    )


def _confusion_matrix(
    coco: COCO, detections: np.ndarray, image_ids: Sequence[int], category_ids: Sequence[int]
) -> np.ndarray:
    """Sum over ``image_ids`` of the confusion matrices of (N, 7) ``detections`` against the objects."""
    class_of = {int(category_id): index for index, category_id in enumerate(category_ids)}
    matrix = np.zeros((len(class_of) + 1,) * 2, dtype=np.int64)
    detections = detections[np.argsort(detections[:, 0], kind="stable")]
    starts = np.searchsorted(detections[:, 0], image_ids, side="left")
    stops = np.searchsorted(detections[:, 0], image_ids, side="right")
    for image_id, start, stop in zip(image_ids, starts, stops, strict=True):
        rows = detections[start:stop]
        classes = np.asarray([class_of[int(category_id)] for category_id in rows[:, 6]], dtype=np.float64)
        found = np.column_stack([_xywh_to_xyxy(rows[:, 1:5]), rows[:, 5], classes])
        objects = coco.imgToAnns.get(image_id, [])
        plain = [annotation for annotation in objects if not annotation.get("iscrowd", 0)]
        crowd = [annotation for annotation in objects if annotation.get("iscrowd", 0)]
        truth_classes = np.asarray([class_of[a["category_id"]] for a in plain], dtype=np.int64)
        matrix += image_confusion_matrix(
            found, _boxes_xyxy(plain), truth_classes, len(class_of), crowd_boxes=_boxes_xyxy(crowd)
        )
    return matrix


def _boxes_xyxy(annotations: Sequence[dict]) -> np.ndarray:
    """(n, 4) x1, y1, x2, y2 of COCO annotations."""
    return _xywh_to_xyxy(np.asarray([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4))


def _xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(n, 4) x, y, width, height -> (n, 4) x1, y1, x2, y2."""
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
