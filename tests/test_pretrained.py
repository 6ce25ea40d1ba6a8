"""Starting from pretrained weights: the reference's .pt files (read without their code), our checkpoints and
state dicts; STA inserted as the identity; another class count; freezing; the STA lr multiplier; safety."""

import os
import shutil

import numpy as np
import pytest
import torch
from detector_checkpoint import STA, write_scoring_checkpoint
from tiny_fit import fit_steps

from sta_lightning.classes import Classes
from sta_lightning.cli import main
from sta_lightning.data import DemoDataModule
from sta_lightning.models import (
    DEFAULT_STA,
    DetectorConfig,
    OutdatedCheckpointError,
    STAPlacement,
    UnsafeCheckpointError,
    YOLOv8,
    load_pretrained,
)
from sta_lightning.training import DetectionModule
from sta_lightning.training.ema import EMAConfig
from sta_lightning.training.optim import (
    OptimizerConfig,
    TrainingSchedule,
    WarmupConfig,
    apply_step_settings,
    build_optimizer,
)

RELEASED = "yolov8n-demo-ul8.2.103.pt"
TRAIN_FORMAT = "yolov8n-demo-ul8.4.190-trainformat.pt"
OUTPUTS = "yolov8n-demo-ul8.2.103-outputs.npz"
# ../shared/data/ultralytics/README.md: `validate` of the 8.2.103 file on the demo val split at 256 px.
README_VAL_MAP = 0.6950


@pytest.fixture(scope="module")
def reference_files(request):
    shared = request.getfixturevalue("shared_data") / "ultralytics"
    if not (shared / RELEASED).is_file():
        pytest.skip(f"reference checkpoints not found in {shared}")
    return shared


def _decoded(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(images).float() / 255)[0]


@pytest.mark.parametrize(
    ("name", "version", "entry"), [(RELEASED, "8.2.103", "model"), (TRAIN_FORMAT, "8.4.190", "ema")]
)
def test_reference_files_load_every_detector_tensor(reference_files, name, version, entry):
    report = load_pretrained(YOLOv8("n", 5), reference_files / name)
    assert (report.loaded, report.detector_tensors, report.file_classes) == (355, 355, 5)
    assert report.summary() == (
        f"pretrained: 355/355 YOLOv8n tensors from {name} (ultralytics {version}, '{entry}' entry, 5 classes)"
    )


def test_reference_weights_reproduce_the_reference_outputs(reference_files):
    model = YOLOv8("n", 5)
    load_pretrained(model, reference_files / RELEASED)
    outputs = np.load(reference_files / OUTPUTS)
    assert torch.allclose(_decoded(model, outputs["images"]), torch.from_numpy(outputs["decoded"]), atol=1e-3)


def test_validate_the_pretrained_file_as_it_is(reference_files, tmp_path):
    # The demo val images do not depend on the train count: 100 val images as in the README's measurement.
    DemoDataModule(root=str(tmp_path / "demo"), num_train=2, num_val=100).prepare_data()
    cli = main(
        ["validate", "--model.detector.scale=n", f"--model.detector.pretrained={reference_files / RELEASED}"]
        + [
            "--data=sta_lightning.data.DemoDataModule",
            f"--data.root={tmp_path / 'demo'}",
            "--data.num_train=2",
        ]
        + [
            "--data.image_size=256",
            "--data.loader.num_workers=0",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
        ]
        + ["--trainer.enable_progress_bar=false"]
    )
    assert float(cli.trainer.callback_metrics["val/mAP"]) == pytest.approx(README_VAL_MAP, abs=0.005)


def test_sta_starts_as_the_identity_learns_and_frozen_layers_stay(reference_files, tmp_path):
    plain = YOLOv8("n", 5)
    load_pretrained(plain, reference_files / RELEASED)
    module = DetectionModule(
        detector=DetectorConfig(
            scale="n", sta="default", freeze=10, pretrained=str(reference_files / RELEASED)
        ),
        classes=Classes.anonymous(5),
        optimizer=OptimizerConfig(name="AdamW", lr0=0.002, momentum=0.9, nominal_batch_size=4),
        warmup=WarmupConfig(epochs=0),
        ema=EMAConfig(enabled=False),
    )
    assert "38 new STA tensors (blocks start as the identity)" in module.pretrained_summary  # 2 blocks
    images = np.load(reference_files / OUTPUTS)["images"]
    assert torch.allclose(_decoded(module.model, images), _decoded(plain, images), atol=1e-5)

    module.train()
    before = {key: value.clone() for key, value in module.model.state_dict().items()}
    fit_steps(module, tmp_path / "demo")
    after = module.model.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    backbone = [key for key in before if key.startswith("layers.") and int(key.split(".")[1]) < 10]
    # Frozen: the backbone's weights and BatchNorm statistics are untouched.
    assert backbone and not changed.intersection(backbone)
    assert any(key.startswith("layers.12.") for key in changed) and any(
        key.startswith("head.") for key in changed
    )
    # The zero-initialised residual outputs of every STA block received gradients and moved.
    for name in ("layer6", "layer8"):
        assert f"sta.{name}.0.attn.stoken_refine.proj.weight" in changed
        assert f"sta.{name}.0.mlp2.fc2.weight" in changed
    frozen = {id(p) for i in range(10) for p in module.model.layer(i).parameters()}
    optimized = {id(p) for group in module.optimizers().optimizer.param_groups for p in group["params"]}
    assert not frozen & optimized


