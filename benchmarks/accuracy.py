"""End-to-end accuracy against the reference YOLOv8: the same data, recipe and budget, scored alike.

Usage:
    python benchmarks/accuracy.py --seeds 0 1 --reference-python /path/to/ref-venv/bin/python
    python benchmarks/accuracy.py --train-images I --train-annotations A.json --val-images V \\
        --val-annotations B.json --image-size 320 --epochs 30 --reference-python ...

The reference's environment is its own: ``python -m venv ref && ref/bin/pip install ultralytics==8.2.103``
(its pins, numpy<2 among them, never touch the project's environment). Without ``--reference-python`` only
this project's variants run.

Per seed, on one COCO-format dataset (default: the demo dataset, generated under data/demo):
- this project trains YOLOv8n plain and with the default STA blocks (``--variants``; ``sta-mosaic-group``
  adds ``mosaic_group 16`` to the default augmentation, ``sta-mosaic-group-32`` groups of 32,
  ``sta-polygon-boxes`` ``polygon_boxes``) through Lightning, and evaluates its final EMA weights on the val
  split;
- the reference trains its yolov8n on the same images, with labels written on the fly in its txt layout
  (crowd regions left out, as for this project's training; box lines, or with ``--polygon-labels`` polygon
  lines, whose warped points give its boxes as ``polygon_boxes`` does here), and predicts the val images
  with its final EMA weights (conf 0.001, IoU 0.7, max_det 300). It draws a mosaic's 3 partners from a buffer
  of the images its worker loaded recently; with ``--reference-partners dataset`` uniformly over the dataset,
  as this project does (its own code path, ``Mosaic.get_indexes(buffer=False)``).
Both sides' detections are scored by ``evaluate_coco`` on the same val annotation file. The recipe is the
same on both sides: AdamW, lr0 0.002, momentum 0.9, weight decay 5e-4, nominal batch 16, 1 warmup epoch of at
least 100 iterations (the reference's floor), warmup bias lr 0, EMA tau 2000, close_mosaic 5, default
augmentation gains, fp32 on the CPU. Prints each run, the means over seeds, the mAP ratios to the
reference and the fit wall times (fit call only, final validation included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from reference_partners import add_partners_option

from sta_lightning.data import AugmentConfig, COCODataModule, DemoDataModule, LoaderConfig, Split
from sta_lightning.data.yolo_format import write_split
from sta_lightning.metrics import evaluate_coco
from sta_lightning.models import DetectorConfig
from sta_lightning.training import DetectionModule
from sta_lightning.training.ema import EMAConfig
from sta_lightning.training.optim import OptimizerConfig, WarmupConfig

REFERENCE_SCRIPT = Path(__file__).with_name("reference_yolov8.py")
VARIANTS = {  # name: (STA preset, changes to the default augmentation)
    "plain": (None, {}),
    "sta": ("default", {}),
    "sta-mosaic-group": ("default", {"mosaic_group": 16}),
    "sta-mosaic-group-32": ("default", {"mosaic_group": 32}),
    "sta-polygon-boxes": ("default", {"polygon_boxes": True}),
}


def recipe(args: argparse.Namespace) -> dict:
    """The shared hyperparameters, under the reference's names."""
    return dict(
        epochs=args.epochs,
        batch=args.batch,
        imgsz=args.image_size,
        optimizer="AdamW",
        lr0=0.002,
        lrf=0.01,
        momentum=0.9,
        weight_decay=5e-4,
        nbs=args.batch,
        warmup_epochs=1.0,
        warmup_bias_lr=0.0,
        close_mosaic=args.close_mosaic,
        workers=args.workers,
    )


def datamodule(args: argparse.Namespace, augment: dict | None = None) -> COCODataModule:
    """The benchmark's data, with the default augmentation changed by ``augment`` (AugmentConfig fields)."""
    common = dict(
        image_size=args.image_size,
        loader=LoaderConfig(batch_size=args.batch, num_workers=args.workers),
        augment=AugmentConfig(close_mosaic=args.close_mosaic, **(augment or {})),
    )
    if args.train_annotations:
        return COCODataModule(
            train=Split(args.train_images, args.train_annotations),
            val=Split(args.val_images, args.val_annotations),
            **common,
        )
    return DemoDataModule(root=args.demo_root, **common)


