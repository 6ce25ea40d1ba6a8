"""A checkpoint of an untrained detector whose detections score (nonzero COCO metrics on the demo shapes),
for tests of validate / test / predict that need no fit."""

from pathlib import Path

import lightning
import torch
from torch import nn

from sta_lightning.training import DetectionModule


def write_scoring_checkpoint(path: Path, num_classes: int = 5) -> Path:
    """Write at ``path`` the checkpoint of an untrained detector whose boxes and scores vary enough
    to overlap some of the demo shapes: He-initialised convolutions (the stock initialisation outputs little
    more than the head biases), box logits damped and biased towards short side distances (boxes of about 4
    strides). Returns ``path``."""
    torch.manual_seed(0)
    module = DetectionModule(
        num_classes=num_classes, sta=[{"layer": 8, "stoken_size": [1, 1], "num_heads": 2}]
    )
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d) and layer.weight.requires_grad:
                nn.init.kaiming_normal_(layer.weight)
        for branch in module.model.head.box_branches:
            branch[-1].weight.mul_(0.1)
            branch[-1].bias.copy_((-0.7 * torch.arange(16.0)).repeat(4))
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    return path
