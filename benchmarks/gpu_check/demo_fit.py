"""The demo fit on a GPU: ``python -m sta_lightning fit --config configs/demo.yaml --trainer.accelerator gpu``
in a given precision, then its final val/mAP and val/mAP50 (the README's CPU run: 0.676 / 0.818).

Run: ``python benchmarks/gpu_check/demo_fit.py --precision 16-mixed --work DIR [--workers 4]``
     ``--dry-run``: on the CPU, 1 epoch of 8 images at 64 px (checks the command line, not the result).

The fit runs in ``DIR/fit-<precision>`` (its runs/ folder: CSV log, W&B offline run, checkpoints) on the demo
data in ``DIR/demo`` (generated once, under a lock, so that fits started together share it). Its output goes
to this script's output, with one line per epoch (``gpu_check_progress.EpochLines``). Without wandb the fit
runs a copy of configs/demo.yaml without its W&B logger. Exit status: the fit's, or 1 when it logged no
final validation.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_utils import ROOT, demo_config, result, say  # noqa: E402

HERE = Path(__file__).resolve().parent
DEMO = {"num_train": 400, "num_val": 100}  # configs/demo.yaml's data (DemoDataModule's defaults)
DRY_DEMO = {"num_train": 8, "num_val": 4}
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def fit_command(
    demo_root: Path, precision: str, workers: int | None, dry_run: bool, config: Path = DEMO_CONFIG
) -> list[str]:
    """The fit's command line (kept in one place: the data flags follow the datamodule's config groups)."""
    command = [
        sys.executable,
        "-m",
        "sta_lightning",
        "fit",
        f"--config={config}",
        f"--trainer.accelerator={'cpu' if dry_run else 'gpu'}",
        "--trainer.devices=1",
        f"--trainer.precision={precision}",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=" + json.dumps({"class_path": "gpu_check_progress.EpochLines"}),
        f"--data.init_args.root={demo_root}",
    ]
    if workers is not None:
        command.append(f"--data.init_args.loader.num_workers={workers}")
    if not dry_run:
        command.append("--data.init_args.loader.pin_memory=true")
    if dry_run:
        command += [
            "--trainer.max_epochs=1",
            "--trainer.check_val_every_n_epoch=1",
            f"--data.init_args.num_train={DRY_DEMO['num_train']}",
            f"--data.init_args.num_val={DRY_DEMO['num_val']}",
            "--data.init_args.image_size=64",
            "--data.init_args.loader.batch_size=4",
        ]
    return command


def prepare_demo(root: Path, settings: dict[str, int]) -> None:
    """Generate the demo data once; a second fit started at the same time waits for the first."""
    from sta_lightning.data.demo import demo_is_complete, generate_demo_dataset

    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not demo_is_complete(root, seed=0, **settings):
            start = time.monotonic()
            generate_demo_dataset(root, seed=0, **settings)
            say(f"demo data generated in {root} in {time.monotonic() - start:.0f} s")


def final_metrics(run_dir: Path) -> dict[str, str]:
    """The last logged row with a val/mAP in the newest metrics.csv under ``run_dir``."""
    logs = sorted(run_dir.glob("runs/**/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return {}
    with open(logs[-1]) as file:
        rows = [row for row in csv.DictReader(file) if row.get("val/mAP")]
    return rows[-1] if rows else {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precision", default="16-mixed", help="Lightning precision: 16-mixed, bf16-mixed")
    parser.add_argument("--work", type=Path, required=True, help="folder of the fit and of the demo data")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: config's)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, 1 epoch of 8 images at 64 px")
    args = parser.parse_args(argv)
    demo_root = args.work / ("demo-dry" if args.dry_run else "demo")
    prepare_demo(demo_root, DRY_DEMO if args.dry_run else DEMO)
    run_dir = args.work / f"fit-{args.precision}"
    run_dir.mkdir(parents=True, exist_ok=True)
    config, wandb = demo_config(args.work)
    command = fit_command(demo_root, args.precision, args.workers, args.dry_run, config)
    environment = dict(os.environ)
    path = [str(HERE), str(ROOT), os.environ.get("PYTHONPATH")]
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    say("$ " + " ".join(command[1:]))
    start = time.monotonic()
    code = subprocess.run(command, cwd=run_dir, env=environment).returncode
    seconds = time.monotonic() - start
    metrics = final_metrics(run_dir)
    if code == 0 and metrics:
        result(
            f"demo fit {args.precision}: val/mAP {float(metrics['val/mAP']):.4f}, val/mAP50 "
            f"{float(metrics.get('val/mAP50') or 'nan'):.4f} after epoch {int(metrics['epoch']) + 1}, "
            f"{seconds:.0f} s" + ("" if wandb else " (no W&B logger: wandb missing)")
        )
        return
    result(f"demo fit {args.precision}: FAILED (exit status {code}, {seconds:.0f} s, last metrics {metrics})")
    sys.exit(code or 1)


if __name__ == "__main__":
    main()
