"""sta_lightning.training: the LightningModule, the YOLOv8 optimizer recipe and the EMA callback."""

import warnings

from sta_lightning.training.ema import ModelEMA
from sta_lightning.training.module import DetectionModule

# Lightning's own pytree helper (2.6) builds LeafSpec, which torch >= 2.14 deprecates with a FutureWarning on
# every dataloader setup: not ours to fix, and it says nothing to the user.
warnings.filterwarnings(
    "ignore",
    message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    category=FutureWarning,
    module=r"lightning\.pytorch\.utilities\._pytree",
)

__all__ = ["DetectionModule", "ModelEMA"]
