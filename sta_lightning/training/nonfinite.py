"""The policy for non-finite training steps: skip them with a warning, stop after too many in a row.

A batch whose loss is NaN or inf on any process is skipped by every process (no backward, which is
collective under DDP, and it does not count towards the gradient accumulation); an optimizer step whose
summed gradients are not finite is skipped and those gradients are dropped. This is what the GradScaler of
fp16 mixed precision does on GPU; under a GradScaler the gradient check is left to it. ``max_in_row``
skips with no successful optimizer step in between stop the fit with ``NonFiniteTrainingError``: the
weights were never updated with a non-finite value, so the checkpoints written so far (``last.ckpt``) hold
the last good weights.
"""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn


class NonFiniteTrainingError(RuntimeError):
    """Too many training steps in a row had a non-finite loss or gradients."""


class NonFiniteStepWarning(UserWarning):
    """A training step was skipped because its loss or gradients were NaN or inf."""


class NonFiniteStepGuard:
    """Counts skipped (non-finite) training steps in a row; warns at each and raises at ``max_in_row``."""

    def __init__(self, max_in_row: int) -> None:
        if max_in_row < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_in_row}")
        self.max_in_row = max_in_row
        self.in_row = 0

    def passed(self) -> None:
        """An optimizer step was taken: the run of skips ends."""
        self.in_row = 0

    def skipped(self, what: str, iteration: int, epoch: int, global_step: int) -> None:
        """Record a skipped step (``what``: 'loss' or 'gradients'); raise after ``max_in_row`` in a row."""
        self.in_row += 1
        where = f"iteration {iteration} (epoch {epoch}, optimizer step {global_step})"
        if self.in_row >= self.max_in_row:
            raise NonFiniteTrainingError(
                f"{self.in_row} training steps in a row had a non-finite loss or gradients, the last one the "
                f"{what} at {where}: stopping. The weights were never updated with a non-finite value, so "
                "the checkpoints written so far (last.ckpt) hold the last good weights; check the data, or "
                "resume with a lower model.optimizer.lr0 (model.step.max_nonfinite_steps sets how many skips "
                "in a row are allowed)"
            )
        rank_zero_warn(
            f"Non-finite {what} at {where}: the step is skipped ({self.in_row} in a row; the fit stops at "
            f"{self.max_in_row})",
            category=NonFiniteStepWarning,
        )
