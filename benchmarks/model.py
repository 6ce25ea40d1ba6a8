"""YOLOv8 with and without the default STA preset: parameters, GFLOPs, CPU latency and the train-step cost.

Usage: python benchmarks/model.py [--scales n s m l x] [--latency-repeats 10] [--train-steps 10]
       PYTHONPATH=/tmp/ultra_ref YOLO_OFFLINE=1 python benchmarks/model.py   # adds the reference train step

- GFLOPs: torch.utils.flop_counter.FlopCounterMode at 640x640, batch 1 (2 x multiply-accumulates of convs and
  matmuls; BN, activations and pooling are not counted): the reference's fused figures (8.74 for n, BN folded
  into the convs). Its unfused 8.86 GFLOPs for n are thop MACs x 2, which also count BN and bias additions.
- CPU latency: eval, batch 1 at 640, inference mode, median over repeats after one warm-up; wall time and
  process CPU time (on a loaded machine, `--threads 1` and the CPU column measure the work itself).
- Train step of n at batch 8, 320 px, 4 random boxes per image: zero_grad, forward, YOLOv8Loss, backward,
  clip_grad_norm_(10), SGD (nesterov) step. Plain, default STA and (when importable) the reference model run
  in interleaved rounds so that machine load hits them alike; medians and ratios are printed.
"""

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from sta_lightning.models import DEFAULT_STA, YOLOv8, YOLOv8Loss

# l and x take seconds per forward on 2 cores: fewer repeats keep the default run within a few minutes.
DEFAULT_LATENCY_REPEATS = {"n": 10, "s": 7, "m": 5, "l": 3, "x": 3}


def giga_flops(model: torch.nn.Module, size: int) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def median_ms(step: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median wall and process-CPU milliseconds of ``step``."""
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def latency_ms(model: torch.nn.Module, size: int, repeats: int) -> tuple[float, float]:
    images = torch.rand(1, 3, size, size)

    def forward() -> None:
        with torch.inference_mode():
            model(images)

    return median_ms(forward, repeats)


def random_targets(batch: int, size: int, boxes_per_image: int, num_classes: int, generator: torch.Generator):
    """Flat targets in the contract layout: xyxy input pixels, sides 16-128 px."""
    count = batch * boxes_per_image
    wh = torch.rand(count, 2, generator=generator) * 112 + 16
    x1y1 = torch.rand(count, 2, generator=generator) * (size - wh)
    return {
        "batch_idx": torch.arange(batch).repeat_interleave(boxes_per_image),
        "cls": torch.randint(num_classes, (count,), generator=generator),
        "bboxes": torch.cat((x1y1, x1y1 + wh), 1),
    }


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(trainable, lr=0.01, momentum=0.937, nesterov=True, weight_decay=5e-4)


def train_step(model, optimizer, compute_loss, images) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad()
        total, _ = compute_loss(model(images))
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
        optimizer.step()

    return step


def reference_train_step(images, targets) -> Callable[[], None] | None:
    """The reference yolov8n train step on the same data, or None when ultralytics is not importable."""
    try:
        from ultralytics.cfg import get_cfg
        from ultralytics.nn.tasks import DetectionModel
        from ultralytics.utils.ops import xyxy2xywh
    except ImportError:
        return None
    model = DetectionModel("yolov8n.yaml", nc=80, verbose=False).train()
    model.args = get_cfg()
    size = images.shape[-1]
    batch = {
        "batch_idx": targets["batch_idx"].float(),
        "cls": targets["cls"].float().view(-1, 1),
        "bboxes": xyxy2xywh(targets["bboxes"]) / size,
    }
    return train_step(model, sgd(model), lambda preds: model.loss(batch, preds), images)


def compare_train_steps(steps: int, batch: int, size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=generator)
    targets = random_targets(batch, size, 4, 80, generator)
    loss = YOLOv8Loss(80)
    variants = {}
    for name, sta in (("plain", None), ("default STA", DEFAULT_STA)):
        torch.manual_seed(0)
        model = YOLOv8("n", sta=sta).train()
        variants[name] = train_step(model, sgd(model), lambda preds, loss=loss: loss(preds, targets), images)
    reference = reference_train_step(images, targets)
    if reference is not None:
        variants["reference (ultralytics)"] = reference
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(steps + 2):  # two warm-up rounds, then interleaved timed rounds
        for name, step in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            if round_index >= 2:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    wall_ms = {name: 1e3 * statistics.median(values) for name, values in wall.items()}
    cpu_ms = {name: 1e3 * statistics.median(values) for name, values in cpu.items()}
    print(f"\nTrain step, YOLOv8-n, batch {batch} at {size} px, median of {steps} interleaved steps")
    print(
        "(process CPU time is less disturbed by other load than wall time; --threads 1 measures the work):\n"
    )
    print("| variant | wall ms/step | img/s | vs plain | CPU ms/step | vs plain |")
    print("|---|---|---|---|---|---|")
    for name, ms in wall_ms.items():
        print(
            f"| {name} | {ms:.0f} | {batch / ms * 1e3:.1f} | {ms / wall_ms['plain']:.2f}x "
            f"| {cpu_ms[name]:.0f} | {cpu_ms[name] / cpu_ms['plain']:.2f}x |"
        )


def compare_scales(scales: list[str], size: int, repeats: int | None) -> None:
    print(f"\nYOLOv8 at {size} px, batch 1, CPU fp32, {torch.get_num_threads()} threads:\n")
    print("| scale | params M | +STA | GFLOPs | +STA | ms | +STA ms | ratio | CPU ms | +STA CPU ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scale in scales:
        row = []
        for sta in (None, DEFAULT_STA):
            torch.manual_seed(0)
            model = YOLOv8(scale, sta=sta).eval()
            params = sum(p.numel() for p in model.parameters()) / 1e6
            flops = giga_flops(model, size)
            latency = latency_ms(model, size, repeats or DEFAULT_LATENCY_REPEATS[scale])
            row.append((params, flops, latency))
        (p0, f0, (l0, c0)), (p1, f1, (l1, c1)) = row
        print(
            f"| {scale} | {p0:.2f} | {p1:.2f} | {f0:.2f} | {f1:.2f} | {l0:.0f} | {l1:.0f} | {l1 / l0:.2f}x "
            f"| {c0:.0f} | {c1:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scales", nargs="*", default=list(DEFAULT_LATENCY_REPEATS), choices="nsmlx")
    parser.add_argument("--size", type=int, default=640, help="input size for GFLOPs and latency")
    parser.add_argument("--latency-repeats", type=int, default=None, help="default: 10 (n) down to 3 (l, x)")
    parser.add_argument("--train-steps", type=int, default=10, help="0 skips the train-step comparison")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} (timings are noisy above ~0.5)")
    if args.scales:
        compare_scales(args.scales, args.size, args.latency_repeats)
    if args.train_steps:
        compare_train_steps(args.train_steps, args.train_batch, args.train_size)


if __name__ == "__main__":
    main()
