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

# Layers whose weights are a normalisation scale (no weight decay), as torch.nn names them.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
GROUP_NAMES = ("bias", "weight", "norm")

OptimizerName = Literal["SGD", "AdamW"]
ScheduleName = Literal["linear", "cosine"]


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
    model: nn.Module,
    name: OptimizerName,
    lr: float,
    momentum: float,
    weight_decay: float,
    sta_lr_scale: float = 1.0,
    exclude: Iterable[nn.Parameter] = (),
) -> torch.optim.Optimizer:
    """SGD (nesterov) or AdamW (betas (momentum, 0.999)) over the three groups; decay on ``weight`` only.

    Each param group carries its ``name`` ("bias", "weight", "norm") and an ``lr_scale`` that multiplies the
    scheduled lr: 1, or ``sta_lr_scale`` for a second group of each name holding the STA parameters (those
    named ``sta.*``) when ``sta_lr_scale`` is not 1. Parameters in ``exclude`` (frozen ones) are left out.
    """
    skipped = {id(p) for p in exclude}
    scaled = (
        {id(p) for n, p in model.named_parameters() if n.startswith("sta.")} if sta_lr_scale != 1 else set()
    )
    param_groups = []
    for group, parameters in parameter_groups(model).items():
        kept = [p for p in parameters if id(p) not in skipped]
        decay = weight_decay if group == "weight" else 0.0
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
    if name == "SGD":
        optimizer = torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=True)
    elif name == "AdamW":
        optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=(momentum, 0.999))
    else:
        raise ValueError(f"optimizer must be 'SGD' or 'AdamW', got {name!r}")
    return optimizer


def accumulation_steps(nominal_batch_size: int, total_batch_size: int) -> int:
    """Batches summed per optimizer step: round(nominal / (batch x devices)), at least 1."""
    return max(round(nominal_batch_size / total_batch_size), 1)


def scaled_weight_decay(weight_decay: float, nominal_batch_size: int, total_batch_size: int) -> float:
    """Weight decay for the images one optimizer step really sees: wd x batch x accumulate / nominal."""
    accumulate = accumulation_steps(nominal_batch_size, total_batch_size)
    return weight_decay * total_batch_size * accumulate / nominal_batch_size


def warmup_iterations(warmup_epochs: float, batches_per_epoch: int, min_iterations: int) -> int:
    """Number of warmup iterations: max(round(warmup_epochs x batches), min_iterations); -1 for no warmup."""
    if warmup_epochs <= 0:
        return -1
    return max(round(warmup_epochs * batches_per_epoch), min_iterations)


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

    Decay per epoch e of E: linear ``(1 - e / E) (1 - lrf) + lrf``, or cosine from 1 to ``lrf``. During the
    first ``warmup_iters`` iterations the bias lr falls linearly from ``warmup_bias_lr``, the other lrs rise
    from 0, both to ``lr0 x decay(e)``; the momentum rises from ``warmup_momentum`` to ``momentum``; the
    accumulation rises from 1 to ``nominal_batch_size / total_batch_size`` (rounded).
    """

    lr0: float
    lrf: float
    epochs: int
    schedule: ScheduleName
    warmup_iters: int
    warmup_bias_lr: float
    warmup_momentum: float
    momentum: float
    nominal_batch_size: int
    total_batch_size: int

    def lr_factor(self, epoch: int) -> float:
        """The decay factor of ``epoch``: 1 at epoch 0, ``lrf`` at ``epochs``."""
        if self.schedule == "cosine":
            return ((1 - math.cos(epoch * math.pi / self.epochs)) / 2) * (self.lrf - 1) + 1
        return max(1 - epoch / self.epochs, 0) * (1.0 - self.lrf) + self.lrf

    def at(self, ni: int, epoch: int) -> StepSettings:
        lr = self.lr0 * self.lr_factor(epoch)
        if ni > self.warmup_iters:
            accumulate = accumulation_steps(self.nominal_batch_size, self.total_batch_size)
            return StepSettings(lrs=(lr, lr, lr), momentum=None, accumulate=accumulate)
        span = [0, self.warmup_iters]
        target_accumulate = self.nominal_batch_size / self.total_batch_size
        accumulate = max(1, int(np.interp(ni, span, [1, target_accumulate]).round()))
        bias_lr = float(np.interp(ni, span, [self.warmup_bias_lr, lr]))
        other_lr = float(np.interp(ni, span, [0.0, lr]))
        momentum = float(np.interp(ni, span, [self.warmup_momentum, self.momentum]))
        return StepSettings(lrs=(bias_lr, other_lr, other_lr), momentum=momentum, accumulate=accumulate)


def apply_step_settings(optimizer: torch.optim.Optimizer, settings: StepSettings) -> None:
    """Write each group's lr (the scheduled lr of its name times its ``lr_scale``) and, during warmup, the
    momentum into the param groups (``momentum`` for SGD; Adam's betas are left alone)."""
    lrs = dict(zip(GROUP_NAMES, settings.lrs, strict=True))
    for group in optimizer.param_groups:
        group["lr"] = lrs[group["name"]] * group.get("lr_scale", 1.0)
        if settings.momentum is not None and "momentum" in group:
            group["momentum"] = settings.momentum
