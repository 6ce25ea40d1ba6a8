"""Experiment tracking under real DDP: 2 CPU processes (gloo) fit and validate through the CLI with the
offline W&B logger and the tracking callbacks: one W&B run, images and plots logged once (by rank 0), the CLI
config in it."""

import json
import os
import sys
import textwrap
from pathlib import Path

import yaml
from distributed_helpers import run_together

from sta_lightning.data import DemoDataModule

BLOCKS = ("sta.layer4.0", "sta.layer6.0")
NUM_SHOWN = 2

# Run as a script because Lightning's DDP launcher starts rank 1 by running the same command line again.
SCRIPT = """
import json, sys
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from sta_lightning.cli import main

config, out = sys.argv[1], Path(sys.argv[2])
cli = main(["fit", "--config", config])
fit_map = cli.model.evaluation.metrics["map"]
cli.trainer.validate(cli.model, cli.datamodule)
experiment = cli.trainer.logger.experiment
result = {"experiment": type(experiment).__name__, "maps": [fit_map, cli.model.evaluation.metrics["map"]]}
if cli.trainer.is_global_zero:
    result["config"] = dict(experiment.config)
    result["best_map"] = experiment.summary["best/mAP"]
    result["run_dir"] = str(Path(experiment.dir).parent)
# Without an image logger the callbacks write PNG files on rank 0: a collective there would hang this.
cli.trainer.loggers = [CSVLogger(out / "csv")]
cli.trainer.validate(cli.model, cli.datamodule)
(out / f"rank{cli.trainer.global_rank}.json").write_text(json.dumps(result))
"""


def test_two_process_ddp_fit_and_validate_log_one_run(tmp_path):
    DemoDataModule(root=str(tmp_path / "demo"), num_train=8, num_val=5).prepare_data()
    config = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "strategy": "ddp",
            "max_epochs": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
            "logger": {
                "class_path": "sta_lightning.plugins.loggers.OfflineFallbackWandbLogger",
                "init_args": {
                    "project": "sta-ddp",
                    "group": "ddp-test",
                    "tags": ["ddp"],
                    "save_dir": str(tmp_path),
                },
            },
            "callbacks": [
                {
                    "class_path": "sta_lightning.callbacks.AttentionMapsCallback",
                    "init_args": {"num_images": NUM_SHOWN},
                },
                {
                    "class_path": "sta_lightning.callbacks.PredictionImagesCallback",
                    "init_args": {"num_images": NUM_SHOWN, "conf_threshold": 0.0, "max_det": 10},
                },
                {"class_path": "sta_lightning.callbacks.COCOMetricTableCallback"},
                {"class_path": "sta_lightning.callbacks.EvaluationPlotsCallback"},
                {"class_path": "sta_lightning.callbacks.DatasetStatisticsCallback"},
            ],
        },
        "model": {
            "detector": {"sta": [{"layer": 4, "stoken_size": [4, 4]}, {"layer": 6, "stoken_size": [2, 2]}]},
            "optimizer": {"nominal_batch_size": 4},
            "warmup": {"epochs": 0},
        },
        "data": {
            "class_path": "sta_lightning.data.DemoDataModule",
            # 5 validation images over 2 ranks: the sampler pads rank 1 with a repeat
            "init_args": {
                "root": str(tmp_path / "demo"),
                "num_train": 8,
                "num_val": 5,
                "image_size": 96,
                "loader": {"batch_size": 2, "num_workers": 0},
                "augment": {"mosaic": 0.0},
            },
        },
    }
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    script = tmp_path / "ddp_tracking.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    # Own process group, so that a hang kills both ranks (rank 1 is rank 0's child).
    command = [sys.executable, str(script), str(config_file), str(tmp_path)]
    (finished,) = run_together([command], tmp_path, [env], timeout=300)
    stdout, stderr = finished.stdout, finished.stderr
    assert finished.returncode == 0, stdout[-3000:] + stderr[-5000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())

    # one run, created by rank 0 only
    assert rank0["experiment"] == "Run" and rank1["experiment"] != "Run"
    runs = sorted(path.name for path in (tmp_path / "wandb").glob("*run-*"))
    assert runs == [Path(rank0["run_dir"]).name] and runs[0].startswith("offline-run-")
    assert "wandb sync " + rank0["run_dir"] in stdout + stderr

    # fit's validation and validate each logged the sample images once (rank 0), never per rank
    media = Path(rank0["run_dir"]) / "files" / "media"
    for block in BLOCKS:
        assert len(list((media / "images" / "val" / "attention").glob(f"{block}_*.png"))) == 2 * NUM_SHOWN
    assert len(list((media / "images" / "val").glob("predictions_*.png"))) == 2 * NUM_SHOWN
    assert len(list((media / "table" / "val").glob("coco_[0-9]*.table.json"))) == 2
    assert len(list((media / "table" / "val").glob("pr_curve_iou50_table_*.table.json"))) == 2
    assert len(list((media / "table" / "data").glob("summary_*.table.json"))) == 1  # at the fit's start
    pngs = sorted(path.relative_to(tmp_path / "csv") for path in (tmp_path / "csv").rglob("images/**/*.png"))
    assert len(pngs) == NUM_SHOWN * (len(BLOCKS) + 1), pngs
    plots = {path.name for path in (tmp_path / "csv").rglob("plots/val/*.png")}
    assert {"pr_curve_iou50.png", "f1_curve.png", "confusion_matrix.png", "ap_per_class.png"} <= plots

    # every rank evaluated the same metrics; the best is in the run summary
    assert rank0["maps"] == rank1["maps"]
    assert rank0["best_map"] == max(rank0["maps"])

    # the resolved CLI config is the W&B run config
    run_config = rank0["config"]
    assert run_config["trainer"]["strategy"] == "ddp" and run_config["trainer"]["devices"] == 2
    assert run_config["data"]["init_args"]["image_size"] == 96
    assert [placement["layer"] for placement in run_config["model"]["detector"]["sta"]] == [4, 6]
