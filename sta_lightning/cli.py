"""``python -m sta_lightning fit|validate|test|predict --config ...``: the LightningCLI of the project.

Beyond Lightning's own CLI it adds:
- ``checkpoint.*``: a ModelCheckpoint on ``val/mAP`` (the best, and ``last.ckpt`` at every save point:
  ``ResumableModelCheckpoint``), configurable like any other class;
- checkpoints written atomically (a kill never leaves a half-written ``last.ckpt``) and checked when read:
  a damaged ``--ckpt_path`` gives a ``CheckpointError`` naming the file (``LocalAtomicCheckpointIO``);
- ``prediction.*``: the PredictionWriter used by ``predict`` (COCO json, optional rendered images), which
  also writes ``test_results.json`` (COCO results of the evaluated detections) into the run folder after
  ``test``;
- the resolved config saved as ``config.yaml`` in the log dir and copied into W&B runs;
- ``model.classes`` linked from the datamodule; when the datamodule has no annotation file (``predict`` on
  bare images) they come from ``--ckpt_path``;
- ``--trainer.sync_batchnorm=true`` synchronises BatchNorm on CPU processes (gloo) too
  (``SyncBatchNormOnAnyDevice``; Lightning's own plugin raises on CPU tensors).

``--ckpt_path`` is read once: its model hyperparameters (the detector, classes and recipe groups) replace the
config's, ``data.image_size`` defaults to the size it was trained at, and the Trainer restores from the same
read; a resumed fit continues the W&B run the checkpoint records. Configs and checkpoints of the flat 0.1
layout fail with a message naming the moved keys. Every fit ends with one plain line of its final validation
metrics (``FinalMetricsSummary``).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.layer_sync import LayerSync

from sta_lightning.callbacks.metrics_summary import FinalMetricsSummary
from sta_lightning.callbacks.prediction_writer import PredictionWriter
from sta_lightning.callbacks.save_config import WandbSaveConfigCallback
from sta_lightning.callbacks.throughput import TrainingThroughput
from sta_lightning.checkpoint_file import CheckpointError, read_checkpoint
from sta_lightning.classes import Classes
from sta_lightning.data import COCODataModule
from sta_lightning.models.checkpoint import TrainedDetector, is_training_checkpoint, read_trained
from sta_lightning.moved_keys import moved_in_arguments, moved_keys_message
from sta_lightning.plugins.checkpoint_io import LocalAtomicCheckpointIO
from sta_lightning.plugins.checkpointing import ResumableModelCheckpoint
from sta_lightning.plugins.layer_sync import SyncBatchNormOnAnyDevice
from sta_lightning.plugins.loggers import WandbRunCheckpoint
from sta_lightning.training import DetectionModule

CHECKPOINT_DEFAULTS = {
    "checkpoint.monitor": "val/mAP",
    "checkpoint.mode": "max",
    "checkpoint.save_last": True,
    "checkpoint.save_top_k": 1,
    "checkpoint.filename": "epoch={epoch:03d}-mAP={val/mAP:.4f}",
    "checkpoint.auto_insert_metric_name": False,
}


class STALightningCLI(LightningCLI):
    """LightningCLI with the default checkpointing, the prediction writer and the class link."""

    checkpoint: dict[str, Any] | None = None  # the --ckpt_path content, read once
    trained: TrainedDetector | None = None  # what that checkpoint says of its detector

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ResumableModelCheckpoint, "checkpoint")
        parser.set_defaults(CHECKPOINT_DEFAULTS)
        parser.add_lightning_class_args(PredictionWriter, "prediction")
        parser.link_arguments("data", "model.classes", compute_fn=self._classes, apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Refuse the flat option names of 0.1 with a message naming each moved key, then parse."""
        moved = moved_in_arguments(sys.argv[1:] if args is None else [str(arg) for arg in args])
        if moved:
            parser.error(moved_keys_message(moved))
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path`` once (CRC-checked, its layout checked), put its model hyperparameters into
        the config and keep the content for the Trainer's restore."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        try:
            content = read_checkpoint(ckpt_path)
            if not is_training_checkpoint(content):
                raise CheckpointError(
                    f"{ckpt_path} is not a checkpoint written by python -m sta_lightning fit"
                )
            trained = read_trained(content, ckpt_path)
        except CheckpointError as error:
            self.parser.error(str(error))
        self.checkpoint, self.trained = content, trained
        model = dict(trained.hyper_parameters)
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
        data = self.config[subcommand]["data"]
        init_args = data.get("init_args", data)
        if init_args.get("image_size") is None and trained.image_size is not None:
            init_args["image_size"] = trained.image_size
        run_state = content.get("callbacks", {}).get(WandbRunCheckpoint.__qualname__, {})
        if subcommand == "fit" and run_state.get("run_id"):
            self._continue_wandb_run(self.config[subcommand]["trainer"], run_state["run_id"])

    @staticmethod
    def _continue_wandb_run(trainer: Any, run_id: str) -> None:
        """Give the config's W&B loggers the checkpoint's run id, unless the config sets one."""
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if not hasattr(logger, "class_path"):
                continue
            module, _, name = logger.class_path.rpartition(".")
            if issubclass(getattr(importlib.import_module(module), name), WandbLogger):
                if not logger.init_args.get("id") and not logger.init_args.get("version"):
                    logger.init_args["id"] = run_id

    def after_instantiate_classes(self) -> None:
        """Every run gets the final-metrics line and its training throughput (``train/images_per_second``,
        kept in checkpoints); a run with a W&B logger keeps its run id in checkpoints."""
        super().after_instantiate_classes()
        if self.trainer is None:
            return
        self.trainer.callbacks += [FinalMetricsSummary(), TrainingThroughput()]
        if any(isinstance(logger, WandbLogger) for logger in self.trainer.loggers):
            self.trainer.callbacks.append(WandbRunCheckpoint())

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured Trainer, with the project's plugins where the config names none of their kind:
        ``LocalAtomicCheckpointIO`` (checkpoints written atomically; it hands the Trainer the ``--ckpt_path``
        content already read) and, with ``sync_batchnorm``, ``SyncBatchNormOnAnyDevice`` (Lightning's own
        synchronises BatchNorm on accelerators only)."""
        config = self._get(self.config_init, "trainer", default={})
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            preloaded = {ckpt_path: self.checkpoint} if self.checkpoint is not None else None
            plugins.append(LocalAtomicCheckpointIO(preloaded))
        if config.get("sync_batchnorm") and not any(isinstance(plugin, LayerSync) for plugin in plugins):
            plugins.append(SyncBatchNormOnAnyDevice())
        return super().instantiate_trainer(plugins=plugins, **kwargs)

    def _classes(self, datamodule: Any) -> Classes:
        """The datamodule's classes, or the checkpoint's when the datamodule has no annotation file."""
        try:
            return datamodule.classes
        # RuntimeError: a COCODataModule without any annotation file; AttributeError: another datamodule.
        except (RuntimeError, AttributeError) as no_classes:
            if self.trained is None:
                raise ValueError(
                    f"the model's classes are unknown ({no_classes}): give the data an annotation file, or "
                    "pass --ckpt_path of a checkpoint trained by this project"
                ) from no_classes
            return self.trained.classes


def main(args: list[str] | None = None) -> STALightningCLI:
    """Run the CLI on ``args`` (default: the command line); returns the CLI (``trainer``, ``model``...)."""
    return STALightningCLI(
        DetectionModule,
        COCODataModule,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_callback=WandbSaveConfigCallback,  # config.yaml in the log dir, and in W&B runs
        save_config_kwargs={"overwrite": True},
        args=args,
    )
