"""``validate`` and ``predict`` on 2 CPU processes (DDP, gloo) give the results of 1 process."""

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


def test_two_process_predict_writes_what_one_process_writes(checkpoint):
    # 7 images on 2 ranks: the sampler repeats one on rank 1; rank 0 gathers and writes each image once.
    root = checkpoint.parent
    images = json.dumps(sorted(str(p) for p in (root / "demo" / "val").glob("*.jpg")))
    common = [f"--ckpt_path={checkpoint}", "--data=sta_lightning.data.COCODataModule"]
    common += [f"--data.predict_images={images}", "--data.image_size=128", "--data.batch_size=2"]
    common += ["--data.num_workers=0", "--trainer.accelerator=cpu", "--trainer.logger=false"]
    common += ["--trainer.enable_progress_bar=false", "--model.predict_conf_threshold=0.01"]
    common += [f"--trainer.default_root_dir={root / 'predict_run'}"]  # where the CLI saves its config.yaml
    main(["predict", *common, "--trainer.devices=1", f"--prediction.output_dir={root / 'predict_one'}"])

    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sta_lightning", "predict", *common, "--trainer.devices=2"]
    command += ["--trainer.strategy=ddp", f"--prediction.output_dir={root / 'predict_two'}"]
    finished = subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]

    def written(name: str) -> tuple[object, object]:
        return tuple(json.loads((root / f / name).read_text()) for f in ("predict_one", "predict_two"))

    single, double = written("images.json")
    assert double == single and len(single["images"]) == NUM_VAL
    # Same detections; the ranks batch the images differently, which moves boxes by float rounding only.
    single, double = written("predictions.json")
    assert len(single) > 0 and len(double) == len(single)
    unmatched = list(double)
    for one in single:  # near-equal scores may come out in another order: match each detection
        match = next(
            two
            for two in unmatched
            if (two["image_id"], two["category_id"]) == (one["image_id"], one["category_id"])
            and two["bbox"] == pytest.approx(one["bbox"], abs=0.05)
            and two["score"] == pytest.approx(one["score"], abs=1e-4)
        )
        unmatched.remove(match)
