"""The layout of a checkpoint written by ``fit``, and the detector it holds, rebuilt without Lightning.

A ``fit`` checkpoint is Lightning's dict: ``state_dict`` holds the DetectionModule's tensors (its YOLOv8
under ``model.``, the averaged EMA weights), ``hyper_parameters`` its config groups (``detector``,
``classes``, the training recipe), and ``image_size`` the training input size. This module is the one place
that knows that layout: the CLI (``--ckpt_path``), export and ``detector.pretrained`` read checkpoints here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from sta_lightning.checkpoint_file import CheckpointError, read_checkpoint
from sta_lightning.classes import Classes
from sta_lightning.models.yolo import STAPlacement, YOLOv8

MODEL_PREFIX = "model."  # DetectionModule keeps its YOLOv8 as ``model``
# Flat hyperparameters of checkpoints written before the config groups (sta_lightning 0.1).
FLAT_LAYOUT_KEYS = ("model_scale", "num_classes", "lr0", "ema_decay")


class OutdatedCheckpointError(CheckpointError):
    """A checkpoint of an older layout than this version reads."""


def is_training_checkpoint(content: Any) -> bool:
    """Whether ``content`` (a loaded file) is a Lightning checkpoint of a DetectionModule."""
    return isinstance(content, Mapping) and "state_dict" in content and "hyper_parameters" in content


def check_layout(hyper_parameters: Mapping[str, Any], path: str | Path) -> None:
    """Raise ``OutdatedCheckpointError`` (naming the file and what changed) for a checkpoint of the flat
    layout of sta_lightning 0.1, and ``CheckpointError`` for one without a detector group."""
    if any(key in hyper_parameters for key in FLAT_LAYOUT_KEYS):
        raise OutdatedCheckpointError(
            f"checkpoint {path} was written by sta_lightning 0.1, whose model options were flat "
            "(model_scale, lr0, ema_decay, ...). Since 0.2 they are grouped (model.detector.scale, "
            "model.optimizer.lr0, model.ema.decay, ...; see docs/configuration.md), and 0.1 checkpoints do "
            "not load: start a new fit with this version"
        )
    if not isinstance(hyper_parameters.get("detector"), Mapping):
        raise CheckpointError(
            f"checkpoint {path} has no detector hyperparameters (scale, sta): was it written by "
            "python -m sta_lightning fit?"
        )


@dataclass
class TrainedDetector:
    """What a ``fit`` checkpoint says about its detector (``read_trained``)."""

    hyper_parameters: dict[str, Any]
    weights: dict[str, Tensor]  # the YOLOv8's state dict (EMA weights)
    classes: Classes
    image_size: int | None  # the training input size, None in checkpoints written without data

    @property
    def scale(self) -> str:
        return self.hyper_parameters["detector"]["scale"]

    def build(self) -> YOLOv8:
        """The detector with these weights, in eval mode."""
        detector = self.hyper_parameters["detector"]
        placements = [STAPlacement(**placement) for placement in detector.get("sta") or ()]
        model = YOLOv8(detector["scale"], self.classes.num_classes, placements)
        model.load_state_dict(self.weights)
        return model.eval()


def read_trained(content: Mapping[str, Any], path: str | Path) -> TrainedDetector:
    """The detector part of a loaded ``fit`` checkpoint (``content``, read from ``path``)."""
    hyper_parameters = dict(content.get("hyper_parameters") or {})
    check_layout(hyper_parameters, path)
    weights = {
        key.removeprefix(MODEL_PREFIX): value
        for key, value in content["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }
    classes = Classes(**hyper_parameters["classes"])
    return TrainedDetector(hyper_parameters, weights, classes, content.get("image_size"))


def detector_from_checkpoint(path: str | Path) -> tuple[YOLOv8, TrainedDetector]:
    """Rebuild the YOLOv8 (+ STA) of a ``fit`` checkpoint in eval mode, with its EMA weights.

    The file is read with ``read_checkpoint`` (``weights_only``). Raises FileNotFoundError naming a missing
    path, ``CheckpointError`` for a damaged file or one not written by ``fit``, and
    ``OutdatedCheckpointError`` for an older layout.
    """
    content = read_checkpoint(path)
    if not is_training_checkpoint(content):
        raise CheckpointError(f"checkpoint {path} is not a checkpoint written by python -m sta_lightning fit")
    trained = read_trained(content, path)
    return trained.build(), trained
