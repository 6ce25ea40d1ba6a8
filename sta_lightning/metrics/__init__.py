"""sta_lightning.metrics."""

from sta_lightning.metrics.coco import STAT_NAMES, evaluate_coco, load_coco_annotations
from sta_lightning.metrics.evaluator import COCOEvaluator

__all__ = ["STAT_NAMES", "COCOEvaluator", "evaluate_coco", "load_coco_annotations"]
