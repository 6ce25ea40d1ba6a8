"""Non-finite training steps: a NaN or inf loss, or NaN gradients, are skipped with a warning (by every DDP
rank alike); too many in a row stop the fit with a clear error and leave the last good checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sta_lightning.checkpoint_file import read_checkpoint
from sta_lightning.cli import main
from sta_lightning.data import DemoDataModule
from sta_lightning.training.nonfinite import NonFiniteStepWarning, NonFiniteTrainingError

TESTS = Path(__file__).parent
# 8 images in batches of 4 = 2 iterations per epoch; nominal batch 8 = 2 batches per optimizer step (no
# warmup): an uninterrupted 2-epoch fit steps at iterations 1 and 3.
FIT_ARGS = [
    "--trainer.accelerator=cpu",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
    "--model.detector.sta=null",
    "--model.warmup.epochs=0",
    "--model.optimizer.nominal_batch_size=8",
    "--data=sta_lightning.data.DemoDataModule",
    "--data.num_train=8",
    "--data.num_val=4",
    "--data.image_size=64",
    "--data.loader.batch_size=4",
    "--data.loader.num_workers=0",
    "--checkpoint.save_top_k=-1",  # Lightning 2.6 rewrites last.ckpt only with a top-k checkpoint
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nonfinite") / "demo"
    DemoDataModule(root=str(root), num_train=8, num_val=4).prepare_data()
    return root


def fault(**init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps(
        {"class_path": "fault_injection.NonFiniteLoss", "init_args": init_args}
    )


def fit(demo: Path, run: Path, *arguments: str):
    return main(["fit", *FIT_ARGS, f"--data.root={demo}", f"--trainer.default_root_dir={run}", *arguments])


def all_finite(module: torch.nn.Module) -> bool:
    return all(
        torch.isfinite(tensor).all() for tensor in module.state_dict().values() if tensor.is_floating_point()
    )


def test_an_isolated_infinite_loss_is_skipped_and_does_not_count(demo, tmp_path):
    with pytest.warns(NonFiniteStepWarning, match=r"Non-finite loss at iteration 0 \(epoch 0"):
        cli = fit(demo, tmp_path, "--trainer.max_epochs=2", fault(iterations=[0], value="inf"))
    module = cli.trainer.lightning_module
    # Without the skipped batch 0 the accumulation restarts: one step, at iteration 2 (batches 1 and 2),
    # where counting batch 0 would have stepped at 1 and 3.
    assert cli.trainer.global_step == 1 and module.accumulation.last_optimizer_step == 2
    assert all_finite(module) and all_finite(module.ema)


def test_nan_gradients_drop_the_accumulation_and_skip_the_step(demo, tmp_path):
    with pytest.warns(NonFiniteStepWarning, match=r"Non-finite gradients at iteration 1 \(epoch 0"):
        cli = fit(demo, tmp_path, "--trainer.max_epochs=2", fault(iterations=[1], poison="gradients"))
    module = cli.trainer.lightning_module
    assert (
        cli.trainer.global_step == 1 and module.accumulation.last_optimizer_step == 3
    )  # the step at 1 was skipped
    assert all_finite(module) and all_finite(module.ema)


def test_persistent_nan_stops_the_fit_and_keeps_the_last_good_checkpoint(demo, tmp_path):
    nan_from_epoch_1 = fault(iterations=list(range(2, 6)))
    with pytest.raises(NonFiniteTrainingError, match=r"^2 training steps in a row .* loss at iteration 3 "):
        fit(demo, tmp_path, "--trainer.max_epochs=3", "--model.step.max_nonfinite_steps=2", nan_from_epoch_1)
    (checkpoints,) = tmp_path.rglob("checkpoints")
    assert sorted(p.name for p in checkpoints.iterdir())[-1] == "last.ckpt"
    assert not list(checkpoints.glob("epoch=001*"))
    last = read_checkpoint(checkpoints / "last.ckpt")
    assert last["epoch"] == 0 and last["global_step"] == 1
    for weights in (last["state_dict"], last["current_model_state"]):
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


@pytest.mark.slow
def test_ddp_ranks_skip_a_nan_loss_of_one_rank_together(demo, tmp_path):
    # 2 processes x batch 2 = nominal batch 4: a step per iteration, 2 iterations. Rank 1's loss is NaN at
    # iteration 0; had rank 0 stepped alone, its backward would wait for rank 1's forever.
    command = [sys.executable, "-m", "sta_lightning", "fit", *FIT_ARGS, f"--data.root={demo}"]
    command += ["--trainer.max_epochs=1", "--trainer.devices=2", "--trainer.strategy=ddp"]
    command += [
        "--data.loader.batch_size=2",
        "--model.optimizer.nominal_batch_size=4",
        "--checkpoint.dirpath=checkpoints",
    ]
    command += [fault(iterations=[0], rank=1)]
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]),
    }
    finished = subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "Non-finite loss at iteration 0" in finished.stderr
    last = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 1  # rank 0 skipped iteration 0 too
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
