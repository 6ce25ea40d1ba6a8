"""Fine-tuning from pretrained reference weights with STA inserted, against the same budget from scratch.

Usage: python benchmarks/finetune.py [--pretrained ../shared/data/ultralytics/yolov8n-demo-ul8.2.103.pt]
       [--epochs 3] [--seeds 0]

YOLOv8n with the default STA blocks on the demo dataset (256 px, batch 16, the recipe of
benchmarks/accuracy.py), trained for ``--epochs`` epochs twice per seed: from the pretrained file (STA blocks
start as the identity) and from scratch. Prints val mAP, mAP50 and the fit wall time of each, and the ratios.
The default file is the reference's yolov8n trained on the demo itself (see its README): it shows what the
transfer keeps, not a generalisation result.
"""

import argparse
import os
import statistics
from pathlib import Path

import torch
from accuracy import datamodule, fit_ours

DEFAULT_PRETRAINED = (
    Path(__file__).resolve().parents[1].parent / "shared/data/ultralytics/yolov8n-demo-ul8.2.103.pt"
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pretrained", type=Path, default=DEFAULT_PRETRAINED)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--demo-root", default="data/demo")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/finetune"))
    args = parser.parse_args()
    if not args.pretrained.is_file():
        raise SystemExit(f"no pretrained file at {args.pretrained} (pass --pretrained)")
    # The shared recipe of benchmarks/accuracy.py on the demo; mosaic closes for the last epoch.
    args.close_mosaic = 1
    args.progress = False
    args.train_annotations = None
    torch.set_num_threads(os.cpu_count() or 1)
    datamodule(args).prepare_data()

    runs = {"pretrained": [], "scratch": []}
    for seed in args.seeds:
        for start, pretrained in (("pretrained", str(args.pretrained)), ("scratch", None)):
            run = fit_ours(args, "sta", seed, pretrained=pretrained)
            runs[start].append(run)
            scores = f"mAP {run['map']:.4f}  mAP50 {run['map50']:.4f}"
            print(f"seed {seed} {start:>10}: {scores}  fit {run['seconds']:.0f} s", flush=True)

    def mean(start: str, key: str) -> float:
        return statistics.fmean(run[key] for run in runs[start])

    print(f"\nYOLOv8n + default STA, {args.epochs} epochs at {args.image_size} px, seeds {args.seeds}")
    print("| start | val mAP | val mAP50 | fit wall time (s) |")
    print("|---|---|---|---|")
    for start in runs:
        scores = f"{mean(start, 'map'):.4f} | {mean(start, 'map50'):.4f}"
        print(f"| {start} | {scores} | {mean(start, 'seconds'):.0f} |")
    print(
        f"pretrained / scratch: mAP {mean('pretrained', 'map') / max(mean('scratch', 'map'), 1e-9):.2f}x, "
        f"time {mean('pretrained', 'seconds') / mean('scratch', 'seconds'):.2f}x"
    )


if __name__ == "__main__":
    main()
