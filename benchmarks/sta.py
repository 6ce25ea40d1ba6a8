"""Forward+backward time and memory of StokenAttention vs the official algorithm and global SDPA attention.

Run: ``python benchmarks/sta.py [--sizes 20 40 80 160] [--repeats 10] [--threads 1 2] [--device cpu|cuda]``.

Three modules, same weights, measured side by side in one run (C=256, 8 heads, stoken 8x8, n_iter 1,
qkv_bias, batch 1, float32):
- ``ours``: ``sta_lightning.nn.StokenAttention``.
- ``official``: a straightforward re-implementation of the official algorithm, written here from
  ../shared/docs/sta-reference.md (one-hot conv banks for unfold/fold, the official permute copies,
  explicit-softmax refine attention). Its output is checked against ours.
- ``sdpa``: global attention over all H*W positions (1x1-conv qkv, ``F.scaled_dot_product_attention``, proj),
  i.e. ``StokenAttention`` with stoken_size (1, 1); skipped above ``--sdpa-max-side`` (quadratic cost).

Time: median wall clock over ``--repeats`` forward+backward passes after 2 warm-up passes. ``ours`` and
``official`` are timed interleaved within each repeat (order rotated from one repeat to the next) so that
load from other processes hits both alike; ``sdpa`` is timed after them, on its own, because its (H*W)^2
attention evicts the caches and would slow whichever module ran next.
Memory, two numbers:
- ``saved``: bytes autograd keeps for backward (``torch.autograd.graph.saved_tensors_hooks``, deduplicated by
  storage), parameters and the input excluded; deterministic.
- ``peak``: peak bytes allocated during one forward+backward above what was allocated before it. On CPU
  from the ``torch.profiler`` memory events (running sum of allocations and frees, in time order); on
  CUDA from ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C._profiler import _EventType

from sta_lightning.nn import StokenAttention


class OneHotBank(nn.Module):
    """The official fixed (9, 1, 3, 3) one-hot conv bank, as a non-trainable parameter named ``weights``."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.eye(9).view(9, 1, 3, 3), requires_grad=False)


