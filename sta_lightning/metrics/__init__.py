"""sta_lightning.metrics."""

from sta_lightning.metrics.coco import COCO_STATS, STAT_NAMES, COCOStat, evaluate_coco, load_coco_annotations
from sta_lightning.metrics.evaluator import COCOEvaluator

__all__ = ["COCO_STATS", "STAT_NAMES", "COCOStat", "COCOEvaluator", "evaluate_coco", "load_coco_annotations"]
