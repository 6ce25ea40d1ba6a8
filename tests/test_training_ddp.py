"""``validate`` on 2 CPU processes (DDP, gloo) gives the metrics of 1 process."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from torch import nn

from sta_lightning.cli import main
from sta_lightning.data import DemoDataModule
from sta_lightning.training import DetectionModule

NUM_VAL = 7  # odd: the distributed sampler pads rank 1 with a repeated image, which must count once


def data_args(root: Path) -> list[str]:
    return [
        "--data=sta_lightning.data.DemoDataModule",
        f"--data.root={root}",
        "--data.num_train=4",
        f"--data.num_val={NUM_VAL}",
        "--data.image_size=128",
        "--data.batch_size=2",
        "--data.num_workers=0",
    ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of an untrained detector whose boxes and scores vary enough to overlap some of the shapes
    (nonzero metrics): He-initialised convolutions (the stock initialisation outputs little more than the head
    biases), box logits damped and biased towards short side distances (boxes of about 4 strides)."""
    root = tmp_path_factory.mktemp("ddp")
    DemoDataModule(root=str(root / "demo"), num_train=4, num_val=NUM_VAL).prepare_data()
    torch.manual_seed(0)
    module = DetectionModule(num_classes=5, sta=[{"layer": 8, "stoken_size": [1, 1], "num_heads": 2}])
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d) and layer.weight.requires_grad:
                nn.init.kaiming_normal_(layer.weight)
        for branch in module.model.head.box_branches:
            branch[-1].weight.mul_(0.1)
            branch[-1].bias.copy_((-0.7 * torch.arange(16.0)).repeat(4))
    path = root / "model.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    return path


def read_metrics(save_dir: Path) -> dict[str, float]:
    (metrics_file,) = save_dir.rglob("metrics.csv")
    with open(metrics_file) as file:
        (row,) = list(csv.DictReader(file))
    return {key: float(value) for key, value in row.items() if key.startswith("val/")}


def logger_arg(save_dir: Path) -> str:
    return "--trainer.logger=" + json.dumps(
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(save_dir)}}
    )


def test_two_process_validation_equals_one_process(checkpoint):
    root = checkpoint.parent
    common = [f"--ckpt_path={checkpoint}", *data_args(root / "demo"), "--trainer.accelerator=cpu"]
    common += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    main(["validate", *common, "--trainer.devices=1", logger_arg(root / "one")])
    single = read_metrics(root / "one")

    # A subprocess, so that Lightning can relaunch `python -m sta_lightning` for rank 1.
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sta_lightning", "validate", *common]
    command += ["--trainer.devices=2", "--trainer.strategy=ddp", logger_arg(root / "two")]
    finished = subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    double = read_metrics(root / "two")

    assert len(single) == 12 and single["val/mAR100"] > 0
    assert double == single
