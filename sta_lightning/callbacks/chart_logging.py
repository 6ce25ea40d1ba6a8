"""Send a dashboard (a chart, the numbers behind it, W&B's native form of it) to the run folder and to the
trainer's W&B and TensorBoard loggers.

The one place that knows where dashboards go. Call it on global rank 0 only (callers check
``trainer.is_global_zero``); nothing here runs a collective.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from sta_lightning.callbacks.image_logging import key_path, run_folder

PLOTS_FOLDER = "plots"


def log_chart(
    trainer: Trainer,
    key: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    image: np.ndarray | None = None,
    wandb_values: Callable[[ModuleType], Mapping[str, Any]] | None = None,
) -> None:
    """Log one dashboard at the trainer's global step.

    - run folder: ``<run folder>/plots/<key>.csv`` (``columns`` and ``rows``; NaN written as an empty cell)
      and ``<key>.png`` (``image``, (H, W, 3) uint8), the latest ones (each call replaces them);
    - W&B loggers: ``wandb_values(wandb)``, {key: native chart, table or histogram}, built (and wandb
      imported) only if there is one;
    - TensorBoard loggers: ``image`` (``add_image`` under ``key``).
    """
    table_file = chart_file(trainer, key, "csv")
    table_file.parent.mkdir(parents=True, exist_ok=True)
    with open(table_file, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows([_csv_cell(value) for value in row] for row in rows)
    if image is not None:
        Image.fromarray(image).save(chart_file(trainer, key, "png"))
    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and wandb_values is not None:
            import wandb  # here, as importing it takes a while

            logger.log_metrics(dict(wandb_values(wandb)), step=step)
        elif isinstance(logger, TensorBoardLogger) and image is not None:
            logger.experiment.add_image(key, image, step, dataformats="HWC")


def log_numbers(trainer: Trainer, numbers: Mapping[str, float]) -> None:
    """Log scalars to every logger of the trainer at its global step (they land in metrics.csv, W&B, TB)."""
    for logger in trainer.loggers:
        logger.log_metrics(dict(numbers), step=trainer.global_step)


def chart_file(trainer: Trainer, key: str, suffix: str) -> Path:
    """Where ``log_chart`` writes ``key``'s file of type ``suffix``: ``<run folder>/plots/<key>.<suffix>``."""
    return Path(run_folder(trainer)) / PLOTS_FOLDER / f"{key_path(key)}.{suffix}"


def _csv_cell(value: Any) -> Any:
    return "" if isinstance(value, float | np.floating) and math.isnan(value) else value
