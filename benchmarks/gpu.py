"""GPU benchmark: a 16-mixed fit step of YOLOv8 with and without the default STA, and STA against the official
algorithm, eager and under torch.compile. One prepared run for a CUDA machine; it prints the GPU, then each
table row as soon as it is measured.

Run: ``python benchmarks/gpu.py`` (needs a CUDA GPU; about 5-10 minutes with cold compiles)
     ``python benchmarks/gpu.py --quick`` (under 5 minutes on one GPU with cold compile caches, see below)
     ``python benchmarks/gpu.py --dry-run`` (CPU, tiny sizes, bfloat16 autocast, backend aot_eager: checks the
     script itself in a minute, without the triton rows; its numbers mean nothing)
     ``python benchmarks/gpu.py --list [--quick]`` (the rows it would measure, without measuring)

1. Fit step: YOLOv8-``--scale`` (s), batch ``--batch`` (64) at ``--size`` px (640), 4 random boxes per image:
   zero_grad, forward under float16 autocast, YOLOv8Loss, GradScaler backward, unscale, clip_grad_norm_(10),
   SGD (nesterov) step: what Lightning's "16-mixed" precision runs. Plain and default STA, eager and with the
   forward compiled as ``--model.compile.enabled true`` does (``CompileConfig.wrap``: ``torch.compile``, mode
   "default" for inductor). Images per second from the median step time over ``--repeats`` steps after
   ``--warmup`` steps (the compile happens in the first), peak memory from ``torch.cuda.max_memory_allocated``
   over the timed steps.
   The eager default-STA step also runs with its pixel work in the fused Triton kernels (pixel layout
   "triton"); each STA step carries its time as a multiple of the plain step's.
2. STA forward+backward on a ``--map`` x ``--map`` (160) map, batch ``--map-batch`` (16), C=256, 8x8 super
   tokens, 8 heads, qkv_bias: ours (the one-pass "cells" layout on CUDA, and eagerly the "triton" layout)
   against the official-style baseline of benchmarks/sta.py, in float32 and under float16 autocast, eager and
   compiled. Median time and peak memory; the official row comes first and ours carry the speed-up.

Rows run cheapest first (every eager row, then the compiled STA rows, then the compiled fit steps), one after
another (a GPU has no neighbours to interleave against); times are CUDA-synchronised. A row that fails is
printed as ``error`` with the exception's type and first line, and the next row runs. ``--time-limit S``
stops the run after S seconds: the row then running is interrupted (``TimeoutError``) and the rest are
printed as ``skipped``. The exit status is 0 when every row was measured, 1 otherwise.

``--quick`` keeps the sizes (eager steps take seconds on a GPU; cold compiles take minutes, whatever the
size) and drops: repeats 10 -> 5 and warm-up steps 3 -> 2; the compiled STA rows in float32 (float16 autocast
stays, it is the training precision); the compiled plain fit step (the compiled default-STA fit step stays,
last). 12 rows with 3 compiles instead of 15 rows with 6 compiles (a compiled fit step alone can take minutes
cold: on an H200 with torch 2.11, two of them did not finish within 230 s).
"""

from __future__ import annotations

import argparse
import copy
import gc
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import random_targets, sgd  # noqa: E402
from sta import OfficialStyleStokenAttention, official_state_dict  # noqa: E402

from sta_lightning.models import DEFAULT_STA, YOLOv8, YOLOv8Loss  # noqa: E402
from sta_lightning.nn import StokenAttention, set_pixel_layout  # noqa: E402

