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
- ``model.pretrained`` is ignored when ``--ckpt_path`` is given (the checkpoint holds the weights);
- the classes (``num_classes``, ``class_names``, ``category_ids``) linked from the datamodule to the model;
  when the datamodule has no annotation file (``predict`` on bare images) they come from ``--ckpt_path``;
- ``--trainer.sync_batchnorm=true`` synchronises BatchNorm on CPU processes (gloo) too
  (``SyncBatchNormOnAnyDevice``; Lightning's own plugin raises on CPU tensors).
A checkpoint also carries the model's hyperparameters, which LightningCLI reads back from ``--ckpt_path``, so
``validate|test|predict --ckpt_path X`` needs only the data arguments.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.layer_sync import LayerSync

from sta_lightning.callbacks.prediction_writer import PredictionWriter
from sta_lightning.callbacks.save_config import WandbSaveConfigCallback
from sta_lightning.checkpoint_file import read_checkpoint
from sta_lightning.data import COCODataModule
from sta_lightning.training import DetectionModule
from sta_lightning.training.checkpoint_io import LocalAtomicCheckpointIO
from sta_lightning.training.checkpointing import ResumableModelCheckpoint
from sta_lightning.training.layer_sync import SyncBatchNormOnAnyDevice

CLASS_KEYS = ("num_classes", "class_names", "category_ids")
CHECKPOINT_DEFAULTS = {
    "checkpoint.monitor": "val/mAP",
    "checkpoint.mode": "max",
    "checkpoint.save_last": True,
    "checkpoint.save_top_k": 1,
    "checkpoint.filename": "epoch={epoch:03d}-mAP={val/mAP:.4f}",
    "checkpoint.auto_insert_metric_name": False,
}


class STALightningCLI(LightningCLI):
    """LightningCLI with the default checkpointing, the prediction writer and the class links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ResumableModelCheckpoint, "checkpoint")
        parser.set_defaults(CHECKPOINT_DEFAULTS)
        parser.add_lightning_class_args(PredictionWriter, "prediction")
        for key in CLASS_KEYS:
            parser.link_arguments(
                "data", f"model.{key}", compute_fn=partial(self._class_info, key), apply_on="instantiate"
            )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check a ``--ckpt_path`` file (LightningCLI reads its hyperparameters next, with a bare
        torch error for a damaged file): ``read_checkpoint`` raises a CheckpointError naming it."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            self._ckpt_hyperparameters = read_checkpoint(ckpt_path).get("hyper_parameters", {})

    def before_instantiate_classes(self) -> None:
        # With --ckpt_path the checkpoint holds the weights: ``model.pretrained`` is not read again, so a
        # checkpoint fine-tuned from a file validates and resumes where that file does not exist.
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path"):
            self.config[subcommand]["model"]["pretrained"] = None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured Trainer, with the project's plugins where the config names none of their kind:
        ``LocalAtomicCheckpointIO`` (checkpoints written atomically) and, with ``sync_batchnorm``,
        ``SyncBatchNormOnAnyDevice`` (Lightning's own synchronises BatchNorm on accelerators only)."""
        config = self._get(self.config_init, "trainer", default={})
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(LocalAtomicCheckpointIO())
        if config.get("sync_batchnorm") and not any(isinstance(plugin, LayerSync) for plugin in plugins):
            plugins.append(SyncBatchNormOnAnyDevice())
        return super().instantiate_trainer(plugins=plugins, **kwargs)

    def _class_info(self, key: str, datamodule: Any) -> Any:
        """``datamodule.<key>``, or the checkpoint's when the datamodule has no annotation file."""
        try:
            return getattr(datamodule, key)
        # RuntimeError: a COCODataModule without any annotation file; AttributeError: another datamodule.
        except (RuntimeError, AttributeError) as no_classes:
            hyperparameters = self._checkpoint_hyperparameters()
            if key not in hyperparameters:
                raise ValueError(
                    f"the model's {key} is unknown ({no_classes}): give the data an annotation file, or pass "
                    "--ckpt_path of a checkpoint trained by this project"
                ) from no_classes
            return hyperparameters[key]

    def _checkpoint_hyperparameters(self) -> dict[str, Any]:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return {}
        if not hasattr(self, "_ckpt_hyperparameters"):
            checkpoint = read_checkpoint(ckpt_path)
            self._ckpt_hyperparameters = checkpoint.get("hyper_parameters", {})
        return self._ckpt_hyperparameters


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
