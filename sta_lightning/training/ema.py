"""The YOLOv8 exponential moving average of the weights, as a Lightning ``WeightAveraging`` callback.

``WeightAveraging`` (Lightning 2.6) already does what the recipe needs: it updates an ``AveragedModel`` after
every optimizer step (``trainer.global_step`` counts manual-optimization steps too), swaps the averaged
weights in for validation, saves them as the checkpoint's ``state_dict`` (the raw weights go to
``current_model_state``) and restores both plus the update counter on resume. Only the averaging rule is ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor
from torch.optim.swa_utils import AveragedModel


@dataclass(frozen=True)
class EMAConfig:
    """The EMA group of a config (``model.ema``): whether to average, and ``ModelEMA``'s decay and tau."""

    enabled: bool = True
    decay: float = 0.9999
    tau: float = 2000.0


class ModelEMA(WeightAveraging):
    """EMA of every floating-point parameter and buffer (BN statistics included) after each optimizer step.

    With ``updates`` counted from 1, ``ema = d x ema + (1 - d) x weights`` and
    ``d = decay (1 - exp(-updates / tau))``, starting from the weights at the start of training. Integer
    buffers (BN batch counters) are left alone.

    Args:
        decay: the asymptotic decay (0.9999 in YOLOv8).
        tau: the ramp of the decay in updates (2000 in YOLOv8): d reaches 63 % of ``decay`` after tau updates.
        device: where to keep the average; None keeps it beside the model.
    """

    def __init__(self, decay: float = 0.9999, tau: float = 2000.0, device: str | None = None) -> None:
        if not 0.0 <= decay < 1.0 or tau <= 0:
            raise ValueError(f"ModelEMA: need 0 <= decay < 1 and tau > 0, got decay={decay}, tau={tau}")
        super().__init__(device=device, use_buffers=True, multi_avg_fn=self._average)
        self.decay = decay
        self.tau = tau

    def decay_at(self, updates: int) -> float:
        """The decay d used by update number ``updates`` (1-based)."""
        return self.decay * (1 - math.exp(-updates / self.tau))

    @property
    def averaged_model(self) -> AveragedModel | None:
        """The averaged copy of the LightningModule (its ``.module``), None outside ``fit``."""
        return self._average_model

    @property
    def updates(self) -> int:
        """EMA updates done so far."""
        return 0 if self._average_model is None else int(self._average_model.n_averaged) - 1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._average_model is not None:
            # AveragedModel copies the weights at its first update (n_averaged == 0); the YOLOv8 EMA instead
            # averages from the initial weights at update 1, so the counter starts at 1 and holds updates + 1.
            self._average_model.n_averaged.fill_(1)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The precision plugin converts the module (e.g. precision "64-true") after setup made the copy.
        if self._average_model is not None:
            self._average_model.to(dtype=pl_module.dtype)

    def _average(self, averaged: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> None:
        """AveragedModel's multi_avg_fn: called once per (device, dtype) group with n_averaged = updates."""
        if not averaged[0].is_floating_point():
            return
        d = self.decay_at(int(n_averaged))
        torch._foreach_lerp_(averaged, current, 1.0 - d)
