"""sta_lightning.data."""

from sta_lightning.data.coco import AnnotationError, DataWarning
from sta_lightning.data.datamodule import COCODataModule, DemoDataModule
from sta_lightning.geometry import boxes_to_original

__all__ = ["AnnotationError", "COCODataModule", "DataWarning", "DemoDataModule", "boxes_to_original"]
