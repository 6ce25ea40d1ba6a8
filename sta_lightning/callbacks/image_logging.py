"""Send rendered images to whatever experiment loggers the trainer has: W&B, TensorBoard, or PNG files.

The one place that knows how each logger takes an image. Call it on global rank 0 only (callers check
``trainer.is_global_zero``); nothing here runs a collective.
"""

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image

from sta_lightning.callbacks.drawing import draw_detections

# Colours for box groups drawn into static images (loggers without interactive boxes).
BOX_GROUP_COLORS = {"predictions": (0, 255, 0), "ground_truth": (255, 64, 64)}


def log_images(
    trainer: Trainer,
    key: str,
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    boxes: Sequence[dict] | None = None,
) -> None:
    """Log (H, W, 3) uint8 RGB ``images`` under ``key`` at the trainer's global step.

    boxes: optional, one W&B box dict per image ({group: {"box_data": [...], "class_labels": {...}}},
    positions in the "pixel" domain): interactive overlays in W&B, drawn into the pixels for other loggers.
    W&B loggers get ``wandb.Image`` with captions, TensorBoard loggers ``add_image``; with neither, PNG files
    go to ``<trainer.log_dir>/images/<key>/``.
    """
    step = trainer.global_step
    handled = False
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            extra = {"boxes": list(boxes)} if boxes is not None else {}
            logger.log_image(key, list(images), step=step, caption=list(captions), **extra)
            handled = True
        elif isinstance(logger, TensorBoardLogger):
            for index, image in enumerate(_static_images(images, boxes)):
                logger.experiment.add_image(f"{key}/{index}", image, step, dataformats="HWC")
            handled = True
    if not handled:
        folder = Path(run_folder(trainer)) / "images" / key_path(key)
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(_static_images(images, boxes)):
            Image.fromarray(image).save(
                folder / f"epoch{trainer.current_epoch:03d}_step{step:06d}_{index}.png"
            )


def run_folder(trainer: Trainer) -> str:
    """The run's own folder, computed locally (``trainer.log_dir`` broadcasts, a collective that rank 0 alone
    would wait on forever): the log dir of a TensorBoard / CSV logger, ``save_dir/name/version`` of other
    loggers (where ModelCheckpoint puts ``checkpoints/``; for W&B ``<save_dir>/<project>/<run id>``), else
    the trainer's ``default_root_dir``."""
    if trainer.loggers:
        first = trainer.loggers[0]
        if isinstance(first, TensorBoardLogger | CSVLogger):
            return first.log_dir
        if first.save_dir is not None:
            version = first.version if isinstance(first.version, str) else f"version_{first.version}"
            return os.path.join(first.save_dir, str(first.name), version)
    return trainer.default_root_dir


def _static_images(images: Sequence[np.ndarray], boxes: Sequence[dict] | None) -> list[np.ndarray]:
    """The images with their W&B box groups (if any) drawn in, one colour per group."""
    if boxes is None:
        return list(images)
    drawn = []
    for image, groups in zip(images, boxes, strict=True):
        for group, payload in groups.items():
            corners = [
                [p["minX"], p["minY"], p["maxX"], p["maxY"]]
                for p in (box["position"] for box in payload["box_data"])
            ]
            captions = [box.get("box_caption", "") for box in payload["box_data"]]
            color = BOX_GROUP_COLORS.get(group, (255, 255, 0))
            image = draw_detections(
                image, np.asarray(corners, dtype=np.float32).reshape(-1, 4), captions, color
            )
        drawn.append(image)
    return drawn


def key_path(key: str) -> str:
    """A logging key as a relative folder path: '/' keeps nesting, other unsafe characters become '_'."""
    return "/".join(
        re.sub(r"[^A-Za-z0-9._-]", "_", part) for part in key.split("/") if part not in ("", ".", "..")
    )
