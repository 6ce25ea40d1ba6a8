"""Exact resume after a real SIGKILL: a fit killed at any point after its first checkpoint and resumed from
``last.ckpt`` (or, under SLURM, requeued and resumed from its ``hpc_ckpt``) ends with the weights, optimizer
state and metrics of the uninterrupted fit, bit for bit, on 1 process and on 2 DDP processes.

The fits have mosaic (partners from groups of 2 images, which the dataset keeps decoded), mixup, copy-paste
and multi-scale on, the close_mosaic switch after the kill, drop path in the STA block (the model draws from
torch's generator), a warmup that ramps the accumulation and an accumulation open at epoch ends.
"""

import csv
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import run_together

from sta_lightning.data import DemoDataModule

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
EPOCHS = 4


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume") / "demo"
    DemoDataModule(root=str(root), num_train=12, num_val=4).prepare_data()
    return root


def fit_command(demo_root: Path, run_dir: Path, *extra: str, wandb: bool = False) -> list[str]:
    """A 4-epoch fit of 12 images in batches of 4 (3 per epoch), validated and checkpointed every epoch."""
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir)}}]
    if wandb:
        loggers.append(
            {
                "class_path": "sta_lightning.plugins.loggers.OfflineFallbackWandbLogger",
                "init_args": {"project": "resume-test", "offline": True, "save_dir": str(run_dir)},
            }
        )
    return [
        sys.executable,
        "-m",
        "sta_lightning",
        "fit",
        "--trainer.accelerator=cpu",
        f"--trainer.max_epochs={EPOCHS}",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger={json.dumps(loggers)}",
        f"--checkpoint.dirpath={run_dir / 'checkpoints'}",
        "--model.detector.sta=[{layer: 8, stoken_size: [1, 1], num_heads: 2, drop_path: 0.3}]",
        "--model.optimizer.name=AdamW",
        "--model.optimizer.lr0=0.002",
        "--model.optimizer.momentum=0.9",
        "--model.optimizer.nominal_batch_size=8",
        "--model.warmup.epochs=1",
        "--model.warmup.min_iterations=0",
        "--model.ema.tau=5",
        "--data=sta_lightning.data.DemoDataModule",
        f"--data.root={demo_root}",
        "--data.num_train=12",
        "--data.num_val=4",
        "--data.image_size=64",
        "--data.loader.batch_size=4",
        "--data.loader.num_workers=0",
        "--data.augment.close_mosaic=1",
        "--data.augment.mixup=0.5",
        "--data.augment.copy_paste=0.5",
        "--data.augment.multi_scale=true",
        "--data.augment.mosaic_group=2",
        *extra,
    ]


