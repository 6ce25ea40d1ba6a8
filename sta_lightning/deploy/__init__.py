"""sta_lightning.deploy: run exported detectors without Lightning or albumentations."""

from sta_lightning.deploy.onnx_detector import OnnxDetector

__all__ = ["OnnxDetector"]
