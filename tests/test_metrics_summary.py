"""FinalMetricsSummary: one plain line of the last validation's metrics at the end of a real fit."""

import logging

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from sta_lightning.callbacks.metrics_summary import FinalMetricsSummary

LONG_NAME = "val/average_recall_at_100_detections_small_objects"  # beyond a progress bar's column


class ValidatedModel(BoringModel):
    """Logs a training loss, and at each validation metrics that depend on the epoch."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train/box_loss", out["loss"])
        return out

    def on_validation_epoch_end(self) -> None:
        epoch = self.current_epoch
        self.log("val/mAP", torch.tensor(0.1 + 0.25 * epoch))
        self.log("val/mAP50", torch.tensor(0.123456))
        self.log(LONG_NAME, torch.tensor(1 / 3))


def _fit(tmp_path, callback: FinalMetricsSummary, **trainer_args) -> None:
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **trainer_args,
    )
    trainer.fit(ValidatedModel())


def _summary_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "Final validation" in record.getMessage()]


def test_fit_ends_with_one_line_of_the_last_validation(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        _fit(tmp_path, FinalMetricsSummary(), num_sanity_val_steps=1)
    assert _summary_lines(caplog) == [
        f"Final validation (epoch 1): val/mAP 0.3500  val/mAP50 0.1235  {LONG_NAME} 0.3333"
    ]


def test_no_line_without_a_validation(tmp_path, caplog):
    # Validation only in the sanity check (which the line does not report), none in the fit.
    with caplog.at_level(logging.INFO):
        _fit(tmp_path, FinalMetricsSummary(), num_sanity_val_steps=1, check_val_every_n_epoch=5)
    assert _summary_lines(caplog) == []


def test_prefix_and_digits():
    summary = FinalMetricsSummary(prefix="train/", digits=2)
    metrics = {"train/box_loss": torch.tensor(1.23456), "val/mAP": torch.tensor(0.5)}
    assert summary.summary(metrics) is None  # before any validation
    summary.epoch = 3
    assert summary.summary(metrics) == "Final validation (epoch 3): train/box_loss 1.23"
