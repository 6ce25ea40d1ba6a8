"""Checkpoint integrity: a damaged checkpoint gives an error naming the file at every entry point, and a
SIGKILL in the middle of writing ``last.ckpt`` leaves the previous one usable for resuming."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detector_checkpoint import write_scoring_checkpoint
from fault_injection import STALLED_MARKER

from sta_lightning.__main__ import main as package_main
from sta_lightning.checkpoint_file import CheckpointError, read_checkpoint, write_checkpoint
from sta_lightning.classes import Classes
from sta_lightning.cli import main
from sta_lightning.data import DemoDataModule
from sta_lightning.models import DetectorConfig, YOLOv8, load_pretrained
from sta_lightning.training import DetectionModule

TESTS = Path(__file__).parent


def damaged_copies(checkpoint: Path, folder: Path) -> dict[str, Path]:
    """Damaged versions of a real checkpoint: cut in half, 64 random bytes in the middle (inside a tensor
    record, which torch itself would load silently), empty, and a file that is no checkpoint."""
    data = checkpoint.read_bytes()
    middle = len(data) // 2
    variants = {
        "first_half": data[:middle],
        "random_bytes_in_the_middle": data[:middle] + os.urandom(64) + data[middle + 64 :],
        "empty": b"",
        "not_a_checkpoint": b"epoch: 3\nweights: see attachment\n",
    }
    paths = {}
    for name, content in variants.items():
        paths[name] = folder / f"{name}.ckpt"
        paths[name].write_bytes(content)
    return paths


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("checkpoints")
    DemoDataModule(root=str(root / "demo"), num_train=4, num_val=4).prepare_data()
    checkpoint = write_scoring_checkpoint(root / "model.ckpt")
    return {"root": root, "checkpoint": checkpoint, **damaged_copies(checkpoint, root)}


@pytest.mark.parametrize("variant", ["first_half", "random_bytes_in_the_middle", "empty", "not_a_checkpoint"])
def test_a_damaged_checkpoint_is_named_in_the_error(files, variant):
    assert read_checkpoint(files["checkpoint"])["hyper_parameters"]["classes"]["names"] == list("01234")
    with pytest.raises(CheckpointError, match=rf"checkpoint {files[variant]} is damaged.*earlier checkpoint"):
        read_checkpoint(files[variant])
    with pytest.raises(FileNotFoundError, match="absent.ckpt does not exist"):
        read_checkpoint(files["root"] / "absent.ckpt")


def test_torch_alone_loads_bytes_changed_inside_a_tensor_silently(files):
    """Why read_checkpoint checks the zip records' CRC32: torch.load does not."""
    loaded = torch.load(files["random_bytes_in_the_middle"], weights_only=True)
    original = torch.load(files["checkpoint"], weights_only=True)
    changed = [k for k, v in original["state_dict"].items() if not torch.equal(v, loaded["state_dict"][k])]
    assert len(changed) == 1


@pytest.mark.parametrize(
    ("subcommand", "variant"),
    [
        ("fit", "first_half"),
        ("validate", "random_bytes_in_the_middle"),
        ("test", "empty"),
        ("predict", "not_a_checkpoint"),
    ],
)
def test_the_cli_refuses_a_damaged_ckpt_path(files, subcommand, variant, capsys):
    root = files["root"]
    arguments = [subcommand, f"--ckpt_path={files[variant]}", "--trainer.accelerator=cpu"]
    arguments += ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.max_epochs=1"]
    arguments += [f"--trainer.default_root_dir={root / subcommand}"]
    if subcommand == "predict":  # bare images: the classes come from the checkpoint, read first
        arguments += [
            "--data=sta_lightning.data.COCODataModule",
            f"--data.predict.images={root / 'demo/val'}",
        ]
    else:
        arguments += ["--data=sta_lightning.data.DemoDataModule", f"--data.root={root / 'demo'}"]
        arguments += ["--data.num_train=4", "--data.num_val=4"]
    arguments += ["--data.image_size=64", "--data.loader.batch_size=2", "--data.loader.num_workers=0"]
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert f"checkpoint {files[variant]} is damaged" in capsys.readouterr().err


def test_export_refuses_a_damaged_checkpoint(files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        package_main(["export", f"--ckpt_path={files['first_half']}"])
    assert exit_info.value.code == 2
    assert f"checkpoint {files['first_half']} is damaged" in capsys.readouterr().err


def test_pretrained_weights_refuse_a_damaged_checkpoint(files):
    with pytest.raises(CheckpointError, match=rf"checkpoint {files['first_half']} is damaged"):
        load_pretrained(YOLOv8("n", 5), files["first_half"])
    with pytest.raises(CheckpointError, match=rf"checkpoint {files['empty']} is damaged"):
        DetectionModule(detector=DetectorConfig(pretrained=str(files["empty"])), classes=Classes.anonymous(5))


def test_write_checkpoint_replaces_the_file_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    write_checkpoint({"epoch": 0}, path)
    write_checkpoint({"epoch": 1}, path)
    assert read_checkpoint(path) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_sigkill_while_writing_last_ckpt_keeps_the_previous_one(tmp_path):
    DemoDataModule(root=str(tmp_path / "demo"), num_train=8, num_val=4).prepare_data()
    common = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_epochs=2"]
    common += [
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
    ]
    common += [
        "--model.detector.sta=null",
        "--model.warmup.epochs=0",
        "--model.optimizer.nominal_batch_size=4",
    ]
    common += ["--data=sta_lightning.data.DemoDataModule", f"--data.root={tmp_path / 'demo'}"]
    common += ["--data.num_train=8", "--data.num_val=4", "--data.image_size=64", "--data.loader.batch_size=4"]
    # save_top_k -1: Lightning 2.6 rewrites last.ckpt only in an epoch that also saves a top-k checkpoint.
    common += [
        "--data.loader.num_workers=0",
        "--checkpoint.dirpath=checkpoints",
        "--checkpoint.save_top_k=-1",
    ]
    stall = {"class_path": "fault_injection.StalledCheckpointWrite", "init_args": {"from_epoch": 1}}
    command = [sys.executable, "-m", "sta_lightning", "fit", *common]
    command += [
        f"--trainer.default_root_dir={tmp_path / 'killed'}",
        f"--trainer.callbacks+={json.dumps(stall)}",
    ]
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]),
    }
    fit = subprocess.Popen(
        command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = []
    for line in fit.stdout:
        output.append(line)
        if STALLED_MARKER in line:
            os.kill(fit.pid, signal.SIGKILL)
            break
    assert fit.wait(timeout=60) == -signal.SIGKILL, "".join(output)[-3000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    partial = tmp_path / "checkpoints" / ".last.ckpt.partial"
    assert 0 < partial.stat().st_size < last.stat().st_size  # the epoch-1 write was cut in the middle
    assert read_checkpoint(last)["epoch"] == 0

    resumed = main(
        ["fit", *common, f"--ckpt_path={last}", f"--trainer.default_root_dir={tmp_path / 'resumed'}"]
    )
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step > 0
    assert read_checkpoint(last)["epoch"] == 1
    assert not partial.exists()