class ExplicitGroupedAttention(nn.Module):
    """Global MHSA with the grouped q|k|v layout and an explicit (B, heads, N, N) softmax (official style)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=qkv_bias)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, self.num_heads, 3 * c // self.num_heads, h * w).chunk(3, dim=2)
        attn = ((k.transpose(-1, -2) @ q) * self.scale).softmax(dim=-2)  # (B, heads, keys, queries)
        return self.proj((v @ attn).reshape(b, c, h, w))


class OfficialStyleStokenAttention(nn.Module):
    """Baseline: the official stoken_forward as ../shared/docs/sta-reference.md describes it; state-dict
    compatible."""

    def __init__(self, dim: int, stoken_size: tuple[int, int], n_iter: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.stoken_size, self.n_iter, self.scale = stoken_size, n_iter, dim**-0.5
        self.unfold, self.fold = OneHotBank(), OneHotBank()
        self.stoken_refine = ExplicitGroupedAttention(dim, num_heads, qkv_bias)

    def _unfold(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return F.conv2d(x.reshape(b * c, 1, h, w), self.unfold.weights, padding=1).reshape(b, c * 9, h * w)

    def _fold(self, x: Tensor) -> Tensor:
        return F.conv_transpose2d(x, self.fold.weights, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h0, w0 = x.shape
        h, w = self.stoken_size
        pad_r, pad_b = (w - w0 % w) % w, (h - h0 % h) % h
        if pad_r or pad_b:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        hh, ww = x.shape[2] // h, x.shape[3] // w
        tokens = F.adaptive_avg_pool2d(x, (hh, ww))
        pixels = x.reshape(b, c, hh, h, ww, w).permute(0, 2, 4, 3, 5, 1).reshape(b, hh * ww, h * w, c)
        with torch.no_grad():
            for i in range(self.n_iter):
                neighbours = self._unfold(tokens).transpose(1, 2).reshape(b, hh * ww, c, 9)
                affinity = (pixels @ neighbours * self.scale).softmax(-1)
                mass = self._fold(affinity.sum(2).transpose(1, 2).reshape(b, 9, hh, ww))
                if i < self.n_iter - 1:
                    tokens = pixels.transpose(-1, -2) @ affinity
                    tokens = self._fold(tokens.permute(0, 2, 3, 1).reshape(b * c, 9, hh, ww)).reshape(
                        b, c, hh, ww
                    )
                    tokens = tokens / (mass + 1e-12)
        tokens = pixels.transpose(-1, -2) @ affinity
        tokens = self._fold(tokens.permute(0, 2, 3, 1).reshape(b * c, 9, hh, ww)).reshape(b, c, hh, ww)
        tokens = self.stoken_refine(tokens / (mass.detach() + 1e-12))
        neighbours = self._unfold(tokens).transpose(1, 2).reshape(b, hh * ww, c, 9)
        out = neighbours @ affinity.transpose(-1, -2)
        out = out.reshape(b, hh, ww, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh * h, ww * w)
        return out[:, :, :h0, :w0]


def saved_bytes(module: nn.Module, x: Tensor) -> int:
    """Bytes autograd saves for backward in one forward, deduplicated by storage; parameters, x excluded."""
    excluded = {p.untyped_storage().data_ptr() for p in module.parameters()} | {
        x.untyped_storage().data_ptr()
    }
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    del out
    return sum(storages.values())


def forward_backward(module: nn.Module, x: Tensor, upstream: Tensor) -> None:
    module(x).backward(upstream)
    x.grad = None
    for p in module.parameters():
        p.grad = None


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's C++ start/stop lines would break up the table."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_bytes(module: nn.Module, x: Tensor, upstream: Tensor) -> int:
    """Peak bytes allocated during one forward+backward, above the level before it."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        forward_backward(module, x, upstream)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with (
        stderr_silenced(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        forward_backward(module, x, upstream)
    allocations = []  # (time ns, bytes allocated (> 0) or freed (< 0)) of every CPU allocator call

    def collect(events) -> None:
        for event in events:
            if event.tag == _EventType.Allocation:
                allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
            collect(event.children)

    collect(prof.profiler.kineto_results.experimental_event_tree())
    level = peak = 0
    for _, size in sorted(allocations):
        level += size
        peak = max(peak, level)
    return peak


def median_seconds(
    modules: dict[str, nn.Module], x: Tensor, upstream: Tensor, repeats: int
) -> dict[str, float]:
    """Median forward+backward wall time per module; modules run interleaved so load spikes hit all alike."""

    def timed(module: nn.Module) -> float:
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        forward_backward(module, x, upstream)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for module in modules.values():
        for _ in range(2):
            timed(module)
    times: dict[str, list[float]] = {name: [] for name in modules}
    names = list(modules)
    for repeat in range(repeats):
        # rotate the order, so that neither module always runs right after the other's cache traffic
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(modules[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def official_state_dict(module: StokenAttention) -> dict[str, Tensor]:
    bank = torch.eye(9).view(9, 1, 3, 3)
    return {"unfold.weights": bank, "fold.weights": bank.clone(), **module.state_dict()}


def measure(
    sizes: list[int], repeats: int, modules: dict[str, nn.Module], sdpa_max_side: int, device: torch.device
) -> dict[tuple[int, str], tuple[float, int, int]]:
    """(side, module name) -> (median seconds, saved bytes, peak bytes), printing one table row each."""
    c = modules["ours"].stoken_refine.qkv.in_channels
    print(f"{'map':>8} {'module':>9} {'median ms':>10} {'ms/1k px':>9} {'saved MB':>9} {'peak MB':>8}")
    rows: dict[tuple[int, str], tuple[float, int, int]] = {}
    for side in sizes:
        x = torch.randn(1, c, side, side, device=device, requires_grad=True)
        upstream = torch.randn(1, c, side, side, device=device)
        with torch.no_grad():
            diff = (modules["ours"](x) - modules["official"](x)).abs().max().item()
        active = {"ours": modules["ours"], "official": modules["official"]}
        seconds = median_seconds(active, x, upstream, repeats)
        if side <= sdpa_max_side:
            seconds |= median_seconds({"sdpa": modules["sdpa"]}, x, upstream, repeats)
            active["sdpa"] = modules["sdpa"]
        for name, module in active.items():
            saved, peak = saved_bytes(module, x), peak_bytes(module, x, upstream)
            rows[side, name] = (seconds[name], saved, peak)
            print(
                f"{side:>3}x{side:<4} {name:>9} {seconds[name] * 1e3:>10.2f} "
                f"{seconds[name] * 1e6 / side**2:>9.3f} {saved / 2**20:>9.2f} {peak / 2**20:>8.2f}"
            )
        print(f"{'':>8} max |ours - official| output = {diff:.2e}")
    return rows


def print_ratios(sizes: list[int], rows: dict[tuple[int, str], tuple[float, int, int]]) -> None:
    print("\nratios (>1 means ours is better): time and peak memory")
    print(
        f"{'map':>8} {'speed-up vs official':>21} {'vs sdpa':>8} {'peak official/ours':>19} "
        f"{'peak sdpa/ours':>15}"
    )
    for side in sizes:
        t_ours, _, p_ours = rows[side, "ours"]
        t_off, _, p_off = rows[side, "official"]
        sdpa_row = rows.get((side, "sdpa"))
        vs_sdpa = f"{sdpa_row[0] / t_ours:8.1f}" if sdpa_row else f"{'-':>8}"
        mem_sdpa = f"{sdpa_row[2] / p_ours:15.2f}" if sdpa_row else f"{'-':>15}"
        print(f"{side:>3}x{side:<4} {t_off / t_ours:>21.2f} {vs_sdpa} {p_off / p_ours:>19.2f} {mem_sdpa}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 40, 80, 160], help="map sides (H = W)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward+backward passes per case")
    parser.add_argument("--sdpa-max-side", type=int, default=80, help="skip global SDPA above this side")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts, one run each (0: default)"
    )
    args = parser.parse_args()
    device, c = torch.device(args.device), args.channels

    torch.manual_seed(0)
    ours = StokenAttention(c, (8, 8), n_iter=1, num_heads=8, qkv_bias=True).to(device)
    official = OfficialStyleStokenAttention(c, (8, 8), 1, 8, True).to(device)
    official.load_state_dict(official_state_dict(ours), strict=True)
    sdpa = StokenAttention(c, (1, 1), num_heads=8, qkv_bias=True).to(device)
    sdpa.load_state_dict(ours.state_dict())
    modules = {"ours": ours, "official": official, "sdpa": sdpa}

    speedups: dict[tuple[int, int], float] = {}
    for threads in args.threads if device.type == "cpu" else [0]:
        if threads:
            torch.set_num_threads(threads)
        print(
            f"\ndevice {device}, threads {torch.get_num_threads()}, torch {torch.__version__}, C={c}, "
            f"batch 1, fp32, load average {os.getloadavg()[0]:.1f}"
        )
        rows = measure(args.sizes, args.repeats, modules, args.sdpa_max_side, device)
        print_ratios(args.sizes, rows)
        for side in args.sizes:
            speedups[side, torch.get_num_threads()] = rows[side, "official"][0] / rows[side, "ours"][0]

    print(
        f"\nSTA forward+backward speed-up vs the official algorithm "
        f"(medians of {args.repeats} interleaved repeats):"
    )
    for (side, threads), speedup in speedups.items():
        print(f"  {side}x{side}, C={c}, {threads} thread{'s' if threads > 1 else ''}: {speedup:.2f}x")


if __name__ == "__main__":
    main()
