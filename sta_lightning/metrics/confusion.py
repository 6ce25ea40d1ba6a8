"""Detection confusion matrix: which class each ground-truth object was detected as, with a background class
for missed objects and for detections that match no object. Pure numpy.

Per image, detections scoring above ``confidence`` are matched one-to-one to ground-truth boxes of any class
whose IoU exceeds ``iou``, greedily from the highest IoU down. A matched pair counts at (true class,
predicted class); an unmatched object at (its class, background); an unmatched detection at (background,
its class), unless it lies in a crowd region (intersection over its own area above ``iou``), which COCO
evaluation ignores too.
"""

from __future__ import annotations

import numpy as np

from sta_lightning.geometry import box_area, box_intersection

CONFIDENCE = 0.25  # the detections drawn in the matrix, as the reference implementation draws it
IOU = 0.45


def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(n, 4) and (m, 4) x1, y1, x2, y2 boxes -> (n, m) intersection over union."""
    intersection = box_intersection(boxes, others)
    area = box_area(boxes)[:, None] + box_area(others)[None, :] - intersection
    return np.divide(intersection, area, out=np.zeros_like(intersection), where=area > 0)


def image_confusion_matrix(
    detections: np.ndarray,
    truth_boxes: np.ndarray,
    truth_classes: np.ndarray,
    num_classes: int,
    crowd_boxes: np.ndarray | None = None,
    confidence: float = CONFIDENCE,
    iou: float = IOU,
) -> np.ndarray:
    """Confusion counts of one image.

    Args:
        detections: (n, 6) x1, y1, x2, y2, score, class index.
        truth_boxes: (m, 4) x1, y1, x2, y2 of the (non-crowd) objects, same pixels as the detections.
        truth_classes: (m,) class indices.
        num_classes: K.
        crowd_boxes: (c, 4) x1, y1, x2, y2 crowd regions, or None.
        confidence: detections scoring above it are counted.
        iou: a detection and an object match when their IoU exceeds it.

    Returns:
        (K + 1, K + 1) int64 counts, rows the true class and columns the predicted class; index K is
        background.
    """
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    detections = detections[detections[:, 4] > confidence]
    predicted = detections[:, 5].astype(np.int64)
    truth_classes = np.asarray(truth_classes, dtype=np.int64)
    overlaps = box_iou(truth_boxes, detections[:, :4])  # (m, n)
    truth_matched = np.zeros(len(truth_boxes), dtype=bool)
    detection_matched = np.zeros(len(detections), dtype=bool)
    pairs = np.argwhere(overlaps > iou)
    for truth, detection in pairs[np.argsort(-overlaps[tuple(pairs.T)], kind="stable")]:
        if not truth_matched[truth] and not detection_matched[detection]:
            truth_matched[truth] = detection_matched[detection] = True
            matrix[truth_classes[truth], predicted[detection]] += 1
    np.add.at(matrix[:, num_classes], truth_classes[~truth_matched], 1)
    unmatched = ~detection_matched
    if crowd_boxes is not None and len(crowd_boxes) and unmatched.any():
        inside = box_intersection(detections[:, :4], crowd_boxes) > iou * box_area(detections[:, :4])[:, None]
        unmatched &= ~inside.any(axis=1)
    np.add.at(matrix[num_classes], predicted[unmatched], 1)
    return matrix


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the share of each true class's objects per predicted class); rows that
    sum to 0 stay 0."""
    totals = matrix.sum(axis=1, keepdims=True).astype(np.float64)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
