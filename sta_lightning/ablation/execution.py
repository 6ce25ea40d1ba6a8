"""Running one run of an ablation: its ``fit`` (a subprocess, resumed from ``last.ckpt`` after a kill), then a
``validate`` of its final checkpoint, whose COCO statistics go into ``result.json`` with its cost."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from sta_lightning.ablation.plan import Ablation, Run
from sta_lightning.callbacks.throughput import TrainingThroughput
from sta_lightning.checkpoint_file import read_checkpoint
from sta_lightning.metrics import COCO_STATS
from sta_lightning.models.checkpoint import read_trained
from sta_lightning.models.flops import giga_flops

RUN_CONFIG_FILE = "run.yaml"
METRICS = tuple(stat.logged for stat in COCO_STATS)  # mAP, mAP50, ... as ``validate`` logs them after val/
COST = ("params", "gflops", "images_per_second", "fit_seconds")


def run_config(ablation: Ablation, run: Run) -> dict[str, Any]:
    """The config merged last into a run's fit: its seed, its folder (checkpoints, CSV log), a
    ``last.ckpt`` at each epoch end, and its W&B run in the ablation's group."""
    loggers: list[dict[str, Any]] = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(run.folder), "name": "", "version": ""},
        }
    ]
    if ablation.wandb.project:
        loggers.append(
            {
                "class_path": "sta_lightning.plugins.loggers.OfflineFallbackWandbLogger",
                "init_args": {
                    "project": ablation.wandb.project,
                    "name": f"{ablation.name}/{run.variant.name}/seed-{run.seed}",
                    "group": ablation.name,
                    "tags": [f"variant:{run.variant.name}", f"seed:{run.seed}"],
                    "offline": ablation.wandb.offline,
                    "save_dir": str(run.folder),
                },
            }
        )
    return {
        "seed_everything": run.seed,
        "trainer": {"default_root_dir": str(run.folder), "logger": loggers},
        "checkpoint": {"dirpath": str(run.folder / "checkpoints"), "save_on_train_epoch_end": True},
    }


def config_arguments(ablation: Ablation, run: Run) -> list[str]:
    """``--config`` of the base configs and of the run's variant, then the ablation's overrides."""
    configs = [*ablation.configs, *([run.variant.config] if run.variant.config else [])]
    return [argument for config in configs for argument in ("--config", config)] + list(ablation.overrides)


def fit_command(ablation: Ablation, run: Run) -> list[str]:
    """The ``fit`` of a run: its configs, the overrides, then the run config; from ``last.ckpt`` if killed."""
    command = [sys.executable, "-m", "sta_lightning", "fit", *config_arguments(ablation, run)]
    command += ["--config", str(run.folder / RUN_CONFIG_FILE)]
    if run.state() == "killed":
        command += ["--ckpt_path", str(run.last_checkpoint)]
    return command


def fit(ablation: Ablation, run: Run) -> None:
    """Fit a run in a subprocess (its output goes to this process's); raise ``RuntimeError`` on failure."""
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / RUN_CONFIG_FILE).write_text(yaml.safe_dump(run_config(ablation, run), sort_keys=False))
    command = fit_command(ablation, run)
    completed = subprocess.run(command)
    if completed.returncode != 0:
        raise RuntimeError(f"the fit of {run.key} failed (exit {completed.returncode}): {' '.join(command)}")
    if not run.last_checkpoint.is_file():
        raise RuntimeError(f"the fit of {run.key} wrote no {run.last_checkpoint}")


def validate(ablation: Ablation, run: Run) -> dict[str, float]:
    """The COCO statistics that ``python -m sta_lightning validate`` computes for the run's ``last.ckpt``
    (in this process, on one device, without loggers or callbacks), by their logged names."""
    from sta_lightning.cli import main as cli_main

    arguments = [
        "validate",
        *config_arguments(ablation, run),
        f"--ckpt_path={run.last_checkpoint}",
        f"--checkpoint.dirpath={run.last_checkpoint.parent}",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.strategy=auto",
    ]
    with warnings.catch_warnings():
        # The fit's W&B run-id callback is not needed to read its weights.
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks used")
        metrics = cli_main(arguments).trainer.callback_metrics
    return {name: float(metrics[f"val/{name}"]) for name in METRICS}


def cost(checkpoint: Path) -> dict[str, float]:
    """Parameters and GFLOPs (at the training size) of a checkpoint's detector, and the training images per
    second and fit wall time (s) its ``TrainingThroughput`` state records (NaN without one)."""
    content = read_checkpoint(checkpoint)
    trained = read_trained(content, checkpoint)
    model = trained.build()
    throughput = TrainingThroughput()
    state = content.get("callbacks", {}).get(throughput.state_key)
    if state is not None:
        throughput.load_state_dict(state)
    return {
        "params": sum(parameter.numel() for parameter in model.parameters()),
        "gflops": giga_flops(model, trained.image_size) if trained.image_size else float("nan"),
        "images_per_second": throughput.images_per_second,
        "fit_seconds": throughput.fit_seconds if state is not None else float("nan"),
    }


def execute(ablation: Ablation, run: Run) -> dict[str, Any]:
    """Fit (or finish) and validate a run; write and return its result (``result.json``), whose
    ``checkpoint`` is relative to the ablation's folder."""
    fit(ablation, run)
    result = {
        "variant": run.variant.name,
        "seed": run.seed,
        "checkpoint": str(run.last_checkpoint.relative_to(ablation.output)),
        **validate(ablation, run),
        **cost(run.last_checkpoint),
    }
    temporary = run.result_file.with_suffix(".json.partial")
    temporary.write_text(json.dumps(result, indent=1) + "\n")
    temporary.replace(run.result_file)
    return result
