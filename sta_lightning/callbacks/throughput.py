"""Training throughput and fit wall time, kept in checkpoints so that a resumed fit adds to them."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class TrainingThroughput(L.Callback):
    """Counts the training images (all processes) and the seconds spent on training batches, data loading
    included and validation excluded, and the fit's wall time. ``images_per_second`` and ``fit_seconds``
    cover every attempt of a resumed fit up to its last checkpoint; each epoch logs
    ``train/images_per_second``.
    """

    def __init__(self) -> None:
        self.images = 0  # training images of every process
        self.train_seconds = 0.0  # wall time from each epoch's start (or validation's end) to its last batch
        self.fit_seconds = 0.0  # wall time of the earlier attempts, up to their last checkpoint
        self._mark: float | None = None
        self._fit_start: float | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.train_seconds if self.train_seconds else float("nan")

    def elapsed(self) -> float:
        """The fit's wall time in seconds, earlier attempts included."""
        now = time.perf_counter()
        return self.fit_seconds + (now - self._fit_start if self._fit_start is not None else 0.0)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training:  # a validation inside the epoch: the next batch's time starts here
            self._mark = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._mark is not None:
            self.train_seconds += now - self._mark
        self._mark = now
        self.images += len(batch["images"]) * trainer.world_size

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and trainer.loggers and self.train_seconds:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {"train/images_per_second": self.images_per_second}, step=trainer.global_step
                )

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images, "train_seconds": self.train_seconds, "fit_seconds": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.images = int(state_dict["images"])
        self.train_seconds = float(state_dict["train_seconds"])
        self.fit_seconds = float(state_dict["fit_seconds"])
