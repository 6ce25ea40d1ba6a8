"""``validate`` and ``predict`` on 2 CPU processes (DDP, gloo) give the results of 1 process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from detector_checkpoint import write_scoring_checkpoint
from distributed_helpers import logger_arg, read_metrics

from sta_lightning.cli import main
from sta_lightning.data import DemoDataModule

NUM_VAL = 7  # odd: the distributed sampler pads rank 1 with a repeated image, which must count once


def data_args(root: Path) -> list[str]:
    return [
        "--data=sta_lightning.data.DemoDataModule",
        f"--data.root={root}",
        "--data.num_train=4",
        f"--data.num_val={NUM_VAL}",
        "--data.image_size=128",
        "--data.loader.batch_size=2",
        "--data.loader.num_workers=0",
    ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A detector checkpoint whose detections score (``write_scoring_checkpoint``) beside a demo dataset of 4
    training and NUM_VAL validation images."""
    root = tmp_path_factory.mktemp("ddp")
    DemoDataModule(root=str(root / "demo"), num_train=4, num_val=NUM_VAL).prepare_data()
    return write_scoring_checkpoint(root / "model.ckpt")


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
    common += [f"--data.predict.images={images}", "--data.image_size=128", "--data.loader.batch_size=2"]
    common += ["--data.loader.num_workers=0", "--trainer.accelerator=cpu", "--trainer.logger=false"]
    common += ["--trainer.enable_progress_bar=false", "--model.predict_nms.conf_threshold=0.01"]
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
