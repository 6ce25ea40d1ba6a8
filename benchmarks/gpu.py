"""GPU benchmark: a 16-mixed fit step of YOLOv8 with and without the default STA, and STA against the official
algorithm, eager and under torch.compile. One prepared run for a CUDA machine; it prints the GPU and a table.

Run: ``python benchmarks/gpu.py`` (needs a CUDA GPU; about 5-10 minutes with the compiles)
     ``python benchmarks/gpu.py --dry-run`` (CPU, tiny sizes, bfloat16 autocast, backend aot_eager: checks the
     script itself in a minute; its numbers mean nothing)

1. Fit step: YOLOv8-``--scale`` (s), batch ``--batch`` (64) at ``--size`` px (640), 4 random boxes per image:
   zero_grad, forward under float16 autocast, YOLOv8Loss, GradScaler backward, unscale, clip_grad_norm_(10),
   SGD (nesterov) step: what Lightning's "16-mixed" precision runs. Plain and default STA, eager and with the
   forward compiled (``DetectionModule(compile=True)``: ``torch.compile``, mode "default"). Images per
   second from the median step time over ``--repeats`` steps after warm-up steps (the compile happens in the
   first), peak memory from ``torch.cuda.max_memory_allocated`` over the timed steps.
2. STA forward+backward on a ``--map`` x ``--map`` (160) map, batch ``--map-batch`` (16), C=256, 8x8 super
   tokens, 8 heads, qkv_bias: ours (the one-pass "cells" layout on CUDA) against the official-style baseline
   of benchmarks/sta.py, in float32 and under float16 autocast, eager and compiled. Median time and peak
   memory.
Variants run one after another (a GPU has no neighbours to interleave against); times are CUDA-synchronised.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import random_targets, sgd  # noqa: E402
from sta import OfficialStyleStokenAttention, official_state_dict  # noqa: E402

from sta_lightning.models import DEFAULT_STA, YOLOv8, YOLOv8Loss  # noqa: E402
from sta_lightning.nn import StokenAttention  # noqa: E402


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", default="s", choices="nsmlx", help="YOLOv8 scale of the fit step")
    parser.add_argument("--batch", type=int, default=64, help="fit-step images per batch")
    parser.add_argument("--size", type=int, default=640, help="fit-step image side in pixels")
    parser.add_argument("--map", type=int, default=160, help="side of the STA benchmark's map")
    parser.add_argument("--map-batch", type=int, default=16, help="batch of the STA benchmark")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (the compile runs here)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="on CPU at tiny sizes (n, batch 2, 64 px, map 16, 1 repeat, bfloat16, aot_eager)",
    )
    args = parser.parse_args(argv)
    for name in ("batch", "size", "map", "map_batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size % 32 or args.map % 8:
        parser.error(f"--size must be a multiple of 32 and --map of 8, got {args.size} and {args.map}")
    if args.dry_run:
        args.scale, args.batch, args.size, args.map, args.map_batch = "n", 2, 64, 16, 2
        args.repeats, args.warmup, args.compile_backend = 1, 1, "aot_eager"
    return args


def timed_runs(step: Callable[[], object], device: torch.device, warmup: int, repeats: int):
    """Median seconds of ``step`` over ``repeats`` runs after ``warmup`` ones, and the peak bytes allocated
    during the timed runs (CUDA; 0 on CPU)."""
    for _ in range(warmup):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), torch.cuda.max_memory_allocated() if cuda else 0


def fit_step(
    model: nn.Module, images: torch.Tensor, targets: dict, dtype: torch.dtype, compiled: bool, backend: str
) -> Callable[[], None]:
    """One mixed-precision training step of ``model`` (see the module docstring)."""
    device = images.device
    loss = YOLOv8Loss(model.num_classes)
    optimizer = sgd(model)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    forward = torch.compile(model, backend=backend) if compiled else model

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            total, _ = loss(forward(images), targets)
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
        scaler.step(optimizer)
        scaler.update()

    return step


def forward_backward(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor, dtype) -> Callable[[], None]:
    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = module(x)
        out.float().backward(upstream)
        x.grad = None
        for p in module.parameters():
            p.grad = None

    return step


def fit_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[tuple[str, ...]]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=generator).to(device)
    targets = {k: v.to(device) for k, v in random_targets(args.batch, args.size, 4, 80, generator).items()}
    rows = []
    for compiled in (False, True) if not args.no_compile else (False,):
        for name, sta in (("plain", None), ("default STA", DEFAULT_STA)):
            torch.manual_seed(0)
            model = YOLOv8(args.scale, sta=sta).to(device).train()
            step = fit_step(model, images, targets, dtype, compiled, args.compile_backend)
            seconds, peak = timed_runs(step, device, args.warmup, args.repeats)
            label = f"fit step yolov8{args.scale} {name}" + (" compiled" if compiled else "")
            rows.append(
                (label, f"{seconds * 1e3:.1f}", f"{args.batch / seconds:.1f} img/s", f"{peak / 2**30:.2f}")
            )
            del model, step
    return rows


def sta_rows(args: argparse.Namespace, device: torch.device, half: torch.dtype) -> list[tuple[str, ...]]:
    c = 256
    torch.manual_seed(0)
    ours = StokenAttention(c, (8, 8), n_iter=1, num_heads=8, qkv_bias=True).to(device)
    official = OfficialStyleStokenAttention(c, (8, 8), 1, 8, True).to(device)
    official.load_state_dict(official_state_dict(ours), strict=True)
    x = torch.randn(args.map_batch, c, args.map, args.map, device=device, requires_grad=True)
    upstream = torch.randn(args.map_batch, c, args.map, args.map, device=device)
    rows = []
    for compiled in (False, True) if not args.no_compile else (False,):
        for dtype in (None, half):
            label = f"STA {args.map}x{args.map} b{args.map_batch} {dtype or 'float32'}".replace("torch.", "")
            suffix = " compiled" if compiled else ""
            results = {}
            for name, module in (("ours", ours), ("official", official)):
                run = torch.compile(module, backend=args.compile_backend) if compiled else module
                results[name] = timed_runs(
                    forward_backward(run, x, upstream, dtype), device, args.warmup, args.repeats
                )
            speedup = results["official"][0] / results["ours"][0]
            for name, (seconds, peak) in results.items():
                note = f"{speedup:.2f}x vs official" if name == "ours" else ""
                rows.append((f"{label} {name}{suffix}", f"{seconds * 1e3:.2f}", note, f"{peak / 2**30:.2f}"))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    if args.dry_run:
        device, half, gpu = torch.device("cpu"), torch.bfloat16, "none (dry run on CPU)"
    elif not torch.cuda.is_available():
        sys.exit(
            "benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run runs on CPU"
        )
    else:
        device, half, gpu = torch.device("cuda"), torch.float16, torch.cuda.get_device_name()
        torch.backends.cudnn.benchmark = True
    print(f"GPU: {gpu}; torch {torch.__version__}; compile backend {args.compile_backend}")
    rows = fit_rows(args, device, half) + sta_rows(args, device, half)
    print("\n| run | median ms | throughput / speed-up | peak GiB |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
