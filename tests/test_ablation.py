"""``python -m sta_lightning ablate``: paired intervals equal scipy's; a plan is kept and refused when it
changes; the cluster commands; and a real ablation on the demo shapes, killed with SIGKILL in the middle of a
run and rerun, whose results equal what ``validate`` computes for each run's checkpoint."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from detector_checkpoint import write_scoring_checkpoint
from scipy import stats

from sta_lightning.ablation import Ablation, Variant, paired_difference
from sta_lightning.ablation.cli import main as ablate
from sta_lightning.ablation.execution import METRICS, run_config
from sta_lightning.ablation.plan import WandbSettings
from sta_lightning.ablation.statistics import verdict
from sta_lightning.cli import main as cli_main
from sta_lightning.data import DemoDataModule

TESTS_DIR = Path(__file__).resolve().parent


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_paired_intervals_equal_scipy(n):
    rng = np.random.default_rng(n)
    baseline = rng.uniform(0.4, 0.6, n)
    variant = baseline + rng.normal(0.01, 0.02, n)
    diff = paired_difference(list(variant), list(baseline), confidence=0.9, resamples=10_000, seed=3)
    t = stats.ttest_rel(variant, baseline).confidence_interval(0.9)
    boot = stats.bootstrap(
        (variant - baseline,),
        np.mean,
        n_resamples=10_000,
        confidence_level=0.9,
        method="percentile",
        rng=np.random.default_rng(3),
    ).confidence_interval
    assert diff.n == n
    assert diff.mean == pytest.approx(float(np.mean(variant - baseline)), abs=1e-15)
    assert (diff.t_low, diff.t_high) == pytest.approx((t.low, t.high), rel=1e-12)
    assert (diff.boot_low, diff.boot_high) == pytest.approx((boot.low, boot.high), rel=1e-12)


def test_the_verdict_needs_both_intervals_clear_of_zero():
    assert verdict([(0.01, 0.03), (0.002, 0.02)]) == "better"
    assert verdict([(-0.03, -0.01), (-0.02, -0.001)]) == "worse"
    assert verdict([(-0.001, 0.03), (0.002, 0.02)]) == "no difference shown"
    one = paired_difference([0.52], [0.5])  # one pair: no t interval, no verdict
    assert np.isnan(one.t_low) and one.boot_low == one.boot_high == pytest.approx(0.02)
    assert one.verdict == "no difference shown"
    with pytest.raises(ValueError, match="equal, non-zero lengths"):
        paired_difference([0.5, 0.6], [0.5])


def test_bad_plans_are_refused_with_the_value(tmp_path):
    with pytest.raises(ValueError, match="NAME=PATH"):
        Variant.parse("plain")
    with pytest.raises(ValueError, match="missing.yaml does not exist"):
        Variant.parse("sta=missing.yaml")
    variants = (Variant("a"), Variant("b"))
    with pytest.raises(ValueError, match="--baseline 'c' is not one of the variants"):
        Ablation("x", ("base.yaml",), variants, "c", (0, 1), tmp_path)
    with pytest.raises(ValueError, match="variant names must differ"):
        Ablation("x", ("base.yaml",), (Variant("a"), Variant("a")), "a", (0,), tmp_path)
    with pytest.raises(ValueError, match="--seeds must be distinct"):
        Ablation("x", ("base.yaml",), variants, "a", (0, 0), tmp_path)


def test_a_changed_plan_for_the_same_folder_is_refused(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text("seed_everything: 0\n")
    output = tmp_path / "out"
    common = ["--config", str(base), "--variant", "a=", "--output", str(output), "--emit"]
    ablate([*common, "--seeds", "0", "1", "--", "--trainer.max_epochs=2"])
    saved = json.loads((output / "ablation.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["overrides"] == ["--trainer.max_epochs=2"]
    with pytest.raises(SystemExit):
        ablate([*common, "--seeds", "0", "1", "2", "--", "--trainer.max_epochs=3"])
    assert "differs in seeds, overrides" in capsys.readouterr().err
    ablate(["--output", str(output), "--emit"])  # the folder alone continues the saved plan
    with pytest.raises(SystemExit):
        ablate(["--output", str(output), "--run", "a:9"])
    assert "--run 'a:9' is none of this ablation's runs: ['a:0', 'a:1']" in capsys.readouterr().err


def test_emit_writes_a_command_per_run_and_a_slurm_array(tmp_path):
    base, variant = tmp_path / "base.yaml", tmp_path / "plain.yaml"
    base.write_text("seed_everything: 0\n")
    variant.write_text("model:\n  detector:\n    sta: null\n")
    output = tmp_path / "out"
    arguments = [
        "--config",
        str(base),
        "--variant",
        f"plain={variant}",
        "--variant",
        "sta=",
        "--baseline",
        "plain",
    ]
    ablate([*arguments, "--seeds", "0", "1", "2", "--output", str(output), "--emit", "--slurm=--gres=gpu:1"])
    commands = (output / "commands.txt").read_text().splitlines()
    assert [command.rsplit(" ", 1)[1] for command in commands] == [
        f"{name}:{seed}" for seed in (0, 1, 2) for name in ("plain", "sta")
    ]
    assert all(f"--output {output.resolve()} --run" in command for command in commands)
    script = (output / "ablation.sbatch").read_text()
    assert "#SBATCH --array=0-5" in script and "#SBATCH --gres=gpu:1" in script
    assert str((output / "commands.txt").resolve()) in script


def test_each_run_logs_to_its_folder_and_the_ablation_s_wandb_group(tmp_path):
    ablation = Ablation(
        "demo-ablation", ("b.yaml",), (Variant("a"),), "a", (4,), tmp_path, (), WandbSettings()
    )
    (run,) = ablation.runs()
    config = run_config(ablation, run)
    assert config["seed_everything"] == 4
    assert config["checkpoint"]["dirpath"] == str(tmp_path / "runs" / "a" / "seed-4" / "checkpoints")
    csv_logger, wandb_logger = config["trainer"]["logger"]
    assert csv_logger["init_args"]["save_dir"] == str(run.folder)
    assert wandb_logger["init_args"]["group"] == "demo-ablation"
    assert wandb_logger["init_args"]["tags"] == ["variant:a", "seed:4"]
    no_wandb = Ablation(
        "x", ("b.yaml",), (Variant("a"),), "a", (4,), tmp_path, (), WandbSettings(project=None)
    )
    assert len(run_config(no_wandb, no_wandb.runs()[0])["trainer"]["logger"]) == 1


def write_configs(root: Path) -> tuple[Path, Path]:
    """A 2-epoch fit of 8 demo images at 64 px that starts from detectors that score (so that the metrics
    are not all 0), with a SIGKILL armed by the absence of ``root/disarmed``; and the plain variant."""
    demo = root / "demo"
    DemoDataModule(root=str(demo), num_train=8, num_val=7).prepare_data()
    write_scoring_checkpoint(root / "sta.ckpt", image_size=64)
    write_scoring_checkpoint(root / "plain.ckpt", image_size=64, sta=None)
    kill = {"epoch": 1, "batch": 0, "marker": str(root / "disarmed")}
    base = {
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 3,  # overridden to 2
            "check_val_every_n_epoch": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [{"class_path": "fault_injection.KillOnce", "init_args": kill}],
        },
        "model": {
            "detector": {
                "sta": [{"layer": 8, "stoken_size": [1, 1], "num_heads": 2}],
                "pretrained": str(root / "sta.ckpt"),
            },
            "optimizer": {"name": "AdamW", "lr0": 1.0e-5, "nominal_batch_size": 4},
            "warmup": {"epochs": 1, "min_iterations": 0},
        },
        "data": {
            "class_path": "sta_lightning.data.DemoDataModule",
            "init_args": {
                "root": str(demo),
                "num_train": 8,
                "num_val": 7,
                "image_size": 64,
                "loader": {"batch_size": 4, "num_workers": 0},
            },
        },
    }
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    (root / "plain.yaml").write_text(
        yaml.safe_dump({"model": {"detector": {"sta": None, "pretrained": str(root / "plain.ckpt")}}})
    )
    return root / "base.yaml", root / "plain.yaml"


def run_ablate(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m sta_lightning ablate`` in a process group of its own (a SIGKILL of a fit kills it too)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    environment.pop("WANDB_SERVICE", None)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), environment.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "sta_lightning", "ablate", *arguments]
    return subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, start_new_session=True, timeout=900
    )


@pytest.mark.slow
def test_a_killed_ablation_completes_on_rerun_with_the_results_validate_computes(tmp_path):
    base, plain = write_configs(tmp_path)
    output = tmp_path / "ablation"
    (tmp_path / "disarmed").touch()
    arguments = [
        "--config",
        str(base),
        "--variant",
        f"plain={plain}",
        "--variant",
        "sta=",
        "--seeds",
        "0",
        "1",
    ]
    run_ablate([*arguments, "--output", str(output), "--emit", "--", "--trainer.max_epochs=2"], tmp_path)
    # A cluster task: the first line of commands.txt fits and validates plain at seed 0.
    first = (output / "commands.txt").read_text().splitlines()[0]
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
    }
    subprocess.run(["bash", "-c", first], env=environment, check=True, capture_output=True, timeout=600)
    finished = output / "runs" / "plain" / "seed-0" / "result.json"
    first_result = finished.read_text()
    first_written = finished.stat().st_mtime_ns

    (tmp_path / "disarmed").unlink()  # armed: the next fit dies at the start of its second epoch
    killed = run_ablate(["--output", str(output)], tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "plain:0: finished earlier, skipped" in killed.stdout
    sta_0 = output / "runs" / "sta" / "seed-0"
    assert (sta_0 / "checkpoints" / "last.ckpt").is_file() and not (sta_0 / "result.json").exists()

    rerun = run_ablate(["--output", str(output)], tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "plain:0: finished earlier, skipped" in rerun.stdout
    assert "sta:0: resuming from" in rerun.stdout
    assert finished.stat().st_mtime_ns == first_written and finished.read_text() == first_result
    resumed = torch.load(sta_0 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["epoch"] == 1
    assert (
        resumed["callbacks"]["TrainingThroughput"]["images"] == 16
    )  # 8 images x 2 epochs, over two attempts

    with open(output / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["variant"], row["seed"]) for row in rows] == [
        ("plain", "0"),
        ("plain", "1"),
        ("sta", "0"),
        ("sta", "1"),
    ]
    assert any(float(row[name]) > 0 for row in rows for name in METRICS)
    variant_configs = {"plain": ["--config", str(plain)], "sta": []}
    for row in rows:
        validated = cli_main(
            [
                "validate",
                "--config",
                str(base),
                *variant_configs[row["variant"]],
                f"--ckpt_path={output / row['checkpoint']}",
                "--trainer.logger=false",
                "--trainer.callbacks=[]",
            ]
        ).trainer.callback_metrics
        assert {name: float(row[name]) for name in METRICS} == {
            name: float(validated[f"val/{name}"]) for name in METRICS
        }
        assert (
            float(row["gflops"]) > 0 and float(row["images_per_second"]) > 0 and float(row["fit_seconds"]) > 0
        )
    params = {row["variant"]: int(row["params"]) for row in rows}
    assert params["sta"] > params["plain"]

    summary = json.loads((output / "summary.json").read_text())
    assert summary["variants"]["plain"]["n"] == 2 and "paired_diff" not in summary["variants"]["plain"]
    by_run = {(row["variant"], int(row["seed"])): float(row["mAP"]) for row in rows}
    expected = paired_difference([by_run["sta", s] for s in (0, 1)], [by_run["plain", s] for s in (0, 1)])
    assert summary["variants"]["sta"]["paired_diff"]["mAP"] == pytest.approx(expected.as_dict(), nan_ok=True)
    assert (output / "summary.md").read_text().count("| sta | mAP | 2 |") == 1
    assert (output / "summary.png").stat().st_size > 0
    for key in ("plain/seed-0", "plain/seed-1", "sta/seed-0", "sta/seed-1"):
        assert list((output / "runs" / key / "wandb").glob("offline-run-*")), key
    assert list((output / "wandb").glob("offline-run-*"))  # the summary run
