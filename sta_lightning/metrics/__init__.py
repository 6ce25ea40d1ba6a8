"""sta_lightning.metrics."""

from sta_lightning.metrics.coco import COCO_STATS, STAT_NAMES, COCOStat, evaluate_coco, load_coco_annotations
from sta_lightning.metrics.confusion import image_confusion_matrix
from sta_lightning.metrics.curves import F1Curve, PrecisionRecallCurves, f1_confidence_curve
from sta_lightning.metrics.evaluator import COCOEvaluator

__all__ = [
    "COCO_STATS",
    "STAT_NAMES",
    "COCOEvaluator",
    "COCOStat",
    "F1Curve",
    "PrecisionRecallCurves",
    "evaluate_coco",
    "f1_confidence_curve",
    "image_confusion_matrix",
    "load_coco_annotations",
]
