"""OfflineFallbackWandbLogger's console output in a real offline W&B run, as a fresh process prints it: no
"git root ... does not exist" warning, and the ``wandb sync`` command exactly once."""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO_ROOT

SCRIPT = """
import sys

import wandb
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from sta_lightning.plugins.loggers import OfflineFallbackWandbLogger


class FailingModel(BoringModel):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("a failing fit")


settings = wandb.Settings(quiet=False) if sys.argv[1] == "verbose" else None
logger = OfflineFallbackWandbLogger(project="sta-test", save_dir="runs", offline=True, settings=settings)
trainer = Trainer(
    max_epochs=1,
    limit_train_batches=2,
    limit_val_batches=1,
    logger=logger,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)
trainer.fit(FailingModel() if sys.argv[2] == "fail" else BoringModel())
"""


@pytest.mark.parametrize(
    "verbosity, outcome",
    [("default", "succeed"), ("verbose", "fail")],
    ids=["quiet-default-success", "wandb-footer-failure"],
)
def test_fit_prints_one_sync_command_and_no_git_warning(tmp_path, verbosity, outcome):
    # A fresh folder without runs/ (the first run of a clone): wandb.init used to warn "git root runs does not
    # exist". W&B's console output is on (no WANDB_SILENT, which the test session sets).
    (tmp_path / "fit.py").write_text(textwrap.dedent(SCRIPT))
    env = {key: value for key, value in os.environ.items() if key not in ("WANDB_SILENT", "WANDB_QUIET")}
    env.update(WANDB_MODE="offline", NO_ALBUMENTATIONS_UPDATE="1")
    result = subprocess.run(
        [sys.executable, "fit.py", verbosity, outcome],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == (0 if outcome == "succeed" else 1), output[-3000:]
    assert "W&B syncing is set to `offline`" in output  # W&B's console output is on
    assert "does not exist" not in output
    (run_dir,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    sync_lines = [line for line in output.splitlines() if "wandb sync " in line]
    assert len(sync_lines) == 1, output[-3000:]
    if verbosity == "default":  # ours, with the absolute path
        assert sync_lines[0].endswith(f"Upload it with: wandb sync {run_dir}")
    else:  # W&B's own footer (settings quiet=False), relative to the working directory
        assert sync_lines[0] == f"wandb: wandb sync {run_dir.relative_to(tmp_path)}"
    # The run is finished from Python at exit, with the fit's outcome as its exit code.
    debug_log = (run_dir / "logs" / "debug.log").read_text()
    assert f"got exitcode: {0 if outcome == 'succeed' else 1}" in debug_log


@pytest.mark.slow
def test_a_fit_resumed_from_its_checkpoint_continues_the_same_wandb_run(tmp_path):
    # Outside SLURM nothing names the run but the checkpoint (WandbRunCheckpoint): the resumed fit reads it.
    tiny = [
        "--config=" + str(REPO_ROOT / "configs" / "demo.yaml"),
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.enable_progress_bar=false",
        f"--data.init_args.root={tmp_path / 'demo'}",
        "--data.init_args.num_train=8",
        "--data.init_args.num_val=4",
        "--data.init_args.image_size=64",
        "--data.init_args.loader.num_workers=0",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("WANDB_SERVICE", None)  # each fit starts its own W&B service, as two commands of a user do
    for epochs in (1, 2):
        ckpt_path = [f"--ckpt_path={next(tmp_path.rglob('last.ckpt'))}"] if epochs == 2 else []
        command = [sys.executable, "-m", "sta_lightning", "fit", *tiny, f"--trainer.max_epochs={epochs}"]
        result = subprocess.run(
            [*command, *ckpt_path], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
        )
        assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    assert runs[0].name.rsplit("-", 1)[1] == runs[1].name.rsplit("-", 1)[1]  # one run id, two sessions
