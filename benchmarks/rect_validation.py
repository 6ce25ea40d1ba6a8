"""Validation in rect batches against square letterboxes: mAP and time of the same checkpoint, side by side.

    python benchmarks/rect_validation.py --ckpt CHECKPOINT [CHECKPOINT ...] [--config configs/demo.yaml]
        [--rounds 5]

Builds the CLI's ``validate`` twice (``--data.loader.rect`` false and true; the config's dashboard callbacks
and loggers off), then times ``trainer.validate`` of each in alternating rounds (the first, warm-up round
left out), in one process, so that machine load hits both alike. Prints, per side, val/mAP and val/mAP50
(the same in every round, checked), the median seconds per validation and the input pixels per image, and
the ratios; with several checkpoints, the median speed-up and the mean mAP difference over them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from sta_lightning import cli as sta_cli  # noqa: E402


def validation(config: str, ckpt: str, rect: bool) -> tuple[Callable[[], tuple], Callable[[], float]]:
    """A function that validates the checkpoint once more, returning (val/mAP, val/mAP50), and one that gives
    the mean input pixels per image of its loader."""
    cli = sta_cli.main(
        [
            "validate",
            f"--config={config}",
            f"--ckpt_path={ckpt}",
            f"--data.loader.rect={str(rect).lower()}",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )

    def run() -> tuple[float, float]:
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
        return tuple(float(cli.trainer.callback_metrics[key]) for key in ("val/mAP", "val/mAP50"))

    def pixels() -> float:
        loader = cli.datamodule.val_dataloader()
        dataset = loader.dataset
        shapes = dataset.letterbox_shapes
        size = dataset.image_size
        return size * size if shapes is None else float((shapes[:, 0] * shapes[:, 1]).mean())

    return run, pixels


def compare(config: str, ckpt: str, rounds: int) -> tuple[float, float]:
    """Print one checkpoint's comparison; returns (rect's speed-up, rect's mAP minus square's)."""
    sides = {name: validation(config, ckpt, name == "rect") for name in ("square", "rect")}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    metrics: dict[str, set[tuple[float, float]]] = {name: set() for name in sides}
    for round_number in range(rounds + 1):
        for name, (run, _) in sides.items():
            start = time.perf_counter()
            metrics[name].add(run())
            if round_number:
                seconds[name].append(time.perf_counter() - start)
    print(f"{ckpt} with {config}: median of {rounds} alternating validations per side")
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name, (_, pixels) in sides.items():
        (mean_ap, ap50), *others = metrics[name]
        same = "the same in every round" if not others else f"DIFFERING: {sorted(metrics[name])}"
        print(
            f"  {name:>6}: val/mAP {mean_ap:.4f}, val/mAP50 {ap50:.4f} ({same}); {medians[name]:.2f} s per "
            f"validation; {pixels():.0f} input pixels per image"
        )
    (square_ap, _), (rect_ap, _) = (next(iter(metrics[name])) for name in ("square", "rect"))
    speed, difference = medians["square"] / medians["rect"], rect_ap - square_ap
    print(f"  rect / square: {speed:.2f}x the speed, mAP {difference:+.4f}")
    return speed, difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", nargs="+", required=True, help="one or more checkpoints")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = [compare(args.config, ckpt, args.rounds) for ckpt in args.ckpt]
    if len(results) > 1:
        speeds, differences = zip(*results, strict=True)
        print(
            f"over {len(results)} checkpoints: rect {statistics.median(speeds):.2f}x the speed (median), mAP "
            f"difference {statistics.mean(differences):+.4f} on average (from {min(differences):+.4f} to "
            f"{max(differences):+.4f})"
        )


if __name__ == "__main__":
    main()
