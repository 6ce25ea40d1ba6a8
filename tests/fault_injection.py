"""Faults injected into fits that run in a subprocess (``--trainer.callbacks+=fault_injection.X``).

The subprocess must run in its own process group (``start_new_session=True``): ``KillAt`` SIGKILLs that whole
group, DDP ranks included, as a node failure or a scheduler would.
"""

import os
import signal

from lightning.pytorch import Callback


class KillAt(Callback):
    """SIGKILL the fit's process group when batch ``batch`` of ``epoch`` starts, in training ("train") or in
    that epoch's validation ("validation"); global rank 0 pulls the trigger."""

    def __init__(self, epoch: int, batch: int, stage: str = "train") -> None:
        self.epoch, self.batch, self.stage = epoch, batch, stage

    def _maybe_kill(self, trainer, stage: str, batch_idx: int) -> None:
        if (stage, trainer.current_epoch, batch_idx) == (self.stage, self.epoch, self.batch):
            if trainer.is_global_zero:
                os.killpg(os.getpgrp(), signal.SIGKILL)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe_kill(trainer, "train", batch_idx)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._maybe_kill(trainer, "validation", batch_idx)


class SignalAt(Callback):
    """Send ``signum`` (default SIGUSR1, SLURM's warning before the time limit) to this process when training
    batch ``batch`` of ``epoch`` starts."""

    def __init__(self, epoch: int, batch: int, signum: int = signal.SIGUSR1.value) -> None:
        self.epoch, self.batch, self.signum = epoch, batch, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), self.signum)
