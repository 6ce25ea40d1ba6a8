"""sta_lightning.models."""

from sta_lightning.models.assigner import TaskAlignedAssigner, complete_iou  # noqa: F401
from sta_lightning.models.head import DetectHead  # noqa: F401
from sta_lightning.models.loss import YOLOv8Loss  # noqa: F401
from sta_lightning.models.postprocess import non_max_suppression  # noqa: F401
from sta_lightning.models.pretrained import (  # noqa: F401
    PretrainedReport,
    UnsafeCheckpointError,
    load_pretrained,
)
from sta_lightning.models.yolo import (  # noqa: F401
    DEFAULT_STA,
    SCALES,
    STAPlacement,
    YOLOv8,
    load_reference_state_dict,
)