def fit_ours(args: argparse.Namespace, variant: str, seed: int, pretrained: str | None = None) -> dict:
    """Fit this project's YOLOv8n (a name of VARIANTS, starting from the ``pretrained`` weights file when
    given); returns mAP, mAP50 and the fit seconds."""
    hp = recipe(args)
    sta, augment = VARIANTS[variant]
    L.seed_everything(seed, workers=True, verbose=False)
    data = datamodule(args, augment)
    model = DetectionModule(
        detector=DetectorConfig(scale="n", sta=sta, pretrained=pretrained),
        classes=data.classes,
        optimizer=OptimizerConfig(
            name=hp["optimizer"],
            lr0=hp["lr0"],
            lrf=hp["lrf"],
            momentum=hp["momentum"],
            weight_decay=hp["weight_decay"],
            nominal_batch_size=hp["nbs"],
        ),
        warmup=WarmupConfig(epochs=hp["warmup_epochs"], min_iterations=100, bias_lr=hp["warmup_bias_lr"]),
        ema=EMAConfig(tau=2000.0),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        check_val_every_n_epoch=args.epochs,  # one validation, of the final EMA weights
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=args.progress,
        default_root_dir=str(args.out_dir / f"ours-{variant}-seed{seed}"),
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    metrics = trainer.callback_metrics
    return {"map": float(metrics["val/mAP"]), "map50": float(metrics["val/mAP50"]), "seconds": seconds}


def fit_reference(args: argparse.Namespace, seed: int, data: COCODataModule) -> dict:
    """Train the reference yolov8n in its own interpreter; score its val detections with evaluate_coco."""
    train, val = data.splits["train"], data.splits["val"]
    labels = "-polygons" if args.polygon_labels else ""
    partners = "" if args.reference_partners == "buffer" else "-dataset-partners"
    layout = (args.out_dir / f"reference-data{labels}").resolve()
    write_split(train.annotations, train.images, layout, "train", polygons=args.polygon_labels)
    image_ids = {
        str(path): image_id
        for image_id, path in write_split(val.annotations, val.images, layout, "val").paths.items()
    }
    val_paths = list(image_ids)
    data_yaml = layout / "data.yaml"
    run_dir = (args.out_dir / f"reference{labels}{partners}-seed{seed}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    job = {
        "model": "yolov8n.yaml",
        "data_yaml": str(data_yaml.resolve()),
        "out_dir": str(run_dir),
        "train": {
            **recipe(args),
            "seed": seed,
            "deterministic": True,
            "device": "cpu",
            "amp": False,
            "plots": False,
            "val": False,  # the final epoch is validated anyway; the score is ours, below
            "pretrained": False,
            "verbose": False,
        },
        "mosaic_partners": args.reference_partners,
        "val_images": val_paths,
        "predict": {"imgsz": args.image_size, "conf": 0.001, "iou": 0.7, "max_det": 300, "device": "cpu"},
    }
    job_file = run_dir / "job.json"
    job_file.write_text(json.dumps(job, indent=1))
    env = {
        **os.environ,
        "YOLO_OFFLINE": "1",
        "YOLO_CONFIG_DIR": str(run_dir / "config"),
        "PYTHONPATH": "",
    }
    log_file = run_dir / "log.txt"
    with log_file.open("w") as log:
        completed = subprocess.run(
            [args.reference_python, str(REFERENCE_SCRIPT), str(job_file)], stdout=log, stderr=log, env=env
        )
    if completed.returncode != 0:
        sys.exit(f"the reference run failed (exit {completed.returncode}); its log: {log_file}")
    result = json.loads((run_dir / "result.json").read_text())
    category_ids = data.classes.category_ids
    detections = [
        {
            "image_id": image_ids[path],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": score,
            "category_id": category_ids[int(cls)],
        }
        for path, found in result["detections"].items()
        for x1, y1, x2, y2, score, cls in found
    ]
    metrics = evaluate_coco(val.annotations, detections)
    return {"map": metrics["map"], "map50": metrics["map_50"], "seconds": result["fit_seconds"]}


def mean(runs: list[dict], key: str) -> float:
    return statistics.fmean(run[key] for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference-python", help="python of a venv with ultralytics==8.2.103")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=sorted(VARIANTS),
        default=["plain", "sta"],
        help="none: the reference only",
    )
    parser.add_argument(
        "--polygon-labels",
        action="store_true",
        help="the reference reads the objects' polygons (its boxes after the warp come from them)",
    )
    add_partners_option(parser)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--close-mosaic", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--demo-root", default="data/demo")
    parser.add_argument("--train-images")
    parser.add_argument("--train-annotations")
    parser.add_argument("--val-images")
    parser.add_argument("--val-annotations")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/accuracy"))
    parser.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    data = datamodule(args)
    data.prepare_data()  # generates the demo dataset when it is missing
    sides = [*args.variants] + (["reference"] if args.reference_python else [])
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for seed in args.seeds:
        for side in sides:
            print(f"seed {seed}: fitting {side} ...", flush=True)
            if side == "reference":
                run = fit_reference(args, seed, data)
            else:
                run = fit_ours(args, side, seed)
            runs[side].append(run)
            print(
                f"seed {seed} {side:>9}: mAP {run['map']:.4f}  mAP50 {run['map50']:.4f}  "
                f"fit {run['seconds']:.0f} s",
                flush=True,
            )

    print(
        f"\nYOLOv8n, {args.epochs} epochs at {args.image_size} px, batch {args.batch}, "
        f"mean of seeds {' '.join(map(str, args.seeds))}"
    )
    print("| run | val mAP | val mAP50 | mAP vs reference | fit wall time (s) | time vs reference |")
    print("|---|---|---|---|---|---|")
    reference = runs.get("reference")
    reference = reference if reference and mean(reference, "map") > 0 else None  # no ratios to a 0 mAP
    for side, side_runs in runs.items():
        ratio = f"{mean(side_runs, 'map') / mean(reference, 'map'):.3f}" if reference else "-"
        time_ratio = f"{mean(side_runs, 'seconds') / mean(reference, 'seconds'):.2f}" if reference else "-"
        name = f"{side} (sta_lightning)"
        if side == "reference":
            name = f"reference (ultralytics), mosaic partners from its {args.reference_partners}"
        print(
            f"| {name} | {mean(side_runs, 'map'):.4f} | {mean(side_runs, 'map50'):.4f} | {ratio} "
            f"| {mean(side_runs, 'seconds'):.0f} | {time_ratio} |"
        )


if __name__ == "__main__":
    main()
