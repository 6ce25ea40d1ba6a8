"""A few optimizer steps of a DetectionModule on a tiny demo dataset, for tests that need trained weights."""

from pathlib import Path

import lightning as L

from sta_lightning.data import DemoDataModule, LoaderConfig
from sta_lightning.training import DetectionModule


def fit_steps(module: DetectionModule, root: Path, steps: int = 2, image_size: int = 128) -> None:
    """Fit ``module`` for ``steps`` optimizer steps on 8 demo images (batch 4) under ``root``, on the CPU,
    without validation, logging or checkpoints."""
    data = DemoDataModule(
        root=str(root),
        num_train=8,
        num_val=2,
        image_size=image_size,
        loader=LoaderConfig(batch_size=4, num_workers=0),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
