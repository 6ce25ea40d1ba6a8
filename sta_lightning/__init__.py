"""sta_lightning: YOLOv8 detectors with Super Token Attention, trained with PyTorch Lightning."""

from sta_lightning.training import DetectionModule, ModelEMA

__all__ = ["DetectionModule", "ModelEMA"]
