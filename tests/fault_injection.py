"""Callbacks that inject faults into a real fit (given with ``--trainer.callbacks+=fault_injection.X``, so
they also reach fits in subprocesses and every DDP rank): a SIGKILL, a signal, non-finite losses and a
checkpoint write that stalls.

A fit that ``KillAt`` may kill must run in its own process group (``start_new_session=True``): it kills
that whole group, DDP ranks included, as a node failure or a scheduler would.
"""

import builtins
import os
import signal
import time
from typing import Literal

import torch
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


class NonFiniteLoss(Callback):
    """At the given iterations (counted over all epochs, from 0) and on the given rank only (None: every
    rank), the training loss becomes ``value`` ("nan", "inf" or "-inf") with ``poison="loss"``, or stays
    finite but gets NaN gradients with ``poison="gradients"`` (plus sqrt(0 x the parameters' sum), whose
    derivative is 0 x inf). The real loss is still computed."""

    def __init__(
        self,
        iterations: list[int],
        rank: int | None = None,
        value: Literal["nan", "inf", "-inf"] = "nan",
        poison: Literal["loss", "gradients"] = "loss",
    ) -> None:
        self.iterations = set(iterations)
        self.rank = rank
        self.value = float(value)
        self.poison = poison
        self.iteration = -1

    def on_fit_start(self, trainer, pl_module) -> None:
        loss = pl_module.loss
        compute = loss.forward

        def faulty_forward(*args, **kwargs):
            total, items = compute(*args, **kwargs)
            if self.iteration in self.iterations and self.rank in (None, trainer.global_rank):
                if self.poison == "loss":
                    total = total * self.value
                else:
                    total = total + torch.sqrt(0 * sum(p.sum() for p in pl_module.parameters()))
            return total, items

        loss.forward = faulty_forward  # an instance attribute: nn.Module.__call__ calls self.forward

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.iteration = batch_idx + trainer.num_training_batches * trainer.current_epoch


STALLED_MARKER = "FAULT_INJECTION: checkpoint write stalled half-way"


class StalledCheckpointWrite(Callback):
    """From the start of epoch ``from_epoch``, a file opened for binary writing whose name contains
    ``file_name`` gets half of its first write, then the process prints ``STALLED_MARKER`` and sleeps, so that
    the test can kill it in the middle of writing that checkpoint."""

    def __init__(self, from_epoch: int = 1, file_name: str = "last.ckpt") -> None:
        self.from_epoch = from_epoch
        self.file_name = file_name

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.from_epoch:
            return
        real_open = builtins.open
        file_name = self.file_name

        def stalling_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            named = isinstance(file, str | os.PathLike) and file_name in os.fspath(file)
            return _StallingFile(handle) if named and "w" in mode and "b" in mode else handle

        builtins.open = stalling_open


class _StallingFile:
    def __init__(self, handle) -> None:
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.close()

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        os.fsync(self.handle.fileno())
        print(STALLED_MARKER, flush=True)
        time.sleep(600)
        return len(data)


class KillOnce(KillAt):
    """``KillAt``, armed while the file ``marker`` does not exist: it creates the file before the kill, so
    that the resumed fit, and every later one, runs through."""

    def __init__(self, epoch: int, batch: int, marker: str, stage: str = "train") -> None:
        super().__init__(epoch, batch, stage)
        self.marker = marker

    def _maybe_kill(self, trainer, stage: str, batch_idx: int) -> None:
        if os.path.exists(self.marker) or (stage, trainer.current_epoch, batch_idx) != (
            self.stage,
            self.epoch,
            self.batch,
        ):
            return
        if trainer.is_global_zero:
            open(self.marker, "w").close()
        super()._maybe_kill(trainer, stage, batch_idx)
