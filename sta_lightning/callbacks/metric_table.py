"""Log the COCO evaluation of each validation as W&B tables and keep the best mAP in the run summary."""

from typing import Any

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import WandbLogger

from sta_lightning.metrics.coco import COCO_STATS
from sta_lightning.training.module import DetectionModule


def coco_stat_rows(metrics: dict) -> list[list]:
    """The 12 COCO statistics as [metric, description, value] rows, in COCOeval.stats order."""
    return [[stat.key, stat.description, float(metrics[stat.key])] for stat in COCO_STATS]


def per_class_rows(
    ap_per_category: dict[int, float], category_ids: list[int], class_names: list[str]
) -> list[list]:
    """[class index, category id, class name, AP] rows for every class (AP -1: no ground truth evaluated)."""
    return [
        [index, category_id, name, float(ap_per_category.get(category_id, -1.0))]
        for index, (category_id, name) in enumerate(zip(category_ids, class_names, strict=True))
    ]


class COCOMetricTableCallback(Callback):
    """After each validation, W&B tables of the COCO statistics and per-class AP; ``best/mAP`` in the summary.

    Reads the metrics dict that the module's last validation computed (``DetectionModule.evaluation.metrics``:
    the 12 ``evaluate_coco`` keys plus "map_per_class"; the classes from the module too); only W&B loggers
    get tables. Logged on global rank 0 only
    (every rank holds the same metrics). Tables: ``<key>`` with columns metric, description, value (12 rows)
    and ``<key>_per_class`` with class_index, category_id, class, AP. The best mAP and its epoch survive a
    resume from checkpoint (callback state).
    """

    def __init__(self, key: str = "val/coco") -> None:
        self.key = key
        self.best_map = float("-inf")
        self.best_epoch = -1

    def on_validation_end(self, trainer: Trainer, pl_module: DetectionModule) -> None:
        metrics = pl_module.evaluation.metrics
        if trainer.sanity_checking or not trainer.is_global_zero or not metrics:
            return
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if metrics["map"] > self.best_map:
            self.best_map, self.best_epoch = float(metrics["map"]), trainer.current_epoch
        step = trainer.global_step
        for logger in wandb_loggers:
            logger.log_table(self.key, ["metric", "description", "value"], coco_stat_rows(metrics), step=step)
            if "map_per_class" in metrics:
                classes = pl_module.classes
                rows = per_class_rows(metrics["map_per_class"], classes.category_ids, classes.names)
                logger.log_table(
                    f"{self.key}_per_class", ["class_index", "category_id", "class", "AP"], rows, step=step
                )
            logger.experiment.summary["best/mAP"] = self.best_map
            logger.experiment.summary["best/epoch"] = self.best_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"best_map": self.best_map, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_map = state_dict["best_map"]
        self.best_epoch = state_dict["best_epoch"]