def run(command: list[str], cwd: Path, killed: bool = False, env: dict | None = None) -> None:
    """Run a fit in its own process group; it must finish, or (``killed``) die of SIGKILL."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    # A W&B service that this test process started would serve the fits too, and would still hold the run
    # of a killed fit; each fit starts its own, as separate jobs do.
    environment.pop("WANDB_SERVICE", None)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), environment.get("PYTHONPATH")]))
    cwd.mkdir(parents=True, exist_ok=True)
    (finished,) = run_together([command], cwd, [environment], timeout=900)
    expected = -signal.SIGKILL if killed else 0
    assert finished.returncode == expected, finished.stderr[-4000:]


def callback(name: str, **init_args) -> str:
    injected = {"class_path": f"fault_injection.{name}", "init_args": init_args}
    return "--trainer.callbacks+=" + json.dumps(injected)


def final_val_metrics(run_dir: Path) -> dict[str, float]:
    """The last epoch's val/* metrics of the newest CSV log in ``run_dir``."""
    newest = max(run_dir.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    with open(newest) as file:
        rows = [r for r in csv.DictReader(file) if r.get("val/mAP") and int(r["epoch"]) == EPOCHS - 1]
    assert len(rows) == 1, newest
    return {key: float(value) for key, value in rows[0].items() if key.startswith("val/")}


def assert_same_training_state(expected: Path, resumed: Path) -> None:
    a = torch.load(expected, map_location="cpu", weights_only=True)
    b = torch.load(resumed, map_location="cpu", weights_only=True)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (EPOCHS - 1, a["global_step"])
    for key in ("state_dict", "current_model_state"):  # EMA weights, raw weights
        assert a[key].keys() == b[key].keys()
        different = [name for name in a[key] if not torch.equal(a[key][name], b[key][name])]
        assert not different, (key, different[:5])
    for optimizer_a, optimizer_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert optimizer_a["param_groups"] == optimizer_b["param_groups"]
        torch.testing.assert_close(optimizer_a["state"], optimizer_b["state"], rtol=0, atol=0)


@pytest.fixture(scope="module")
def uninterrupted(demo_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run(fit_command(demo_root, run_dir), cwd=run_dir)
    return run_dir


@pytest.mark.parametrize(
    ("kill", "extra"),
    [
        pytest.param(dict(epoch=2, batch=1), [], id="mid-epoch-after-an-epoch-checkpoint"),
        pytest.param(dict(epoch=2, batch=0, stage="validation"), [], id="during-validation"),
        pytest.param(
            dict(epoch=2, batch=2),
            ["--checkpoint.every_n_train_steps=1", "--data.loader.num_workers=2"],
            id="mid-epoch-from-a-step-checkpoint-with-workers",
        ),
    ],
)
def test_a_killed_fit_resumed_from_last_ckpt_ends_as_the_uninterrupted_one(
    demo_root, uninterrupted, tmp_path, kill, extra
):
    command = fit_command(demo_root, tmp_path, *extra)
    run([*command, callback("KillAt", **kill)], cwd=tmp_path, killed=True)
    last = tmp_path / "checkpoints" / "last.ckpt"
    killed_state = torch.load(last, map_location="cpu", weights_only=True)
    if "--checkpoint.every_n_train_steps=1" in extra:  # saved inside epoch 2, after its optimizer step
        batches_done = killed_state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"]
        assert killed_state["epoch"] == 2 and 0 < batches_done < 3
    else:
        assert killed_state["epoch"] == 1
    run([*command, f"--ckpt_path={last}"], cwd=tmp_path)
    assert_same_training_state(uninterrupted / "checkpoints" / "last.ckpt", last)
    assert final_val_metrics(tmp_path) == final_val_metrics(uninterrupted)


def test_slurm_requeue_resumes_at_the_next_batch_and_continues_the_wandb_run(
    demo_root, uninterrupted, tmp_path
):
    # SLURM's warning signal arrives in epoch 2; the fit saves hpc_ckpt_1.ckpt at the end of that batch and
    # calls `scontrol requeue`, which (here a stand-in) kills the job as SLURM does. The same command, started
    # again in the same job, resumes from the hpc checkpoint.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$REQUEUE_LOG"\nkill -KILL 0\n')
    scontrol.chmod(0o755)
    slurm = {
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODELIST": "localhost",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "sta-lightning",
        "REQUEUE_LOG": str(tmp_path / "requeue.log"),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    command = fit_command(demo_root, tmp_path / "run", wandb=True)
    run([*command, callback("SignalAt", epoch=2, batch=1)], cwd=tmp_path / "run", killed=True, env=slurm)
    assert (tmp_path / "requeue.log").read_text().split() == ["requeue", "4242"]
    hpc = torch.load(tmp_path / "run" / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert hpc["epoch"] == 2
    assert hpc["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 2  # batches 0, 1

    run(command, cwd=tmp_path / "run", env=slurm)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert_same_training_state(uninterrupted / "checkpoints" / "last.ckpt", last)
    assert final_val_metrics(tmp_path / "run") == final_val_metrics(uninterrupted)
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith("-slurm-4242") for r in runs)


def test_two_process_ddp_fit_resumes_exactly(demo_root, tmp_path):
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp", "--data.loader.batch_size=2"]
    run(fit_command(demo_root, tmp_path / "uninterrupted", *ddp), cwd=tmp_path / "uninterrupted")
    command = fit_command(demo_root, tmp_path / "killed", *ddp)
    run([*command, callback("KillAt", epoch=2, batch=1)], cwd=tmp_path / "killed", killed=True)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    run([*command, f"--ckpt_path={last}"], cwd=tmp_path / "killed")
    assert_same_training_state(tmp_path / "uninterrupted" / "checkpoints" / "last.ckpt", last)
    assert final_val_metrics(tmp_path / "killed") == final_val_metrics(tmp_path / "uninterrupted")
