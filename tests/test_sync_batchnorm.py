"""SyncBatchNorm on CPU processes (gloo): the batch split over 2 processes gives what nn.BatchNorm2d gives
on the whole batch (forward, input and parameter gradients, running statistics, eval mode)."""

import copy
import pickle
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_helpers import free_port
from torch import nn

from sta_lightning.nn.sync_batchnorm import SyncBatchNorm, convert_to_batchnorm, convert_to_sync_batchnorm

CHANNELS = 6
SPLIT = (3, 5)  # images per rank: unequal, so that the element counts must be summed, not assumed equal
STEPS = 3  # training forwards (running statistics accumulate), then one eval forward


def batchnorm() -> nn.BatchNorm2d:
    """BatchNorm with the detector's eps and momentum and non-trivial affine parameters."""
    torch.manual_seed(1)
    layer = nn.BatchNorm2d(CHANNELS, eps=1e-3, momentum=0.03)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step: inputs (8, C, 5, 7) far from zero mean and unit variance, and output-gradient weights."""
    generator = torch.Generator().manual_seed(2)
    shape = (sum(SPLIT), CHANNELS, 5, 7)
    return [
        (torch.randn(shape, generator=generator) * 3 + 10, torch.randn(shape, generator=generator))
        for _ in range(STEPS + 1)
    ]


def run(layer: nn.Module, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """STEPS training forwards/backwards of loss = sum(output x weights) and one eval forward: the outputs,
    input gradients and parameter gradients (summed over the steps), and the final running statistics."""
    record = {"outputs": [], "input_grads": []}
    for x, output_weights in inputs[:STEPS]:
        x = x.clone().requires_grad_(True)
        output = layer(x)
        (output * output_weights).sum().backward()
        record["outputs"].append(output.detach())
        record["input_grads"].append(x.grad)
    layer.eval()
    with torch.no_grad():
        record["outputs"].append(layer(inputs[STEPS][0]))
    record["weight_grad"], record["bias_grad"] = layer.weight.grad, layer.bias.grad
    record["running_mean"], record["running_var"] = layer.running_mean, layer.running_var
    record["num_batches_tracked"] = int(layer.num_batches_tracked)
    return record


def _worker(rank: int, port: int, out_dir) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    start = sum(SPLIT[:rank])
    share = [(x[start : start + SPLIT[rank]], w[start : start + SPLIT[rank]]) for x, w in batches()]
    layer = convert_to_sync_batchnorm(nn.Sequential(batchnorm()))[0]
    assert isinstance(layer, SyncBatchNorm)
    record = run(layer, share)
    dist.destroy_process_group()
    (out_dir / f"rank{rank}.pkl").write_bytes(pickle.dumps(record))


def test_two_processes_equal_batchnorm_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), tmp_path), nprocs=2)
    ranks = [pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes()) for rank in range(2)]
    expected = run(batchnorm(), batches())

    def close(actual, wanted):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)

    for step in range(STEPS + 1):
        close(torch.cat([rank["outputs"][step] for rank in ranks]), expected["outputs"][step])
    for step in range(STEPS):
        close(torch.cat([rank["input_grads"][step] for rank in ranks]), expected["input_grads"][step])
    # Each process holds the gradient of its own loss; DDP sums (averages) them into the whole batch's.
    for name in ("weight_grad", "bias_grad"):
        close(ranks[0][name] + ranks[1][name], expected[name])
    for rank in ranks:
        close(rank["running_mean"], expected["running_mean"])
        close(rank["running_var"], expected["running_var"])  # unbiased, over the 8 x 5 x 7 values
        assert rank["num_batches_tracked"] == expected["num_batches_tracked"] == STEPS


def test_without_process_group_it_is_the_batchnorm_it_replaced():
    plain = nn.Sequential(nn.Conv2d(3, CHANNELS, 1), batchnorm())
    reference = copy.deepcopy(plain)
    converted = convert_to_sync_batchnorm(plain)
    assert isinstance(converted[1], SyncBatchNorm) and converted[1].weight is plain[1].weight
    assert (converted[1].eps, converted[1].momentum) == (1e-3, 0.03)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(converted(x), reference(x), rtol=0, atol=0)
    # The buffers are shared: the converted layer's update is the original's.
    torch.testing.assert_close(plain[1].running_var, reference[1].running_var, rtol=0, atol=0)
    reverted = convert_to_batchnorm(converted)
    assert type(reverted[1]) is nn.BatchNorm2d and reverted[1].running_var is plain[1].running_var
    assert str(reverted) == str(reference)
