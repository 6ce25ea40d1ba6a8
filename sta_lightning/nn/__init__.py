"""sta_lightning.nn."""

from sta_lightning.nn.sta import PixelLayout, StokenAssociation, StokenAttention, set_pixel_layout  # noqa: F401
from sta_lightning.nn.sta_block import STABlock  # noqa: F401
from sta_lightning.nn.yolo_blocks import SPPF, C2f, Concat, Conv  # noqa: F401
