"""onnxruntime (CPU) against PyTorch eager: latency and memory of YOLOv8 n and s, plain and default STA.

Usage: python benchmarks/export.py [--scales n s] [--repeats 10] [--threads 2] [--size 640]

- Models: randomly initialised YOLOv8 with 80 classes, exported by ``export_detector`` (the code behind
  ``python -m sta_lightning export --format onnx``): float32, batch 1, decoded output. The largest difference
  between the two runtimes' outputs on the benchmark input is printed as a check.
- Latency: batch 1, both runtimes on ``--threads`` threads (PyTorch in inference mode, onnxruntime with all
  graph optimisations), in interleaved rounds (each round runs every model once in each runtime) after two
  warm-up rounds; medians, and the ratio onnxruntime / PyTorch.
- Memory: peak RSS of a fresh process while it loads the model (PyTorch builds it, onnxruntime creates the
  session) and runs 3 inferences, minus its peak RSS before (after its imports): weights, onnxruntime's
  arena, activations (VmHWM of /proc/self/status, Linux).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

MEMORY_RUNS = 3
# numpy, torch and onnxruntime are imported where they are used: a memory child loads only its own runtime.


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def build(scale: str, sta: bool):
    """The benchmark's YOLOv8 (80 classes, eval mode) with seeded random weights."""
    import torch

    from sta_lightning.models import DEFAULT_STA, YOLOv8

    torch.manual_seed(0)
    return YOLOv8(scale, 80, DEFAULT_STA if sta else None).eval()


def forward(model, images) -> None:
    import torch

    with torch.inference_mode():
        model(images)


def onnx_session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def memory_child(runtime: str, scale: str, sta: bool, onnx_path: Path, size: int, threads: int) -> None:
    """Runs in its own process: prints the peak RSS rise (MB) of loading the model and running it."""
    import numpy as np

    images = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    if runtime == "onnxruntime":
        import onnxruntime  # noqa: F401 (imported before the baseline)

        baseline = peak_rss_mb()
        session = onnx_session(onnx_path, threads)
        for _ in range(MEMORY_RUNS):
            session.run(None, {"images": images})
    else:
        import torch

        import sta_lightning.models  # noqa: F401 (imported before the baseline)

        torch.set_num_threads(threads)
        baseline = peak_rss_mb()
        model = build(scale, sta)
        with torch.inference_mode():
            for _ in range(MEMORY_RUNS):
                model(torch.from_numpy(images))
    print(f"{peak_rss_mb() - baseline:.1f}")


def peak_rss_rise(runtime: str, scale: str, sta: bool, onnx_path: Path, size: int, threads: int) -> float:
    command = [sys.executable, __file__, "--memory-child", runtime, "--scales", scale, "--size", str(size)]
    command += ["--threads", str(threads), "--onnx", str(onnx_path)] + (["--sta"] if sta else [])
    return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])


def compare(args: argparse.Namespace, folder: Path) -> None:
    """Export every variant into ``folder``, time both runtimes in interleaved rounds, print the table."""
    import numpy as np
    import onnxruntime
    import torch

    from sta_lightning.export import export_detector

    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.1f} (timings are noisy above ~0.5)"
    )
    images = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    feed = {"images": images.numpy()}
    variants = [(scale, sta) for scale in args.scales for sta in (False, True)]
    runners, paths = {}, {}
    for scale, sta in variants:
        name = f"yolov8{scale}" + (" + STA" if sta else "")
        model = build(scale, sta)
        paths[name] = folder / f"{scale}{'_sta' if sta else ''}.onnx"
        start = time.perf_counter()
        export_detector(model, paths[name], image_size=args.size)
        session = onnx_session(paths[name], args.threads)
        with torch.inference_mode():
            difference = np.abs(session.run(None, feed)[0] - model(images)[0].numpy())
        print(
            f"{name}: exported in {time.perf_counter() - start:.0f} s, max |onnxruntime - torch| "
            f"{difference.max():.1e}"
        )
        runners[name] = {
            "torch": partial(forward, model, images),
            "onnxruntime": partial(session.run, None, feed),
        }

    times = {name: {runtime: [] for runtime in runs} for name, runs in runners.items()}
    for round_index in range(args.repeats + 2):  # two warm-up rounds
        for name, runs in runners.items():
            for runtime, run in runs.items():
                start = time.perf_counter()
                run()
                if round_index >= 2:
                    times[name][runtime].append(time.perf_counter() - start)

    print(
        f"\n{args.size} px, batch 1, float32, median of {args.repeats} interleaved rounds; memory: peak RSS "
        f"rise of a fresh process loading the model and running it {MEMORY_RUNS} times"
    )
    print("\n| model | PyTorch ms | onnxruntime ms | onnxruntime / PyTorch | PyTorch MB | onnxruntime MB |")
    print("|---|---|---|---|---|---|")
    for (scale, sta), (name, measured) in zip(variants, times.items(), strict=True):
        torch_ms, onnx_ms = (1e3 * statistics.median(measured[r]) for r in ("torch", "onnxruntime"))
        torch_mb, onnx_mb = (
            peak_rss_rise(r, scale, sta, paths[name], args.size, args.threads)
            for r in ("torch", "onnxruntime")
        )
        print(
            f"| {name} | {torch_ms:.0f} | {onnx_ms:.0f} | {onnx_ms / torch_ms:.2f}x | {torch_mb:.0f} "
            f"| {onnx_mb:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scales", nargs="*", default=["n", "s"], choices="nsmlx")
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-child", choices=("torch", "onnxruntime"), help=argparse.SUPPRESS)
    parser.add_argument("--sta", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--onnx", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.scales[0], args.sta, args.onnx, args.size, args.threads)
        return

    with tempfile.TemporaryDirectory(prefix="sta_export_bench_") as folder:
        compare(args, Path(folder))


if __name__ == "__main__":
    main()
