"""Precision-recall and F1-confidence curves from the COCOeval evaluation that gives the logged mAP.

COCOeval's accumulate step already samples, per category, the interpolated precision at 101 recall
thresholds (its AP is their mean) and the score of the detection at which each recall threshold is reached.
``PrecisionRecallCurves`` keeps those arrays (area "all", 100 detections per image), so the curves drawn are
the numbers behind AP, not a second evaluation. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

IoUChoice = Literal["0.5", "0.5:0.95"]


def iou_rows(iou_thresholds: np.ndarray, iou: IoUChoice) -> slice:
    """The rows of a (T, ...) COCOeval array for IoU 0.5 (one row) or 0.5:0.95 (all ten)."""
    if iou == "0.5:0.95":
        return slice(None)
    first = int(np.flatnonzero(np.isclose(iou_thresholds, 0.5))[0])
    return slice(first, first + 1)


@dataclass  # not frozen: torchmetrics rebuilds the dataclasses of a compute() result field by field
class PrecisionRecallCurves:
    """COCOeval's precision and scores at area "all", maxDets 100.

    iou_thresholds: (T,) (0.5, 0.55, ..., 0.95); recall_thresholds: (R,) (0, 0.01, ..., 1);
    category_ids: (K,) ascending, as COCOeval orders them;
    precision: (T, R, K) interpolated precision in [0, 1], -1 for a category without ground truth;
    scores: (T, R, K) score of the detection at which each recall threshold is first reached, 0 if never.
    """

    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray
    category_ids: np.ndarray
    precision: np.ndarray
    scores: np.ndarray

    @property
    def has_ground_truth(self) -> np.ndarray:
        """(K,) bool: the categories with ground truth in the evaluated images (precision defined)."""
        return (self.precision > -1).all(axis=(0, 1))

    def precision_per_class(self, iou: IoUChoice = "0.5") -> np.ndarray:
        """(R, K) precision at IoU 0.5, or its mean over the ten IoU thresholds; NaN without ground truth."""
        values = self.precision[iou_rows(self.iou_thresholds, iou)].mean(axis=0)
        return np.where(self.has_ground_truth, values, np.nan)

    def mean_precision(self, iou: IoUChoice = "0.5") -> np.ndarray:
        """(R,) precision averaged over the categories with ground truth (its mean is mAP50 or mAP); NaN
        when no category has ground truth."""
        values = self.precision_per_class(iou)[:, self.has_ground_truth]
        return values.mean(axis=1) if values.shape[1] else np.full(len(self.recall_thresholds), np.nan)

    def average_precision(self, iou: IoUChoice = "0.5:0.95") -> np.ndarray:
        """(K,) AP per category (mean over recall thresholds, and over IoU thresholds for "0.5:0.95"), -1
        without ground truth: COCOeval's per-category AP."""
        return np.where(self.has_ground_truth, self.precision_per_class(iou).mean(axis=0), -1.0)


@dataclass(frozen=True)
class F1Curve:
    """F1 score against the confidence threshold, at IoU 0.5.

    confidences: (C,) thresholds; f1, precision, recall: (C, K) per category, NaN without ground truth;
    mean_f1: (C,) mean over the categories with ground truth; best_index: where mean_f1 peaks (the lowest
    such confidence).
    """

    confidences: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    mean_f1: np.ndarray
    best_index: int

    @property
    def best_confidence(self) -> float:
        return float(self.confidences[self.best_index])

    @property
    def best_f1(self) -> float:
        return float(self.mean_f1[self.best_index])


def f1_confidence_curve(curves: PrecisionRecallCurves, num_points: int = 101) -> F1Curve:
    """F1 at ``num_points`` confidence thresholds in [0, 1], read off the IoU-0.5 precision-recall curve.

    For a threshold c and a category, the detections scoring at least c reach the highest recall threshold
    whose score is >= c; precision is COCOeval's interpolated precision there (0 and 0 when none is reached).
    So the best-F1 point lies on the PR curve that gives mAP50.
    """
    confidences = np.linspace(0.0, 1.0, num_points)
    rows = iou_rows(curves.iou_thresholds, "0.5")
    precision, scores = curves.precision[rows][0], curves.scores[rows][0]  # (R, K)
    reached = (scores[None] >= confidences[:, None, None]) & (precision[None] > 0)  # (C, R, K)
    # The recall thresholds reached form a prefix (scores fall as recall grows): the last is the count - 1.
    last = reached.sum(axis=1) - 1  # (C, K), -1: none reached
    safe = np.maximum(last, 0)
    recall = np.where(last >= 0, curves.recall_thresholds[safe], 0.0)
    precision_at = np.where(last >= 0, np.take_along_axis(precision, safe, axis=0), 0.0)
    total = precision_at + recall
    f1 = np.divide(2 * precision_at * recall, total, out=np.zeros_like(total), where=total > 0)
    valid = curves.has_ground_truth
    f1, precision_at, recall = (np.where(valid, values, np.nan) for values in (f1, precision_at, recall))
    mean_f1 = f1[:, valid].mean(axis=1) if valid.any() else np.zeros(num_points)
    return F1Curve(confidences, precision_at, recall, f1, mean_f1, int(np.argmax(mean_f1)))
