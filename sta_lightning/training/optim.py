"""The YOLOv8 training recipe: three parameter groups, the optimizer, per-step warmup and per-epoch decay.

Group order is bias, weight, norm: the warmup drives the bias group's lr down from ``warmup_bias_lr`` and the
others up from 0. The schedule is a pure function of (iteration, epoch), so nothing but the epoch and the
iteration needs saving to resume it; that is why it is not a torch ``LRScheduler``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from sta_lightning.models import is_sta_parameter

# Layers whose weights are a normalisation scale (no weight decay), as torch.nn names them.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
GROUP_NAMES = ("bias", "weight", "norm")

OptimizerName = Literal["SGD", "AdamW"]
ScheduleName = Literal["linear", "cosine"]


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer group of a config (``model.optimizer``).

    name: "SGD" (nesterov, momentum ``momentum``) or "AdamW" (betas (``momentum``, 0.999)).
    lr0: initial learning rate, reached at the end of warmup; lrf: final lr as a fraction of lr0 (at the last
        epoch); schedule: the per-epoch decay, "linear" or "cosine".
    momentum: SGD momentum / Adam beta1.
    weight_decay: decay of the conv/linear weights for a batch of ``nominal_batch_size`` images; scaled by
        batch x devices x accumulate / nominal_batch_size.
    nominal_batch_size: images per optimizer step that the recipe assumes (64); gradients of
        round(nominal / (batch x devices)) batches are summed per step.
    sta_lr_scale: learning-rate multiplier of the STA parameters (the new ones when fine-tuning).
    """

    name: OptimizerName = "SGD"
    lr0: float = 0.01
    lrf: float = 0.01
    schedule: ScheduleName = "linear"
    momentum: float = 0.937
    weight_decay: float = 5e-4
    nominal_batch_size: int = 64
    sta_lr_scale: float = 1.0


