"""YOLOv8 with and without the default STA preset: parameters, GFLOPs, CPU latency and the train-step cost.

Usage: python benchmarks/model.py [--scales n s m l x] [--latency-repeats 10] [--train-steps 10]
       PYTHONPATH=/tmp/ultra_ref YOLO_OFFLINE=1 python benchmarks/model.py   # adds the reference train step

- GFLOPs: torch.utils.flop_counter.FlopCounterMode at 640x640, batch 1 (2 x multiply-accumulates of convs and
  matmuls; BN, activations and pooling are not counted): the reference's fused figures (8.74 for n, BN folded
  into the convs). Its unfused 8.86 GFLOPs for n are thop MACs x 2, which also count BN and bias additions.
- CPU latency: eval, batch 1 at 640, inference mode, plain and default STA in interleaved rounds, medians
  over repeats after one warm-up; wall time and process CPU time (on a loaded machine, `--threads 1` and the
  CPU column measure the work itself).
- Train step of n at batch 8, 320 px, 4 random boxes per image: zero_grad, forward, YOLOv8Loss, backward,
  clip_grad_norm_(10), SGD (nesterov) step. Plain, default STA and (when importable) the reference model run
  in interleaved rounds so that machine load hits them alike; medians and ratios are printed.
- Last, the two yolov8n ratios default STA / plain: inference (640 px, batch 1) and the train step.
"""

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from sta_lightning.models import DEFAULT_STA, YOLOv8, YOLOv8Loss
from sta_lightning.models.flops import giga_flops

# l and x take seconds per forward on 2 cores: fewer repeats keep the default run within a few minutes.
DEFAULT_LATENCY_REPEATS = {"n": 10, "s": 7, "m": 5, "l": 3, "x": 3}


def interleaved_medians(steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 1):
    """Median wall and process-CPU milliseconds of each step, the steps run in interleaved rounds (so that
    load from other processes hits them alike): ({name: wall ms}, {name: CPU ms})."""
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + repeats):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            if round_index >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return (
        {name: 1e3 * statistics.median(values) for name, values in wall.items()},
        {name: 1e3 * statistics.median(values) for name, values in cpu.items()},
    )


def inference_step(model: torch.nn.Module, size: int) -> Callable[[], None]:
    images = torch.rand(1, 3, size, size)

    def forward() -> None:
        with torch.inference_mode():
            model(images)

    return forward


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


def compare_train_steps(steps: int, batch: int, size: int) -> float:
    """Prints the train-step table; returns the default STA / plain wall-time ratio."""
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
    wall_ms, cpu_ms = interleaved_medians(variants, steps, warmup=2)
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
    return wall_ms["default STA"] / wall_ms["plain"]


def compare_scales(scales: list[str], size: int, repeats: int | None) -> dict[str, float]:
    """Prints the per-scale table (plain and default STA timed in interleaved rounds); returns each scale's
    default STA / plain wall-time ratio."""
    print(f"\nYOLOv8 at {size} px, batch 1, CPU fp32, {torch.get_num_threads()} threads:\n")
    print("| scale | params M | +STA | GFLOPs | +STA | ms | +STA ms | ratio | CPU ms | +STA CPU ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratios = {}
    for scale in scales:
        models = {}
        for name, sta in (("plain", None), ("sta", DEFAULT_STA)):
            torch.manual_seed(0)
            models[name] = YOLOv8(scale, sta=sta).eval()
        params = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in models.items()}
        flops = {name: giga_flops(m, size) for name, m in models.items()}
        steps = {name: inference_step(m, size) for name, m in models.items()}
        wall, cpu = interleaved_medians(steps, repeats or DEFAULT_LATENCY_REPEATS[scale])
        ratios[scale] = wall["sta"] / wall["plain"]
        print(
            f"| {scale} | {params['plain']:.2f} | {params['sta']:.2f} | {flops['plain']:.2f} "
            f"| {flops['sta']:.2f} | {wall['plain']:.0f} | {wall['sta']:.0f} | {ratios[scale]:.2f}x "
            f"| {cpu['plain']:.0f} | {cpu['sta']:.0f} |"
        )
    return ratios


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
    summary = []
    if args.scales:
        repeats = args.latency_repeats
        ratios = compare_scales(args.scales, args.size, repeats)
        if "n" in ratios:
            count = repeats or DEFAULT_LATENCY_REPEATS["n"]
            summary.append(
                f"inference ({args.size} px, batch 1): {ratios['n']:.2f}x "
                f"(medians of {count} interleaved runs)"
            )
    if args.train_steps:
        ratio = compare_train_steps(args.train_steps, args.train_batch, args.train_size)
        summary.append(
            f"train step (batch {args.train_batch}, {args.train_size} px): {ratio:.2f}x "
            f"(medians of {args.train_steps} interleaved steps)"
        )
    if summary:
        print(f"\nYOLOv8-n, default STA vs plain, wall time, {args.threads} thread(s):")
        for line in summary:
            print(f"  {line}")


if __name__ == "__main__":
    main()
