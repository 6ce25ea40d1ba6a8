"""sta_lightning.training: the LightningModule, the YOLOv8 optimizer recipe and the EMA callback."""

from sta_lightning.training.ema import ModelEMA
from sta_lightning.training.module import DetectionModule

__all__ = ["DetectionModule", "ModelEMA"]