@dataclass(frozen=True)
class WarmupConfig:
    """The warmup group of a config (``model.warmup``): max(round(epochs x batches per epoch),
    min_iterations) iterations (epochs 0: none), during which the bias lr falls from ``bias_lr`` and the
    momentum rises from ``momentum``."""

    epochs: float = 3.0
    min_iterations: int = 100
    bias_lr: float = 0.1
    momentum: float = 0.8


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Split parameters into ``bias`` (every parameter named *bias*), ``norm`` (the weights of normalisation
    layers) and ``weight`` (everything else: conv and linear weights, layer scales), in module order."""
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if "bias" in f"{module_name}.{name}":
                groups["bias"].append(parameter)
            elif isinstance(module, NORM_LAYERS):
                groups["norm"].append(parameter)
            else:
                groups["weight"].append(parameter)
    return groups


def build_optimizer(
    model: nn.Module, config: OptimizerConfig, exclude: Iterable[nn.Parameter] = ()
) -> torch.optim.Optimizer:
    """SGD (nesterov) or AdamW (betas (momentum, 0.999)) over the three groups at lr ``lr0``; decay on
    ``weight`` only.

    Each param group carries its ``name`` ("bias", "weight", "norm") and an ``lr_scale`` that multiplies the
    scheduled lr: 1, or ``sta_lr_scale`` for a second group of each name holding the STA parameters when
    ``sta_lr_scale`` is not 1. Parameters in ``exclude`` (frozen ones) are left out.
    """
    skipped = {id(p) for p in exclude}
    sta_lr_scale = config.sta_lr_scale
    scaled = (
        {id(p) for n, p in model.named_parameters() if is_sta_parameter(n)} if sta_lr_scale != 1 else set()
    )
    param_groups = []
    for group, parameters in parameter_groups(model).items():
        kept = [p for p in parameters if id(p) not in skipped]
        decay = config.weight_decay if group == "weight" else 0.0
        param_groups.append(
            {
                "params": [p for p in kept if id(p) not in scaled],
                "name": group,
                "lr_scale": 1.0,
                "weight_decay": decay,
            }
        )
        if scaled:
            members = [p for p in kept if id(p) in scaled]
            param_groups.append(
                {"params": members, "name": group, "lr_scale": sta_lr_scale, "weight_decay": decay}
            )
    if config.name == "SGD":
        optimizer = torch.optim.SGD(param_groups, lr=config.lr0, momentum=config.momentum, nesterov=True)
    elif config.name == "AdamW":
        optimizer = torch.optim.AdamW(param_groups, lr=config.lr0, betas=(config.momentum, 0.999))
    else:
        raise ValueError(f"optimizer.name must be 'SGD' or 'AdamW', got {config.name!r}")
    return optimizer


def accumulation_steps(nominal_batch_size: int, total_batch_size: int) -> int:
    """Batches summed per optimizer step: round(nominal / (batch x devices)), at least 1."""
    return max(round(nominal_batch_size / total_batch_size), 1)


def scaled_weight_decay(weight_decay: float, nominal_batch_size: int, total_batch_size: int) -> float:
    """Weight decay for the images one optimizer step really sees: wd x batch x accumulate / nominal."""
    accumulate = accumulation_steps(nominal_batch_size, total_batch_size)
    return weight_decay * total_batch_size * accumulate / nominal_batch_size


def warmup_iterations(warmup: WarmupConfig, batches_per_epoch: int) -> int:
    """Number of warmup iterations: max(round(epochs x batches), min_iterations); -1 for no warmup."""
    if warmup.epochs <= 0:
        return -1
    return max(round(warmup.epochs * batches_per_epoch), warmup.min_iterations)


@dataclass(frozen=True)
class StepSettings:
    """What one training iteration uses: the lr of each group (bias, weight, norm), the momentum (None after
    warmup: it stays at its final value) and the number of batches accumulated per optimizer step."""

    lrs: tuple[float, float, float]
    momentum: float | None
    accumulate: int


@dataclass(frozen=True)
class TrainingSchedule:
    """lr, momentum and accumulation as functions of the iteration ``ni`` (counted over all epochs) and epoch.

    Decay per epoch e of E = ``epochs``: linear ``(1 - e / E) (1 - lrf) + lrf``, or cosine from 1 to ``lrf``.
    During the first ``warmup_iters`` iterations the bias lr falls linearly from the warmup's ``bias_lr``,
    the other lrs rise from 0, both to ``lr0 x decay(e)``; the momentum rises from the warmup's
    ``momentum`` to the optimizer's; the accumulation rises from 1 to ``nominal_batch_size /
    total_batch_size`` (rounded).
    """

    optimizer: OptimizerConfig
    warmup: WarmupConfig
    epochs: int
    warmup_iters: int
    total_batch_size: int

    def lr_factor(self, epoch: int) -> float:
        """The decay factor of ``epoch``: 1 at epoch 0, ``lrf`` at ``epochs``."""
        lrf = self.optimizer.lrf
        if self.optimizer.schedule == "cosine":
            return ((1 - math.cos(epoch * math.pi / self.epochs)) / 2) * (lrf - 1) + 1
        return max(1 - epoch / self.epochs, 0) * (1.0 - lrf) + lrf

    def at(self, ni: int, epoch: int) -> StepSettings:
        lr = self.optimizer.lr0 * self.lr_factor(epoch)
        nominal = self.optimizer.nominal_batch_size
        if ni > self.warmup_iters:
            accumulate = accumulation_steps(nominal, self.total_batch_size)
            return StepSettings(lrs=(lr, lr, lr), momentum=None, accumulate=accumulate)
        span = [0, self.warmup_iters]
        accumulate = max(1, int(np.interp(ni, span, [1, nominal / self.total_batch_size]).round()))
        bias_lr = float(np.interp(ni, span, [self.warmup.bias_lr, lr]))
        other_lr = float(np.interp(ni, span, [0.0, lr]))
        momentum = float(np.interp(ni, span, [self.warmup.momentum, self.optimizer.momentum]))
        return StepSettings(lrs=(bias_lr, other_lr, other_lr), momentum=momentum, accumulate=accumulate)


def apply_step_settings(optimizer: torch.optim.Optimizer, settings: StepSettings) -> None:
    """Write each group's lr (the scheduled lr of its name times its ``lr_scale``) and, during warmup, the
    momentum into the param groups (``momentum`` for SGD; Adam's betas are left alone)."""
    lrs = dict(zip(GROUP_NAMES, settings.lrs, strict=True))
    for group in optimizer.param_groups:
        group["lr"] = lrs[group["name"]] * group.get("lr_scale", 1.0)
        if settings.momentum is not None and "momentum" in group:
            group["momentum"] = settings.momentum