def test_another_class_count_reinitialises_the_class_branch(reference_files):
    fresh = YOLOv8("n", 3)
    initial = {key: value.clone() for key, value in fresh.state_dict().items()}
    report = load_pretrained(fresh, reference_files / RELEASED)
    # yolov8n's class branch is 64 wide for up to 64 classes: only the last convs change shape.
    assert report.reinitialised == [
        f"head.class_branches.{i}.2.{p}" for i in range(3) for p in ("weight", "bias")
    ]
    assert report.loaded == 355 - 6
    assert "class branch re-initialised for 3 classes (6 tensors)" in report.summary()
    for key in report.reinitialised:
        assert torch.equal(fresh.state_dict()[key], initial[key])  # the reference head initialisation


def test_our_checkpoint_and_state_dict_load_with_their_sta_blocks(tmp_path):
    source = YOLOv8("n", 5, DEFAULT_STA)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    target = YOLOv8("n", 5, DEFAULT_STA)
    report = load_pretrained(target, tmp_path / "weights.pt")
    assert (report.loaded, report.sta_loaded, report.sta_new) == (355, 38, 0)
    assert all(
        torch.equal(a, b)
        for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True)
    )


def test_our_fit_checkpoint_loads_with_its_sta_blocks(tmp_path):
    checkpoint = write_scoring_checkpoint(tmp_path / "model.ckpt")
    target = YOLOv8("n", 5, [STAPlacement(**placement) for placement in STA])
    report = load_pretrained(target, checkpoint)
    assert (report.loaded, report.sta_new) == (355, 0) and report.sta_loaded > 0
    assert "sta_lightning checkpoint" in report.summary()
    stored = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(value, stored[f"model.{key}"]) for key, value in target.state_dict().items())


def test_a_checkpoint_of_the_flat_layout_is_refused_as_outdated(tmp_path):
    checkpoint = write_scoring_checkpoint(tmp_path / "model.ckpt")
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"] = {"model_scale": "n", "num_classes": 5, "sta": None, "lr0": 0.01}
    old = tmp_path / "old.ckpt"
    torch.save(content, old)
    with pytest.raises(OutdatedCheckpointError, match=rf"checkpoint {old} was written by sta_lightning 0.1"):
        load_pretrained(YOLOv8("n", 5), old)
    with pytest.raises(OutdatedCheckpointError, match=rf"checkpoint {old}"):
        DetectionModule(detector=DetectorConfig(pretrained=str(old)), classes=Classes.anonymous(5))


def test_another_scale_is_refused_with_both_named(tmp_path):
    torch.save(YOLOv8("n", 5).state_dict(), tmp_path / "n.pt")
    with pytest.raises(ValueError, match=r"a YOLOv8n file, but the model is YOLOv8s"):
        load_pretrained(YOLOv8("s", 5), tmp_path / "n.pt")


class _RunsACommand:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_file_is_refused_and_its_command_does_not_run(tmp_path):
    marker = tmp_path / "command-ran"
    crafted = tmp_path / "crafted.pt"
    torch.save({"model": _RunsACommand(marker), "version": "8.2.103"}, crafted)
    with pytest.raises(UnsafeCheckpointError, match=rf"{crafted}.*'{os.system.__module__}.system'"):
        load_pretrained(YOLOv8("n", 5), crafted)
    assert not marker.exists()


def test_a_missing_or_broken_file_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pretrained(YOLOv8("n", 5), tmp_path / "absent.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt is damaged or not a torch checkpoint"):
        load_pretrained(YOLOv8("n", 5), tmp_path / "broken.pt")


def test_sta_parameters_get_their_lr_multiplier():
    model = YOLOv8("n", 5, DEFAULT_STA)
    config = OptimizerConfig(
        name="AdamW", lr0=0.002, momentum=0.9, weight_decay=5e-4, nominal_batch_size=16, sta_lr_scale=10.0
    )
    optimizer = build_optimizer(model, config)
    sta = {id(p) for name, p in model.named_parameters() if name.startswith("sta.")}
    warmup = WarmupConfig(bias_lr=0.0, momentum=0.8)
    schedule = TrainingSchedule(config, warmup, epochs=10, warmup_iters=-1, total_batch_size=16)
    apply_step_settings(optimizer, schedule.at(5, 0))
    for group in optimizer.param_groups:
        in_sta = {id(p) in sta for p in group["params"]}
        assert len(in_sta) == 1
        assert group["lr"] == pytest.approx(0.002 * (10.0 if in_sta == {True} else 1.0))


def test_a_finetuned_checkpoint_validates_and_resumes_without_its_pretrained_file(reference_files, tmp_path):
    pretrained = tmp_path / "copy.pt"
    shutil.copy(reference_files / RELEASED, pretrained)
    DemoDataModule(root=str(tmp_path / "demo"), num_train=8, num_val=4).prepare_data()
    data = [
        "--data=sta_lightning.data.DemoDataModule",
        f"--data.root={tmp_path / 'demo'}",
        "--data.num_train=8",
    ]
    data += ["--data.num_val=4", "--data.image_size=128", "--data.loader.batch_size=4"]
    data += ["--data.loader.num_workers=0"]
    common = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
    common += [f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.enable_model_summary=false"]
    model = [
        "--model.detector.scale=n",
        "--model.detector.sta=default",
        f"--model.detector.pretrained={pretrained}",
    ]
    main(["fit", *model, *data, *common, "--trainer.max_epochs=1", "--model.warmup.epochs=0"])
    checkpoint = next((tmp_path / "run").rglob("last.ckpt"))
    assert (
        "pretrained: 355/355 YOLOv8n tensors from copy.pt"
        in torch.load(checkpoint, weights_only=True)["pretrained"]
    )
    pretrained.unlink()
    validated = main(["validate", f"--ckpt_path={checkpoint}", *model, *data, *common])
    assert "val/mAP" in validated.trainer.callback_metrics
    resumed = main(["fit", f"--ckpt_path={checkpoint}", *model, *data, *common, "--trainer.max_epochs=2"])
    assert resumed.trainer.current_epoch == 2
