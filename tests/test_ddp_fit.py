"""DDP trains like one process: 2 CPU processes (gloo) of batch 4 with ``sync_batchnorm`` end a fit with the
weights (raw and EMA, parameters and buffers) and validation metrics of 1 process of batch 8, launched as
2 devices on one machine, as 2 nodes through scripts/torchrun_train.sh, and as 2 nodes under SLURM.

The fit: 8 training images (one batch of 8, or one of 4 per process, is the whole epoch, so both see the same
images in every step whatever the sampler), mosaic (partners from groups of 4), mixup, copy-paste and
multi-scale on and the rest of the augmentation off, nominal batch 32 (4 batches summed per optimizer step, no
warmup), 12 epochs = 3 optimizer steps, validation in rect batches (7 images: one batch of 7, or two slices of
4, the second padded with a repeat), no gradient clipping (which would hide a wrong loss scale), from a
checkpoint whose target scores exceed 1 (so that normalising the loss per process would show). In float64
(precision 64-true), so that the comparison measures the algebra (loss scale by world size, loss normalisation
over processes, weight decay and accumulation for the total batch, synchronised BatchNorm), not float32
rounding: in float32 the same runs differ by ~1e-7 in parameters but up to ~2e-4 in BatchNorm running
variances of magnitude ~150 (relative 1e-6).
"""

import os
import sys
from pathlib import Path

import pytest
import yaml
from detector_checkpoint import STA, write_scoring_checkpoint
from distributed_helpers import (
    free_port,
    logger_arg,
    read_metrics,
    run_together,
    weight_differences,
)

from sta_lightning.cli import main
from sta_lightning.data import DemoDataModule

REPO_ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
TIMEOUT_S = 300
NUM_TRAIN, NUM_VAL = 8, 7  # 7: the distributed sampler pads rank 1 with a repeated validation image


@pytest.fixture(scope="module")
def fit_config(tmp_path_factory) -> Path:
    """The fit's config file (all but the batch size, the layout and the output folders)."""
    root = tmp_path_factory.mktemp("ddp_fit")
    DemoDataModule(root=str(root / "demo"), num_train=NUM_TRAIN, num_val=NUM_VAL).prepare_data()
    # Geometry and colour off; mosaic and mixup on, drawn per sample from (seed, epoch, index) like the rest.
    augmentation = ("degrees", "translate", "scale", "hsv_h", "hsv_s", "hsv_v", "fliplr")
    recipe = {**dict.fromkeys(augmentation, 0.0), "mosaic": 1.0, "mixup": 1.0, "close_mosaic": 0}
    recipe["multi_scale"] = True
    recipe["copy_paste"] = 0.5
    recipe["mosaic_group"] = 4  # mosaic partners from groups of 4 consecutive images of the epoch's order
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "precision": "64-true",
            "sync_batchnorm": True,
            "max_epochs": 12,
            "check_val_every_n_epoch": 12,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "detector": {"sta": STA, "pretrained": str(write_scoring_checkpoint(root / "start.ckpt"))},
            "optimizer": {"nominal_batch_size": 32},
            "warmup": {"epochs": 0},
            "step": {"gradient_clip_norm": 0.0},
        },
        "data": {
            "class_path": "sta_lightning.data.DemoDataModule",
            "init_args": {
                "root": str(root / "demo"),
                "num_train": NUM_TRAIN,
                "num_val": NUM_VAL,
                "image_size": 64,
                "loader": {"num_workers": 0, "rect": True},  # validation in rect batches of 8 images
                "augment": recipe,
            },
        },
    }
    path = root / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_args(out: Path, batch_size: int) -> list[str]:
    """The per-run arguments: batch size, and checkpoints, logs and config under ``out``."""
    return [f"--data.loader.batch_size={batch_size}", f"--trainer.default_root_dir={out}", logger_arg(out)]


@pytest.fixture(scope="module")
def one_process(fit_config) -> Path:
    """Where the 1-process fit of batch 8 wrote its logs and checkpoints."""
    out = fit_config.parent / "one"
    main(["fit", f"--config={fit_config}", *run_args(out, batch_size=8), "--trainer.devices=1"])
    return out


def environment(**extra: str) -> dict[str, str]:
    """This environment, one thread per process, the project's python first on PATH (torchrun), no cluster
    variables inherited from a surrounding job, plus ``extra``."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**inherited, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "PATH": path, **extra}


def assert_two_ranks(results: list) -> None:
    """Every process succeeded, and Lightning's rank lines show one world of 2 (not 2 worlds of 1)."""
    for finished in results:
        assert finished.returncode == 0, finished.stderr[-3000:]
    output = "".join(finished.stdout + finished.stderr for finished in results)
    assert "MEMBER: 1/2" in output and "MEMBER: 2/2" in output, output[-3000:]


def assert_fits_like_one_process(out: Path, one_process: Path) -> None:
    differences = weight_differences(next(out.rglob("last.ckpt")), next(one_process.rglob("last.ckpt")))
    print(f"max |two processes - one process|: {differences}")
    assert max(differences.values()) < TOLERANCE, differences
    metrics = read_metrics(out)
    assert metrics == read_metrics(one_process) and metrics["val/mAR100"] > 0


@pytest.mark.slow
def test_two_processes_fit_like_one(fit_config, one_process):
    out = fit_config.parent / "two"
    command = [sys.executable, "-m", "sta_lightning", "fit", f"--config={fit_config}", *run_args(out, 4)]
    command += ["--trainer.devices=2", "--trainer.strategy=ddp"]
    assert_two_ranks(run_together([command], fit_config.parent, [environment()], TIMEOUT_S))
    assert_fits_like_one_process(out, one_process)


@pytest.mark.slow
def test_two_nodes_through_torchrun_fit_like_one(fit_config, one_process):
    # The script run twice, as it would be on two machines: torchrun's c10d rendezvous pairs them.
    out = fit_config.parent / "torchrun"
    node = environment(
        NNODES="2", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", ACCELERATOR="cpu", GPUS_PER_NODE="1"
    )
    command = ["bash", str(REPO_ROOT / "scripts" / "torchrun_train.sh"), str(fit_config), *run_args(out, 4)]
    assert_two_ranks(run_together([command, command], fit_config.parent, [node, node], TIMEOUT_S))
    assert_fits_like_one_process(out, one_process)


@pytest.mark.slow
def test_two_nodes_under_slurm_fit_like_one(fit_config, one_process):
    # What srun gives each task of `sbatch --nodes=2 --ntasks-per-node=1` (scripts/slurm_train.sh passes
    # --trainer.devices SLURM_NTASKS_PER_NODE and --trainer.num_nodes SLURM_NNODES); Lightning's
    # SLURMEnvironment takes the ranks from it, the address from the node list and the port from MASTER_PORT.
    out = fit_config.parent / "slurm"
    job = dict(
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="sta-lightning",  # "bash" or "interactive" would make Lightning ignore SLURM
        SLURM_NTASKS="2",
        SLURM_NNODES="2",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_NODELIST="127.0.0.1",
        SLURM_LOCALID="0",
        MASTER_PORT=str(free_port()),
    )
    command = [sys.executable, "-m", "sta_lightning", "fit", f"--config={fit_config}", *run_args(out, 4)]
    command += ["--trainer.devices=1", "--trainer.num_nodes=2", "--trainer.strategy=ddp"]
    tasks = [environment(**job, SLURM_PROCID=str(rank), SLURM_NODEID=str(rank)) for rank in (0, 1)]
    assert_two_ranks(run_together([command, command], fit_config.parent, tasks, TIMEOUT_S))
    assert_fits_like_one_process(out, one_process)
