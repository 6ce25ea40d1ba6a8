"""A callback for the fits of benchmarks/gpu_check.sh: one line per training epoch and per validation, so
that a fit's log shows how far it got (``--trainer.callbacks+=gpu_check_progress.EpochLines`` with
benchmarks/gpu_check on PYTHONPATH)."""

from __future__ import annotations

import time

from lightning.pytorch import Callback


class EpochLines(Callback):
    """Prints ``epoch N/M done at T s`` after each training epoch and the val/* metrics after each
    validation (rank 0)."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = time.monotonic()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            elapsed = time.monotonic() - self.start
            epoch = f"{trainer.current_epoch + 1}/{trainer.max_epochs}"
            print(f"epoch {epoch} done at {elapsed:.0f} s", flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("val/mAP", "val/mAP50")}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
        print(f"validation after epoch {trainer.current_epoch + 1}: {shown}", flush=True)
