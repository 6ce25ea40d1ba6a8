"""sta_lightning.models."""

from sta_lightning.models.assigner import TaskAlignedAssigner, complete_iou  # noqa: F401
from sta_lightning.models.loss import YOLOv8Loss  # noqa: F401
from sta_lightning.models.postprocess import non_max_suppression  # noqa: F401
