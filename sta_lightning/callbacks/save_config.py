"""LightningCLI config saving that also puts the resolved config into the W&B run config."""

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger


class WandbSaveConfigCallback(SaveConfigCallback):
    """Writes ``config.yaml`` to the log dir (Lightning's behaviour) and copies the config into every W&B run.

    Use as ``LightningCLI(..., save_config_callback=WandbSaveConfigCallback)``. Runs on global rank 0 only.
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not wandb_loggers:
            return
        # Dumped by the parser so that the W&B config equals the saved config.yaml (class paths, defaults).
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in wandb_loggers:
            logger.experiment.config.update(config, allow_val_change=True)
