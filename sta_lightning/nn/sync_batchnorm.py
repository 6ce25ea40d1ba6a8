"""BatchNorm whose training statistics are those of the batch summed over all processes, on any device.

``torch.nn.SyncBatchNorm`` computes the statistics with fused kernels that exist only for accelerators
(CUDA, XPU, HPU, ...): on CPU tensors it raises ``SyncBatchNorm expected input tensor to be on GPU``, and
DDP refuses CPU modules that contain it (a torch SyncBatchNorm subclass included). ``SyncBatchNorm`` here
computes them with plain all-reduces, which work under any backend (gloo on CPU included): two in the forward
(sums, then squared deviations), one in the backward (BatchNorm's analytic gradient), so that 2 processes of
batch 4 normalise, backpropagate and update their running statistics as 1 process of batch 8 does. In eval
mode, or outside a process group of more than one process, it is the plain BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def _channel_view(values: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ...) broadcastable against an (N, C, *) tensor of ``ndim`` dims."""
    return values.view(1, -1, *[1] * (ndim - 2))


@torch.no_grad()
def synchronised_batch_statistics(
    x: Tensor, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel statistics of ``x`` (N, C, *) concatenated over the processes of ``group`` (default: all).

    Returns (mean (C,), biased variance (C,), element count per channel (0-dim, float)), without gradient.
    Two passes (the mean first, then the squared deviations from it), as accurate in float32 as one process's
    statistics. Collective: every process of ``group`` must call it with the same number of channels.
    """
    reduced_dims = [0, *range(2, x.ndim)]
    sums_and_count = torch.cat([x.sum(reduced_dims), x.new_full((1,), x.numel() // x.shape[1])])
    dist.all_reduce(sums_and_count, group=group)
    count = sums_and_count[-1]
    mean = sums_and_count[:-1] / count
    variance = (x - _channel_view(mean, x.ndim)).square().sum(reduced_dims)
    dist.all_reduce(variance, group=group)
    return mean, variance / count, count


class _NormaliseWithStatistics(torch.autograd.Function):
    """``(x - mean) / sqrt(variance + eps) x weight + bias`` with the statistics of all processes, and
    BatchNorm's analytic backward: the input gradient needs the per-channel sums of the output gradient g and
    of g x xhat over all processes (one all-reduce); the weight and bias gradients are this process's sums
    (DDP then sums them over the processes)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, variance, count, eps, group):
        invstd = torch.rsqrt(variance + eps)
        normalised = (x - _channel_view(mean, x.ndim)) * _channel_view(invstd, x.ndim)
        ctx.save_for_backward(normalised, weight, invstd, count)
        ctx.group = group
        if weight is None:
            return normalised
        return normalised * _channel_view(weight, x.ndim) + _channel_view(bias, x.ndim)

    @staticmethod
    def backward(ctx, grad_output):
        normalised, weight, invstd, count = ctx.saved_tensors
        ndim = grad_output.ndim
        reduced_dims = [0, *range(2, ndim)]
        local_sums = torch.cat([grad_output.sum(reduced_dims), (grad_output * normalised).sum(reduced_dims)])
        sums = local_sums.clone()
        dist.all_reduce(sums, group=ctx.group)
        grad_sum, grad_normalised_sum = (sums / count).chunk(2)
        scale = invstd if weight is None else invstd * weight
        grad_input = (
            grad_output
            - _channel_view(grad_sum, ndim)
            - normalised * _channel_view(grad_normalised_sum, ndim)
        ) * _channel_view(scale, ndim)
        grad_weight = grad_bias = None
        if weight is not None:
            grad_bias, grad_weight = local_sums.chunk(2)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over (N, C, *) inputs whose training-mode statistics are ``synchronised_batch_statistics``.

    The running mean and the running (unbiased) variance are updated as ``nn.BatchNorm2d`` updates them, from
    the statistics of all processes, so every process keeps the same running statistics. Build it from a
    model's BatchNorm layers with ``convert_to_sync_batchnorm`` (and back with ``convert_to_batchnorm``).

    Args: as ``nn.BatchNorm2d``, plus ``process_group`` (default: all processes) and ``replaces``, the
    BatchNorm class that ``convert_to_batchnorm`` gives back (``nn.BatchNorm2d`` by default).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        replaces: type[_BatchNorm] = nn.BatchNorm2d,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group
        self.replaces = replaces

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects an input of shape (N, C, *), got {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and self._in_process_group()):
            return super().forward(input)
        self._check_input_dim(input)
        mean, variance, count = synchronised_batch_statistics(input, self.process_group)
        if self.track_running_stats:
            self._update_running_statistics(mean, variance, count)
        return _NormaliseWithStatistics.apply(
            input, self.weight, self.bias, mean, variance, count, self.eps, self.process_group
        )

    def _in_process_group(self) -> bool:
        """True inside an initialised process group of more than one process."""
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1

    @torch.no_grad()
    def _update_running_statistics(self, mean: Tensor, variance: Tensor, count: Tensor) -> None:
        """BatchNorm's update: an exponential average with factor ``momentum`` (a cumulative average when
        ``momentum`` is None) of the batch mean and of the unbiased batch variance."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        unbiased = variance * (count / (count - 1).clamp(min=1))
        self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
        self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var.dtype))


def _moved_state(source: _BatchNorm, target: _BatchNorm) -> _BatchNorm:
    """``target`` sharing the parameters and buffers of ``source``, in its train/eval mode."""
    if source.affine:
        target.weight = source.weight
        target.bias = source.bias
    target.running_mean = source.running_mean
    target.running_var = source.running_var
    target.num_batches_tracked = source.num_batches_tracked
    return target.train(source.training)


def _converted(module: nn.Module, convert_layer) -> nn.Module:
    converted = convert_layer(module)
    for name, child in module.named_children():
        converted.add_module(name, _converted(child, convert_layer))
    return converted


def convert_to_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """``module`` with every BatchNorm layer (1d, 2d, 3d; not torch's or our SyncBatchNorm) replaced by a
    ``SyncBatchNorm`` sharing its parameters and buffers; the module itself when it is such a layer."""

    def convert_layer(layer: nn.Module) -> nn.Module:
        if not isinstance(layer, _BatchNorm) or isinstance(layer, (SyncBatchNorm, nn.SyncBatchNorm)):
            return layer
        synchronised = SyncBatchNorm(
            layer.num_features,
            layer.eps,
            layer.momentum,
            layer.affine,
            layer.track_running_stats,
            process_group,
            replaces=type(layer),
        )
        return _moved_state(layer, synchronised)

    return _converted(module, convert_layer)


def convert_to_batchnorm(module: nn.Module) -> nn.Module:
    """The inverse of ``convert_to_sync_batchnorm``: every ``SyncBatchNorm`` becomes the BatchNorm class it
    replaced, sharing its parameters and buffers."""

    def convert_layer(layer: nn.Module) -> nn.Module:
        if not isinstance(layer, SyncBatchNorm):
            return layer
        plain = layer.replaces(
            layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats
        )
        return _moved_state(layer, plain)

    return _converted(module, convert_layer)
