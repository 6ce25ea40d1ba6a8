"""sta_lightning.export: checkpoints to ONNX, TorchScript and torch.export files (no Lightning needed)."""

from sta_lightning.export.exporter import FORMATS, DeployModel, export_detector
from sta_lightning.export.nms import PaddedNMS

__all__ = ["FORMATS", "DeployModel", "PaddedNMS", "export_detector"]
