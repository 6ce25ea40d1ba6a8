"""Cost of one demo training step (configs/demo.yaml) relative to the classic CPU baseline step.

Usage: python benchmarks/demo.py [--rounds 6] [--threads 2] [--baseline-seconds 0.255]

Both steps run in interleaved rounds in one process, so that machine load hits them alike:
- baseline: plain YOLOv8n, batch 8 at 320 px (the step of docs' "CPU baseline", 0.255 s on 2 quiet cores);
- demo: YOLOv8n with the default STA placements, batch 16 at 256 px, 5 classes (configs/demo.yaml).
A step is forward, YOLOv8Loss, backward, clip_grad_norm_(10), optimizer step, zero_grad, on random images with
4 boxes each. Prints the medians, their ratio, and the demo's training time on a machine where the baseline
step takes --baseline-seconds (25 steps per epoch, 20 epochs; data loading and validation not included).
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from sta_lightning.models import DEFAULT_STA, YOLOv8, YOLOv8Loss

DEMO_STEPS = 20 * 25  # epochs x (400 images / batch 16)


def training_step(sta, image_size: int, batch: int, num_classes: int) -> Callable[[], None]:
    model = YOLOv8("n", num_classes, sta)
    loss = YOLOv8Loss(num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.001)
    images = torch.rand(batch, 3, image_size, image_size)
    boxes = torch.tensor([[10.0, 10, 60, 60], [100, 100, 150, 170], [30, 120, 90, 200], [150, 20, 200, 60]])
    targets = {
        "batch_idx": torch.arange(batch).repeat_interleave(4),
        "cls": torch.randint(0, num_classes, (4 * batch,)),
        "bboxes": boxes.repeat(batch, 1) * image_size / 256,
    }

    def step() -> None:
        total, _ = loss(model(images), targets)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-seconds", type=float, default=0.255)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps = {
        "baseline (plain n, b8 @320)": training_step(None, 320, 8, 80),
        "demo (n + default STA, b16 @256)": training_step(DEFAULT_STA, 256, 16, 5),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name:34s} median {median:.3f} s over {args.rounds} rounds")
    ratio = medians["demo (n + default STA, b16 @256)"] / medians["baseline (plain n, b8 @320)"]
    print(f"demo / baseline step: {ratio:.2f}")
    estimate = ratio * args.baseline_seconds * DEMO_STEPS
    print(f"{DEMO_STEPS} demo steps at a {args.baseline_seconds} s baseline step: {estimate / 60:.1f} min")


if __name__ == "__main__":
    main()
