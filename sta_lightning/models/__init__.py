"""sta_lightning.models: the YOLOv8 (+ STA) detector, its loss, NMS, pretrained weights and checkpoints."""

from sta_lightning.models.assigner import AssignerConfig, TaskAlignedAssigner, complete_iou
from sta_lightning.models.checkpoint import (
    OutdatedCheckpointError,
    TrainedDetector,
    detector_from_checkpoint,
)
from sta_lightning.models.detector import BuiltDetector, DetectorConfig, build_detector
from sta_lightning.models.head import DetectHead
from sta_lightning.models.loss import LossGains, YOLOv8Loss
from sta_lightning.models.postprocess import PREDICT_NMS, NMSConfig, non_max_suppression
from sta_lightning.models.pretrained import PretrainedReport, UnsafeCheckpointError, load_pretrained
from sta_lightning.models.yolo import (
    DEFAULT_STA,
    SCALES,
    STAPlacement,
    YOLOv8,
    check_image_size,
    is_sta_parameter,
    load_reference_state_dict,
)

__all__ = [
    "DEFAULT_STA",
    "PREDICT_NMS",
    "SCALES",
    "AssignerConfig",
    "BuiltDetector",
    "DetectHead",
    "DetectorConfig",
    "LossGains",
    "NMSConfig",
    "OutdatedCheckpointError",
    "PretrainedReport",
    "STAPlacement",
    "TaskAlignedAssigner",
    "TrainedDetector",
    "UnsafeCheckpointError",
    "YOLOv8",
    "YOLOv8Loss",
    "build_detector",
    "check_image_size",
    "complete_iou",
    "detector_from_checkpoint",
    "is_sta_parameter",
    "load_pretrained",
    "load_reference_state_dict",
    "non_max_suppression",
]
