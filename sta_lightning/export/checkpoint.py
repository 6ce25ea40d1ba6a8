"""The detector of a checkpoint written by ``fit``, rebuilt without Lightning or the datamodule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sta_lightning.checkpoint_file import read_checkpoint
from sta_lightning.models import STAPlacement, YOLOv8

MODEL_PREFIX = "model."  # DetectionModule keeps its YOLOv8 as ``model``


def detector_from_checkpoint(path: str | Path) -> tuple[YOLOv8, dict[str, Any]]:
    """Rebuild the YOLOv8 (+ STA) of a DetectionModule checkpoint, in eval mode, with its ``state_dict``.

    ``fit`` saves the averaged (EMA) weights as ``state_dict``, so those are the weights returned. The
    architecture comes from the checkpoint's ``hyper_parameters`` (model_scale, num_classes, sta); the file
    is read with ``read_checkpoint`` (``weights_only``). Returns (detector, hyper_parameters). Raises
    FileNotFoundError naming a missing path, ``CheckpointError`` for a damaged file and ValueError for a
    checkpoint not written by ``fit``.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    hyper_parameters = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hyper_parameters, dict) or "model_scale" not in hyper_parameters:
        raise ValueError(
            f"checkpoint {str(path)!r} has no DetectionModule hyper_parameters (model_scale, num_classes, "
            "sta): was it written by python -m sta_lightning fit?"
        )
    placements = [STAPlacement(**placement) for placement in hyper_parameters.get("sta") or ()]
    detector = YOLOv8(hyper_parameters["model_scale"], hyper_parameters["num_classes"], placements)
    weights = {
        key.removeprefix(MODEL_PREFIX): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }
    detector.load_state_dict(weights)
    return detector.eval(), hyper_parameters
