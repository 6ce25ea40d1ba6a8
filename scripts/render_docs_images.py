"""Render docs/attention_maps.png and docs/predictions.png from a trained checkpoint and the demo data, and
copy the dashboards that the run wrote into docs/.

    python scripts/render_docs_images.py CHECKPOINT [--data-root data/demo] [--out docs] [--run-folder DIR]

Runs ``trainer.validate`` on the first validation batch with the tracking callbacks and no image logger, so
the callbacks write their PNG files (exactly what W&B / TensorBoard would show), then tiles them:
- attention_maps.png: for the first validation image, one strip per super-token STA block (hard assignment
  boundaries, then the soft weights of four super tokens), blocks from top to bottom;
- predictions.png: the first ``--num-images`` validation images side by side, predictions (score >= 0.25) in
  green, ground truth in red;
- the ``DASHBOARDS``: the PNG files that ``EvaluationPlotsCallback`` (last validation) and
  ``DatasetStatisticsCallback`` wrote to ``<run folder>/plots/`` during the run (the run folder holds
  ``checkpoints/``, so by default it is the checkpoint's grandparent).
"""

import argparse
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from sta_lightning.callbacks import AttentionMapsCallback, PredictionImagesCallback
from sta_lightning.checkpoint_file import read_checkpoint
from sta_lightning.data import DemoDataModule, LoaderConfig
from sta_lightning.models import DetectorConfig
from sta_lightning.models.checkpoint import read_trained
from sta_lightning.training import DetectionModule

# docs file -> the run folder's plot
DASHBOARDS = {
    "pr_curve.png": "val/pr_curve_iou50.png",
    "f1_curve.png": "val/f1_curve.png",
    "confusion_matrix.png": "val/confusion_matrix_normalized.png",
    "ap_per_class.png": "val/ap_per_class.png",
    "dataset_instances.png": "data/instances_per_class.png",
    "dataset_box_sizes.png": "data/box_sizes.png",
}


def read_pngs(folder: Path) -> list[np.ndarray]:
    """The callback's PNG files of one key, in image order (file names end with the image index)."""
    files = sorted(folder.glob("*.png"), key=lambda path: int(path.stem.rsplit("_", 1)[1]))
    if not files:
        raise FileNotFoundError(f"no images were written to {folder}")
    return [np.asarray(Image.open(file).convert("RGB")) for file in files]


def load_module(checkpoint: Path) -> tuple[DetectionModule, int | None]:
    """The DetectionModule of a ``fit`` checkpoint with its (EMA) weights, and the image size it was trained
    at. Validation needs the detector and its classes only, not the training recipe."""
    content = read_checkpoint(checkpoint)
    trained = read_trained(content, checkpoint)
    module = DetectionModule(
        detector=DetectorConfig(**trained.hyper_parameters["detector"]), classes=trained.classes
    )
    module.load_state_dict(content["state_dict"])
    return module, trained.image_size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument(
        "--data-root",
        default="data/demo",
        help="the demo dataset (DemoDataModule defaults; generated if missing)",
    )
    parser.add_argument("--image-size", type=int, help="default: the checkpoint's training size")
    parser.add_argument("--num-images", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--run-folder", type=Path, help="the run with plots/ (default: from CHECKPOINT)")
    args = parser.parse_args()
    plots = (args.run_folder or args.checkpoint.resolve().parent.parent) / "plots"

    module, trained_size = load_module(args.checkpoint)
    image_size = args.image_size or trained_size
    if image_size is None:
        parser.error(f"{args.checkpoint} does not record its training size: give --image-size")
    datamodule = DemoDataModule(
        root=args.data_root,
        image_size=image_size,
        loader=LoaderConfig(batch_size=args.num_images, num_workers=0),
    )
    with tempfile.TemporaryDirectory() as log_root:
        trainer = L.Trainer(
            accelerator="cpu",
            logger=CSVLogger(log_root),
            callbacks=[
                AttentionMapsCallback(num_images=args.num_images),
                PredictionImagesCallback(num_images=args.num_images),
            ],
            limit_val_batches=1,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.validate(module, datamodule)
        images = Path(trainer.log_dir) / "images" / "val"
        blocks = sorted(path.name for path in (images / "attention").iterdir())
        strips = [read_pngs(images / "attention" / block)[0] for block in blocks]
        predictions = read_pngs(images / "predictions")
    args.out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(strips, axis=0)).save(args.out / "attention_maps.png", optimize=True)
    Image.fromarray(np.concatenate(predictions, axis=1)).save(args.out / "predictions.png", optimize=True)
    for name, source in DASHBOARDS.items():
        Image.open(plots / source).convert("RGB").save(args.out / name, optimize=True)
    print(
        f"wrote attention_maps.png (blocks {', '.join(blocks)}), predictions.png and "
        f"{', '.join(DASHBOARDS)} (from {plots}) to {args.out}"
    )


if __name__ == "__main__":
    main()
