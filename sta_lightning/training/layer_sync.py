"""The Lightning plugin behind ``Trainer(sync_batchnorm=True)`` on any device, CPU (gloo) included."""

from __future__ import annotations

from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn

from sta_lightning.nn.sync_batchnorm import convert_to_sync_batchnorm


class SyncBatchNormOnAnyDevice(TorchSyncBatchNorm):
    """Lightning's ``TorchSyncBatchNorm`` with ``sta_lightning.nn.sync_batchnorm.SyncBatchNorm`` layers, which
    synchronise CPU inputs too (torch's raise on them) and use torch's kernels on accelerators. The CLI adds
    it when ``--trainer.sync_batchnorm=true``; with a bare Trainer, pass
    ``plugins=[SyncBatchNormOnAnyDevice()]``. ``revert`` (after fitting) is Lightning's: it turns every
    ``torch.nn.SyncBatchNorm`` back into BatchNorm.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_to_sync_batchnorm(model)
