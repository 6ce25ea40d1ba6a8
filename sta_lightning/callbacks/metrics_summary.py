"""One plain line of the final validation metrics at the end of a fit, for logs and CI.

The progress bar shows metrics beside the bar; without a terminal (a log file, CI) Rich lays them out in an
80-column console as a one-column strip of wrapped, cut names. This line has every metric in full.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


class FinalMetricsSummary(Callback):
    """At the end of ``fit``, global rank 0 prints the metrics of the last validation as one line:
    ``Final validation (epoch 19): val/mAP 0.6760  val/mAP50 0.8180 ...``.

    Args:
        prefix: the metrics shown: ``trainer.callback_metrics`` keys that start with it, in logging order.
        digits: decimals of each value.

    Nothing is printed when no validation ran in the fit (the sanity check does not count).
    """

    def __init__(self, prefix: str = "val/", digits: int = 4) -> None:
        self.prefix = prefix
        self.digits = digits
        self.epoch: int | None = None  # of the last validation

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epoch = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.epoch = trainer.current_epoch

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        line = self.summary(trainer.callback_metrics)
        if trainer.is_global_zero and line is not None:
            rank_zero_info(line)

    def summary(self, metrics: dict[str, Any]) -> str | None:
        """The line for these metrics, or None without a validation or a metric of the prefix."""
        shown = {name: float(value) for name, value in metrics.items() if name.startswith(self.prefix)}
        if self.epoch is None or not shown:
            return None
        values = "  ".join(f"{name} {value:.{self.digits}f}" for name, value in shown.items())
        return f"Final validation (epoch {self.epoch}): {values}"
