"""The Lightning plugin behind ``Trainer(sync_batchnorm=True)`` on any device, CPU (gloo) included."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn

from sta_lightning.nn.sync_batchnorm import convert_to_batchnorm, convert_to_sync_batchnorm

# Devices on which torch.nn.SyncBatchNorm has its synchronised kernels (elsewhere it raises).
TORCH_SYNC_DEVICES = ("cuda", "hpu", "xpu")


class SyncBatchNormOnAnyDevice(TorchSyncBatchNorm):
    """Lightning's ``TorchSyncBatchNorm`` where torch's SyncBatchNorm works (CUDA, HPU, XPU: fused kernels,
    one all-gather per layer forward), ``sta_lightning.nn.sync_batchnorm.SyncBatchNorm`` elsewhere (CPU).

    The CLI adds it when ``--trainer.sync_batchnorm=true``; with a bare Trainer pass
    ``plugins=[SyncBatchNormOnAnyDevice()]``. The device is that of the Trainer's strategy (the model is
    converted before it moves there); a model without a Trainer gets the device-independent layers.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        if isinstance(model, L.LightningModule) and model._trainer is not None:
            if model.trainer.strategy.root_device.type in TORCH_SYNC_DEVICES:
                return super().apply(model)
        return convert_to_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        return super().revert(convert_to_batchnorm(model))
