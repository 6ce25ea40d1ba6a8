"""SLURM pre-emption: checkpoint at a batch boundary on the warning signal, then requeue the job."""

from __future__ import annotations

import os
import signal
import subprocess
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def slurm_job_id() -> str | None:
    """The id that ``scontrol requeue`` takes: ``ARRAYJOB_TASK`` for an array task, else SLURM_JOB_ID."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this job; a warning if that fails (training then goes on until the time limit)."""
    job_id = slurm_job_id()
    try:
        result = subprocess.call(["scontrol", "requeue", job_id])
    except OSError as error:
        result = error
    if result == 0:
        rank_zero_info(f"Requeued SLURM job {job_id}")
    else:
        rank_zero_warn(f"`scontrol requeue {job_id}` failed ({result}): the job will not restart by itself")


class SLURMRequeue(L.Callback):
    """On SLURM's warning signal (``#SBATCH --signal=SIGUSR1@90``), save ``hpc_ckpt_N.ckpt`` at the end of the
    current training batch and requeue the job; the requeued job resumes from it at the next batch.

    Lightning's own handler saves inside the signal handler, wherever training happens to be (between a
    backward and its optimizer step, say), a state that no resume continues exactly. This handler only notes
    the signal. At the end of each batch the processes agree whether any of them was signalled; if so, all
    save the checkpoint (in the trainer's ``default_root_dir``, where Lightning looks for ``hpc_ckpt_*.ckpt``
    when a fit starts under SLURM without ``--ckpt_path``) and global rank 0 runs ``scontrol requeue``.
    Training goes on until SLURM stops the job.
    """

    def __init__(self, signum: int = signal.SIGUSR1.value) -> None:
        self.signum = signum
        self._signalled = False
        self._previous_handler: Any = None

    def _note_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._signalled = False
        self._previous_handler = signal.signal(self.signum, self._note_signal)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            return
        self._signalled = False
        path = _CheckpointConnector.hpc_save_path(trainer.default_root_dir)
        rank_zero_info(f"SLURM signal {self.signum}: saving {path} and requeueing the job")
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            requeue_slurm_job()

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(self.signum, self._previous_handler)
            self._previous_handler = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, error: BaseException) -> None:
        self._restore_handler()
