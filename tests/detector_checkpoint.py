"""A checkpoint of an untrained detector whose detections score (nonzero COCO metrics on the demo shapes),
for tests of validate / test / predict that need no fit."""

from pathlib import Path

import lightning
import torch
from torch import nn

from sta_lightning.classes import Classes
from sta_lightning.models import DetectorConfig
from sta_lightning.training import DetectionModule

STA = [{"layer": 8, "stoken_size": [1, 1], "num_heads": 2}]  # the STA block of the scoring detector


def write_scoring_checkpoint(
    path: Path, num_classes: int = 5, image_size: int | None = None, sta: list[dict] | None = STA
) -> Path:
    """Write at ``path`` the checkpoint of an untrained detector whose boxes and scores vary enough
    to overlap some of the demo shapes: He-initialised convolutions (the stock initialisation outputs little
    more than the head biases), box logits damped and biased towards short side distances (boxes of about 4
    strides). ``image_size``: the training size the checkpoint records (as ``fit`` does); None records none.
    ``sta``: the detector's STA placements (None: plain). Returns ``path``."""
    torch.manual_seed(0)
    module = DetectionModule(detector=DetectorConfig(sta=sta), classes=Classes.anonymous(num_classes))
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d) and layer.weight.requires_grad:
                nn.init.kaiming_normal_(layer.weight)
        for branch in module.model.head.box_branches:
            branch[-1].weight.mul_(0.1)
            branch[-1].bias.copy_((-0.7 * torch.arange(16.0)).repeat(4))
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    if image_size is not None:
        checkpoint["image_size"] = image_size
    torch.save(checkpoint, path)
    return path
