"""BatchNorm whose training statistics are those of the batch summed over all processes, on any device.

``torch.nn.SyncBatchNorm`` computes the statistics with fused kernels that exist only for accelerators
(CUDA, XPU, HPU, ...): on CPU tensors it raises ``SyncBatchNorm expected input tensor to be on GPU``.
``SyncBatchNorm`` here is a subclass that keeps torch's path on those devices and computes the statistics of
other inputs (CPU under gloo) with autograd-aware all-reduces, so that 2 processes of batch 4 normalise,
backpropagate and update their running statistics as 1 process of batch 8 does. In eval mode, or outside a
process group of more than one process, it is the plain ``BatchNorm``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as distributed_autograd
from torch import Tensor, nn

# Devices on which torch.nn.SyncBatchNorm has its own (fused) synchronised kernels.
TORCH_SYNC_DEVICES = ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name())


def synchronised_batch_statistics(
    x: Tensor, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel statistics of ``x`` (N, C, *) concatenated over the processes of ``group`` (default: all).

    Returns (mean (C,), biased variance (C,), element count per channel (0-dim, float)), with gradients that
    flow back to every process's input. Two passes (the mean first, then the squared deviations from it), as
    accurate in float32 as one process's two-pass statistics. Collective: every process of ``group`` must call
    it with the same number of channels.
    """
    reduced_dims = [0, *range(2, x.ndim)]
    local_count = x.new_full((1,), x.numel() // x.shape[1])
    sums_and_count = distributed_autograd.all_reduce(
        torch.cat([x.sum(reduced_dims), local_count]), group=group
    )
    count = sums_and_count[-1]
    mean = sums_and_count[:-1] / count
    centred = x - mean.view(1, -1, *[1] * (x.ndim - 2))
    variance = distributed_autograd.all_reduce(centred.square().sum(reduced_dims), group=group) / count
    return mean, variance, count


class SyncBatchNorm(nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` that also synchronises CPU (and other non-accelerator) inputs.

    Training mode in a process group of more than one process: on accelerators torch's own synchronised
    kernels; elsewhere the batch statistics of ``synchronised_batch_statistics``, with the running mean and
    the running (unbiased) variance updated as ``nn.BatchNorm2d`` updates them, from the statistics of all
    processes (so every process keeps the same running statistics). Otherwise: plain BatchNorm.
    Build it from a model's BatchNorm layers with ``convert_to_sync_batchnorm``.
    """

    def forward(self, input: Tensor) -> Tensor:
        if not self._synchronises_here(input):
            return super().forward(input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        mean, variance, count = synchronised_batch_statistics(input, self.process_group)
        if self.track_running_stats:
            self._update_running_statistics(mean.detach(), variance.detach(), count)
        shape = (1, -1, *[1] * (input.ndim - 2))
        output = (input - mean.view(shape)) * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output

    def _synchronises_here(self, input: Tensor) -> bool:
        """True when this forward must synchronise and torch's kernels cannot (a non-accelerator input)."""
        return (
            self.training
            and input.device.type not in TORCH_SYNC_DEVICES
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    @torch.no_grad()
    def _update_running_statistics(self, mean: Tensor, variance: Tensor, count: Tensor) -> None:
        """BatchNorm's update: an exponential average with factor ``momentum`` (a cumulative average when
        ``momentum`` is None) of the batch mean and of the unbiased batch variance."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        unbiased = variance * (count / (count - 1).clamp(min=1))
        self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
        self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var.dtype))


def convert_to_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """``module`` with every BatchNorm layer (1d, 2d, 3d; not already synchronised) replaced by a
    ``SyncBatchNorm`` that shares its parameters and buffers; the module itself when it is such a layer."""
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        converted = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
        )
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, convert_to_sync_batchnorm(child, process_group))
    return converted