HEADER = "| run | median ms | throughput / speed-up | peak GiB |"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", default="s", choices="nsmlx", help="YOLOv8 scale of the fit step")
    parser.add_argument("--batch", type=int, default=64, help="fit-step images per batch")
    parser.add_argument("--size", type=int, default=640, help="fit-step image side in pixels")
    parser.add_argument("--map", type=int, default=160, help="side of the STA benchmark's map")
    parser.add_argument("--map-batch", type=int, default=16, help="batch of the STA benchmark")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 10, quick 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first, the compile runs here")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and compiles (see above)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds for all rows together")
    parser.add_argument("--list", action="store_true", help="print the rows it would measure and exit")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="on CPU at tiny sizes (n, batch 2, 64 px, map 16, 1 repeat, bfloat16, aot_eager)",
    )
    # Tests: rows whose label contains this text raise instead of measuring (fault injection).
    parser.add_argument("--fail", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 10
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    for name in ("batch", "size", "map", "map_batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 1:
        parser.error(f"--warmup must be >= 1 (the compile runs there), got {args.warmup}")
    if args.size % 32 or args.map % 8:
        parser.error(f"--size must be a multiple of 32 and --map of 8, got {args.size} and {args.map}")
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error(f"--time-limit must be > 0 seconds, got {args.time_limit}")
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


def compiled(module: nn.Module, backend: str) -> nn.Module:
    """``module`` under torch.compile as the training step compiles it (``CompileConfig.wrap``: mode "default"
    for inductor, no mode for other backends). Not imported from sta_lightning.training: that package needs
    Lightning's data stack, which this script does not."""
    return torch.compile(module, mode="default" if backend == "inductor" else None, backend=backend)


def fit_step(
    model: nn.Module, images: torch.Tensor, targets: dict, dtype: torch.dtype, compile_backend: str | None
) -> Callable[[], None]:
    """One mixed-precision training step of ``model`` (see the module docstring); the forward compiled with
    ``compile_backend`` unless it is None."""
    device = images.device
    loss = YOLOv8Loss(model.num_classes)
    optimizer = sgd(model)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    forward = model if compile_backend is None else compiled(model, compile_backend)

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


@dataclass
class Row:
    """One row of the table: ``measure`` returns its cells after the label (median ms, throughput or
    speed-up, peak GiB)."""

    label: str
    measure: Callable[[], tuple[str, str, str]]
    compiled: bool


class Bench:
    """The rows of one run, and the tensors they share (built on first use, so a failure to build them is
    the failure of the rows that need them)."""

    def __init__(self, args: argparse.Namespace, device: torch.device, half: torch.dtype) -> None:
        self.args, self.device, self.half = args, device, half
        self._fit_data: tuple[torch.Tensor, dict] | None = None
        self._sta: tuple[dict[str, nn.Module], torch.Tensor, torch.Tensor] | None = None
        self.official_seconds: dict[str, float] = {}
        self.plain_seconds: dict[bool, float] = {}  # the plain fit step's, by compiled

    def fit_data(self) -> tuple[torch.Tensor, dict]:
        if self._fit_data is None:
            args, generator = self.args, torch.Generator().manual_seed(0)
            images = torch.rand(args.batch, 3, args.size, args.size, generator=generator).to(self.device)
            targets = random_targets(args.batch, args.size, 4, 80, generator)
            self._fit_data = images, {k: v.to(self.device) for k, v in targets.items()}
        return self._fit_data

    def sta_modules(self) -> tuple[dict[str, nn.Module], torch.Tensor, torch.Tensor]:
        """The STA rows' modules by name (official, ours, ours triton: the same weights), input and upstream
        gradient."""
        if self._sta is None:
            args, c = self.args, 256
            torch.manual_seed(0)
            ours = StokenAttention(c, (8, 8), n_iter=1, num_heads=8, qkv_bias=True).to(self.device)
            official = OfficialStyleStokenAttention(c, (8, 8), 1, 8, True).to(self.device)
            official.load_state_dict(official_state_dict(ours), strict=True)
            triton = set_pixel_layout(copy.deepcopy(ours), "triton")
            shape = (args.map_batch, c, args.map, args.map)
            x = torch.randn(*shape, device=self.device, requires_grad=True)
            upstream = torch.randn(*shape, device=self.device)
            self._sta = {"official": official, "ours": ours, "ours triton": triton}, x, upstream
        return self._sta

    def fit_row(self, sta: bool, compile_: bool, layout: str = "auto") -> Row:
        """The fit step, plain or with the default STA (its pixel work in ``layout``); an STA row carries its
        ratio to the plain row's time."""
        args = self.args
        name = ("default STA" + ("" if layout == "auto" else f" {layout}")) if sta else "plain"
        label = f"fit step yolov8{args.scale} {name}" + (" compiled" if compile_ else "")

        def measure() -> tuple[str, str, str]:
            images, targets = self.fit_data()
            torch.manual_seed(0)
            model = YOLOv8(args.scale, sta=DEFAULT_STA if sta else None)
            model = set_pixel_layout(model, layout).to(self.device).train()
            backend = args.compile_backend if compile_ else None
            step = fit_step(model, images, targets, self.half, backend)
            seconds, peak = timed_runs(step, self.device, args.warmup, args.repeats)
            throughput = f"{args.batch / seconds:.1f} img/s"
            if not sta:
                self.plain_seconds[compile_] = seconds
            elif compile_ in self.plain_seconds:
                throughput += f" ({seconds / self.plain_seconds[compile_]:.2f}x the plain step)"
            return f"{seconds * 1e3:.1f}", throughput, f"{peak / 2**30:.2f}"

        return Row(label, measure, compile_)

    def sta_row(self, name: str, dtype: torch.dtype | None, compile_: bool) -> Row:
        args = self.args
        key = f"{args.map}x{args.map} b{args.map_batch} {dtype or 'float32'}".replace("torch.", "")
        suffix = " compiled" if compile_ else ""

        def measure() -> tuple[str, str, str]:
            modules, x, upstream = self.sta_modules()
            module = modules[name]
            run = compiled(module, args.compile_backend) if compile_ else module
            seconds, peak = timed_runs(
                forward_backward(run, x, upstream, dtype), self.device, args.warmup, args.repeats
            )
            if name == "official":
                self.official_seconds[key + suffix] = seconds
                note = ""
            elif key + suffix in self.official_seconds:
                note = f"{self.official_seconds[key + suffix] / seconds:.2f}x vs official"
            else:
                note = "official failed"
            return f"{seconds * 1e3:.2f}", note, f"{peak / 2**30:.2f}"

        return Row(f"STA {key} {name}{suffix}", measure, compile_)

    def rows(self) -> list[Row]:
        """Every row of this run, cheapest first (see the module docstring for what --quick drops)."""
        args = self.args
        dtypes = (None, self.half)
        # the triton layout needs CUDA: not in the dry run
        triton = () if args.dry_run else ("triton",)
        eager = [self.fit_row(False, False)] + [
            self.fit_row(True, False, layout) for layout in ("auto", *triton)
        ]
        eager += [
            self.sta_row(name, dtype, False)
            for dtype in dtypes
            for name in ("official", "ours", *(f"ours {layout}" for layout in triton))
        ]
        if args.no_compile:
            return eager
        compiled_dtypes = (self.half,) if args.quick else dtypes
        compiled_rows = [
            self.sta_row(name, dtype, True) for dtype in compiled_dtypes for name in ("official", "ours")
        ]
        compiled_rows += [self.fit_row(sta, True) for sta in ((True,) if args.quick else (False, True))]
        return eager + compiled_rows


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise TimeoutError in the main thread once ``seconds`` have passed (SIGALRM; None: no limit)."""
    if seconds is None:
        yield
        return

    def expire(signum, frame) -> None:
        raise TimeoutError(f"the --time-limit ran out during this row ({seconds:.3g} s were left for it)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def error_cells(error: BaseException) -> tuple[str, str, str]:
    lines = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    if len(message) > 200:
        message = message[:197] + "..."
    return "error", message.replace("|", "/"), ""


def release(device: torch.device, was_compiled: bool) -> None:
    """Free what a row left behind (its model, a failed compile's state) before the next one."""
    if was_compiled:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_row(label: str, cells: tuple[str, str, str]) -> None:
    print("| " + " | ".join((label, *cells)) + " |", flush=True)


def run_rows(rows: list[Row], device: torch.device, fail: list[str], limit: float | None) -> dict[str, int]:
    """Measure and print each row in turn; returns the counts of measured, failed and skipped rows."""
    deadline = None if limit is None else time.monotonic() + limit
    counts = {"measured": 0, "failed": 0, "skipped": 0}
    for row in rows:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            print_row(row.label, ("skipped", f"the --time-limit of {limit:g} s ran out", ""))
            counts["skipped"] += 1
            continue
        try:
            with time_limit(left):
                if any(text in row.label for text in fail):
                    raise RuntimeError(f"injected failure (--fail) in {row.label}\nsecond line, not printed")
                cells = row.measure()
            counts["measured"] += 1
        except Exception as error:  # any failure is this row's result; the next row runs
            cells = error_cells(error)
            counts["failed"] += 1
        print_row(row.label, cells)
        release(device, row.compiled)
    return counts


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    if args.dry_run:
        device, half, gpu = torch.device("cpu"), torch.bfloat16, "none (dry run on CPU)"
    elif args.list:  # the labels of a GPU run; nothing is built
        device, half, gpu = torch.device("cpu"), torch.float16, "none"
    elif not torch.cuda.is_available():
        sys.exit(
            "benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run runs on CPU"
        )
    else:
        device, half, gpu = torch.device("cuda"), torch.float16, torch.cuda.get_device_name()
        torch.backends.cudnn.benchmark = True
    rows = Bench(args, device, half).rows()
    if args.list:
        for row in rows:
            print(row.label)
        return
    mode = "quick" if args.quick else "full"
    print(
        f"GPU: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); compile backend "
        f"{args.compile_backend}; {mode} mode, {args.repeats} repeats after {args.warmup} warm-up; "
        f"{len(rows)} rows",
        flush=True,
    )
    print(f"\n{HEADER}\n|---|---|---|---|", flush=True)
    start = time.monotonic()
    counts = run_rows(rows, device, args.fail, args.time_limit)
    print(
        f"\n{counts['measured']} rows measured, {counts['failed']} failed, {counts['skipped']} skipped, "
        f"in {time.monotonic() - start:.0f} s",
        flush=True,
    )
    if counts["failed"] or counts["skipped"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
