"""The manual optimisation step of the YOLOv8 recipe: accumulation, the non-finite policy, clipping.

The number of batches summed per optimizer step ramps up during warmup (``TrainingSchedule``), which
Lightning's fixed ``accumulate_grad_batches`` cannot do. Each batch's loss (under DDP times the world size:
DDP averages gradients, the recipe sums them) is backpropagated; once ``accumulate`` iterations have passed
since the last optimizer step (the count runs across epochs), the summed gradients are clipped to
``gradient_clip_norm`` and stepped. The gradients summed since the last step carry over epoch ends and are
saved in checkpoints, so a resumed fit continues the same sum.

Host synchronisations: under a GradScaler (fp16 mixed precision) none are added: the scaler checks the
unscaled gradients and skips a non-finite step itself. Otherwise the loss is checked once per batch (every
rank must agree before the collective backward) and the gradient norm, computed once by the clipping, is
checked once per optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor

from sta_lightning.training.nonfinite import NonFiniteStepGuard


@dataclass(frozen=True)
class StepConfig:
    """The step group of a config (``model.step``): ``gradient_clip_norm``, the largest total gradient norm
    per optimizer step (0 disables clipping), and ``max_nonfinite_steps``, how many training steps in a row
    may be skipped for a NaN or inf loss or gradients before the fit stops (``training.nonfinite``)."""

    gradient_clip_norm: float = 10.0
    max_nonfinite_steps: int = 10


class GradientAccumulation:
    """Runs the backward and, every ``accumulate`` iterations, the optimizer step of a manual-optimisation
    LightningModule; holds the state that a checkpoint must carry (last step, pending gradients)."""

    def __init__(self, config: StepConfig) -> None:
        self.config = config
        self.guard = NonFiniteStepGuard(config.max_nonfinite_steps)
        self.last_optimizer_step = -1  # iteration (over all epochs) of the last optimizer step
        self._restored_gradients: dict[str, Tensor] = {}  # pending gradients read from a checkpoint

    def step(self, module: L.LightningModule, loss: Tensor, iteration: int, accumulate: int) -> None:
        """Backpropagate ``loss`` (the batch's total) and step the optimizer when the accumulation is full."""
        trainer = module.trainer
        scaled = _gradient_scaler_active(trainer)
        where = (iteration, trainer.current_epoch, trainer.global_step)
        # Every rank must agree: backward is collective under DDP. A GradScaler skips non-finite steps itself.
        if not scaled and not trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            self.guard.skipped("loss", *where)
            self.last_optimizer_step += 1  # so that the skipped batch does not count towards the accumulation
            return
        module.manual_backward(loss * trainer.world_size)
        if iteration - self.last_optimizer_step < accumulate:
            return
        optimizer = module.optimizers()
        # Gradients are synchronised across ranks by now, so every rank decides alike. Under a GradScaler the
        # clipping runs in ``clip`` after the unscaling (``on_before_optimizer_step``).
        if scaled or bool(torch.isfinite(self._clip(module.parameters()))):
            optimizer.step()
            self.guard.passed()
        else:
            self.guard.skipped("gradients", *where)
        optimizer.zero_grad(set_to_none=True)
        self.last_optimizer_step = iteration

    def clip_unscaled(self, module: L.LightningModule) -> None:
        """Clip the gradients that a GradScaler has just unscaled (call from ``on_before_optimizer_step``)."""
        if _gradient_scaler_active(module.trainer):
            self._clip(module.parameters())

    def _clip(self, parameters: Iterable[Tensor]) -> Tensor:
        """Clip the parameters' gradients to ``gradient_clip_norm`` (when > 0); returns their total 2-norm
        before clipping, computed once."""
        parameters = list(parameters)
        if self.config.gradient_clip_norm > 0:
            return torch.nn.utils.clip_grad_norm_(parameters, self.config.gradient_clip_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])

    def state_dict(self, module: L.LightningModule) -> dict[str, Any]:
        """The last optimizer step and the gradients summed since (they carry over epoch ends)."""
        pending = {
            name: parameter.grad.detach().clone()
            for name, parameter in module.named_parameters()
            if parameter.grad is not None
        }
        return {"last_optimizer_step": self.last_optimizer_step, "pending_gradients": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Read a checkpoint's state; the gradients go back in ``restore_gradients`` (Lightning zeroes the
        gradients after restoring the checkpoint, before the fit loop)."""
        self.last_optimizer_step = state["last_optimizer_step"]
        self._restored_gradients = state["pending_gradients"]

    def restore_gradients(self, module: L.LightningModule) -> None:
        """Put the pending gradients of a loaded checkpoint back on the parameters (at the training start)."""
        parameters = dict(module.named_parameters())
        for name, gradient in self._restored_gradients.items():
            parameters[name].grad = gradient.to(parameters[name].device)
        self._restored_gradients = {}


def _gradient_scaler_active(trainer: L.Trainer) -> bool:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler is not None and scaler.is_enabled()
