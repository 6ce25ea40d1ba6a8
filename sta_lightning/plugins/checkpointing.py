"""ModelCheckpoint whose ``last.ckpt`` always holds the latest state, so that a resume loses nothing."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

# Lightning 2.6 warns at every step checkpoint of a manually optimized module that it holds the weights after
# the optimizer step: that is the state a resume continues from, as intended here.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train")


class ResumableModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (best ``save_top_k`` by ``monitor``), with ``last.ckpt`` (``save_last``)
    written at every save point: each validation or epoch end, every ``every_n_train_steps`` optimizer steps.

    Lightning 2.6 writes ``last.ckpt`` only when a top-k file is written at the same step, so once the
    monitored metric stops improving ``last.ckpt`` falls behind (a resume from it would redo every epoch since
    the best one), and with manual optimization a step checkpoint waits for the first validation. Here
    ``last.ckpt`` follows the training; the top-k files still wait for the metric (without a warning before
    the first validation).
    """

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        # Before the first validation (an epoch end with check_val_every_n_epoch > 1) there is no metric to
        # rank by: Lightning would warn that the monitored key is missing. Only last.ckpt is written then; a
        # key still missing after a validation remains Lightning's error.
        ranked = self.monitor is None or self.monitor in monitor_candidates
        if ranked or trainer.fit_loop.epoch_loop.val_loop._has_run:
            super()._save_topk_checkpoint(trainer, monitor_candidates)
        # The epoch-end hooks write last.ckpt after this only "if a checkpoint was saved at this step".
        self._last_global_step_saved = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if pl_module.automatic_optimization:
            super().on_train_batch_end(trainer, pl_module, *args)
            return
        every = self._every_n_train_steps
        if every < 1 or trainer.global_step % every or self._should_skip_saving_checkpoint(trainer):
            return
        monitor_candidates = self._monitor_candidates(trainer)
        if self.monitor is None or self.monitor in monitor_candidates:
            self._save_topk_checkpoint(trainer, monitor_candidates)
        self._save_last_checkpoint(trainer, monitor_candidates)
