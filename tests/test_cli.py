"""End to end through ``python -m sta_lightning``'s CLI on a tiny demo dataset: fit, exact resume, validate
from a checkpoint with only the data given, predict to COCO json."""

import copy
import csv
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from detector_checkpoint import write_scoring_checkpoint
from lightning.pytorch import Callback
from pycocotools.coco import COCO

from sta_lightning.cli import main
from sta_lightning.data import DemoDataModule
from sta_lightning.geometry import letterbox, read_image, resize_long_side
from sta_lightning.models import NMSConfig
from sta_lightning.moved_keys import moved_in_arguments, moved_in_section
from sta_lightning.nn import StokenAttention

REPO_ROOT = Path(__file__).resolve().parents[1]

IMAGE_SIZE = 128
# 12 training images in batches of 4 = 3 iterations per epoch; nominal batch 8 = 2 batches per optimizer step
# (no warmup), so an accumulation is open at the end of epoch 0 (iterations 1 and 3 step; 0 + 2 pending).
TRAIN_ARGS = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.max_epochs=2",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
    "--model.detector.scale=n",
    "--model.detector.sta=[{layer: 8, stoken_size: [1, 1], num_heads: 2}]",
    "--model.optimizer.name=AdamW",
    "--model.optimizer.lr0=0.002",
    "--model.optimizer.momentum=0.9",
    "--model.optimizer.nominal_batch_size=8",
    "--model.warmup.epochs=0",
    "--model.ema.tau=5",
    "--checkpoint.save_top_k=-1",
]


def data_args(root: Path) -> list[str]:
    return [
        "--data=sta_lightning.data.DemoDataModule",
        f"--data.root={root}",
        "--data.num_train=12",
        "--data.num_val=9",
        f"--data.image_size={IMAGE_SIZE}",
        "--data.loader.batch_size=4",
        "--data.loader.num_workers=0",
    ]


class TrainingStateRecorder(Callback):
    """Copies of everything a resume must restore, as it stands when the first batch of ``epoch`` starts."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch
        self.state: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch != self.epoch or batch_idx != 0:
            return
        iteration = trainer.num_training_batches * trainer.current_epoch
        self.state = {
            "global_step": trainer.global_step,
            "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "ema": {k: v.clone() for k, v in pl_module.ema.state_dict().items()},
            "optimizer": copy.deepcopy(pl_module.optimizers().optimizer.state_dict()),
            "gradients": {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None},
            "last_optimizer_step": pl_module.accumulation.last_optimizer_step,
            "schedule": pl_module.schedule,
            "step_settings": pl_module.schedule.at(iteration, trainer.current_epoch),
            "mosaic": trainer.datamodule.datasets["train"].mosaic_enabled,
        }


def read_metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as file:
        return list(csv.DictReader(file))


def epoch_value(rows: list[dict[str, str]], key: str, epoch: int) -> float:
    return next(float(r[key]) for r in rows if r.get(key) and int(r["epoch"]) == epoch)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted 2-epoch fit, recording the state at the start of epoch 1."""
    root = tmp_path_factory.mktemp("cli")
    DemoDataModule(root=str(root / "demo"), num_train=12, num_val=9).prepare_data()
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": f"{root}/run"}}
    cli = main(
        ["fit", *TRAIN_ARGS, *data_args(root / "demo"), f"--trainer.default_root_dir={root / 'run'}"]
        + [f"--trainer.logger={json.dumps(logger)}", "--trainer.callbacks+=test_cli.TrainingStateRecorder"]
    )
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, TrainingStateRecorder))
    return {"root": root, "cli": cli, "log_dir": Path(cli.trainer.log_dir), "state": recorder.state}


def test_fit_learns_and_writes_checkpoints(trained):
    log_dir = trained["log_dir"]
    rows = read_metrics(log_dir)
    losses = [
        sum(epoch_value(rows, f"train/{n}_epoch", e) for n in ("box_loss", "cls_loss", "dfl_loss"))
        for e in (0, 1)
    ]
    assert losses[1] < losses[0]
    assert 0.0 <= epoch_value(rows, "val/mAP50", 1) <= 1.0
    # No warmup: lr0 x the linear decay of each epoch, (1 - e / 2) x 0.99 + 0.01.
    lrs = {int(row["epoch"]): float(row["lr/weight"]) for row in rows if row.get("lr/weight")}
    assert lrs == pytest.approx({0: 0.002, 1: 0.002 * 0.505})
    checkpoints = sorted(p.name for p in (log_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 3 and "last.ckpt" in checkpoints
    assert checkpoints[0].startswith("epoch=000-mAP=") and checkpoints[1].startswith("epoch=001-mAP=")

    checkpoint = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 3  # steps at iterations 1, 3, 5
    assert checkpoint["hyper_parameters"]["classes"] == {
        "names": ["circle", "square", "triangle", "star", "cross"],
        "category_ids": [1, 2, 3, 4, 5],
    }
    assert checkpoint["hyper_parameters"]["detector"]["pretrained"] is None
    assert checkpoint["image_size"] == IMAGE_SIZE  # the default input size of predict and export
    # EMA weights in state_dict (validation uses them), raw ones beside, one EMA update per optimizer step.
    assert int(checkpoint["averaging_state"]["n_averaged"]) - 1 == 3
    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert ema.keys() == raw.keys()
    assert not torch.equal(ema["model.head.box_branches.0.2.bias"], raw["model.head.box_branches.0.2.bias"])


def test_resume_restores_the_training_state_exactly(trained):
    root, log_dir = trained["root"], trained["log_dir"]
    epoch0 = next((log_dir / "checkpoints").glob("epoch=000-*.ckpt"))
    cli = main(
        ["fit", *TRAIN_ARGS, *data_args(root / "demo"), f"--ckpt_path={epoch0}", "--trainer.logger=false"]
        + [
            f"--trainer.default_root_dir={root / 'resumed'}",
            "--trainer.callbacks+=test_cli.TrainingStateRecorder",
        ]
    )
    assert cli.trainer.current_epoch == 2 and cli.trainer.global_step == 3
    resumed = next(c for c in cli.trainer.callbacks if isinstance(c, TrainingStateRecorder)).state
    uninterrupted = trained["state"]
    assert resumed is not None and uninterrupted is not None
    assert resumed["gradients"], (
        "an accumulation was pending at the epoch end: its gradients must be restored"
    )
    for key in ("global_step", "last_optimizer_step", "schedule", "step_settings", "mosaic"):
        assert resumed[key] == uninterrupted[key], key
    for key in ("weights", "ema", "gradients"):
        assert resumed[key].keys() == uninterrupted[key].keys()
        for name in resumed[key]:
            assert torch.equal(resumed[key][name], uninterrupted[key][name]), (key, name)
    assert resumed["optimizer"]["param_groups"] == uninterrupted["optimizer"]["param_groups"]
    torch.testing.assert_close(
        resumed["optimizer"]["state"], uninterrupted["optimizer"]["state"], rtol=0, atol=0
    )


def test_validate_from_checkpoint_needs_only_the_data(trained):
    root, log_dir = trained["root"], trained["log_dir"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(
            ["validate", f"--ckpt_path={log_dir / 'checkpoints' / 'last.ckpt'}", *data_args(root / "demo")]
            + ["--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
            + [f"--trainer.default_root_dir={root / 'validated'}"]  # where the CLI saves its config.yaml
        )
    # The fit-only EMA callback's state is not asked for: no "add the following callbacks" warning.
    assert not [w for w in caught if "callbacks used to create the checkpoint" in str(w.message)]
    # The model was rebuilt from the checkpoint's hyperparameters (an STA block after layer 8 only) ...
    assert (
        list(cli.model.model.sta.keys()) == ["layer8"] and cli.model.hparams["optimizer"]["name"] == "AdamW"
    )
    # ... with the checkpoint's EMA weights, which give the metrics the last validation of the fit logged.
    checkpoint = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=True)
    weights = cli.model.state_dict()
    assert all(torch.equal(weights[key], value) for key, value in checkpoint["state_dict"].items())
    logged = {k: v for k, v in trained["cli"].trainer.callback_metrics.items() if k.startswith("val/")}
    validated = {k: v for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    assert len(logged) == 12 and validated.keys() == logged.keys()
    for key, value in logged.items():
        assert math.isclose(float(validated[key]), float(value), abs_tol=1e-9), key


def test_predict_writes_coco_json_in_original_pixels(trained):
    root, log_dir = trained["root"], trained["log_dir"]
    images = sorted((root / "demo" / "val").glob("*.jpg"))[:5]
    output = root / "predictions"
    cli = main(
        [
            "predict",
            f"--ckpt_path={log_dir / 'checkpoints' / 'last.ckpt'}",
            "--data=sta_lightning.data.COCODataModule",
        ]
        # No data.image_size: the size the checkpoint was trained at.
        + [f"--data.predict.images={json.dumps([str(p) for p in images])}"]
        + ["--data.loader.num_workers=0", "--trainer.accelerator=cpu", "--trainer.logger=false"]
        + [
            "--model.predict_nms.conf_threshold=0.0001"
        ]  # NMS settings are not in the checkpoint: this applies
        + [
            f"--prediction.output_dir={output}",
            "--prediction.render=true",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root / 'predicted'}",
        ]
    )
    assert cli.datamodule.image_size == IMAGE_SIZE
    index = COCO(str(output / "images.json"))
    results = index.loadRes(str(output / "predictions.json"))  # pycocotools accepts the files as COCO
    assert [index.imgs[i]["file_name"] for i in sorted(index.imgs)] == [p.name for p in images]
    assert {c["name"] for c in index.cats.values()} == {"circle", "square", "triangle", "star", "cross"}
    assert len(results.anns) > 0
    rendered = [f"{i:06d}_{p.stem}.jpg" for i, p in enumerate(images)]
    assert sorted(p.name for p in (output / "images").iterdir()) == rendered

    # Boxes are the detector's on the letterboxed input mapped back, (box - pad) / scale: original pixels.
    # (The 5 images went through the detector as one batch: the same batch here gives bitwise equal scores.)
    letterboxed, geometry = [], []
    for path in images:
        original = read_image(path, apply_exif_orientation=True)
        resized, scale = resize_long_side(original, IMAGE_SIZE)
        padded, pad = letterbox(resized, IMAGE_SIZE)
        letterboxed.append(torch.from_numpy(padded).permute(2, 0, 1))
        geometry.append((original.shape[:2], scale, pad))
    found = cli.model.predict_batch(
        torch.stack(letterboxed), NMSConfig(conf_threshold=0.0001, multi_label=False)
    )
    for image_id, info in index.imgs.items():
        (height, width), scale, (pad_x, pad_y) = geometry[image_id]
        assert (info["height"], info["width"]) == (height, width)
        expected = (found[image_id][:, :4] - torch.tensor([pad_x, pad_y, pad_x, pad_y])) / scale
        expected = torch.minimum(expected.clamp(min=0), torch.tensor([width, height, width, height]))
        written = torch.tensor([a["bbox"] for a in results.imgToAnns[image_id]]).reshape(-1, 4)
        written[:, 2:] += written[:, :2]
        torch.testing.assert_close(written, expected, atol=0.011, rtol=0)  # json rounds to 0.01
        categories = [a["category_id"] for a in results.imgToAnns[image_id]]
        assert categories == [int(c) + 1 for c in found[image_id][:, 5]]  # demo category ids are 1..5


def test_bf16_mixed_precision_fit_with_the_default_sta(tmp_path):
    # The CPU runs autocast in bf16 (fp16 AMP with its GradScaler needs a GPU): STA blocks at P4/P5,
    # clipping and EMA under autocast give finite losses and a validation with finite metrics.
    cli = main(
        ["fit", *TRAIN_ARGS, *data_args(tmp_path / "demo"), "--model.detector.sta=default"]
        + ["--trainer.precision=bf16-mixed", "--trainer.max_epochs=1", "--trainer.logger=false"]
        + [f"--trainer.default_root_dir={tmp_path / 'run'}"]
    )
    assert cli.trainer.precision == "bf16-mixed" and list(cli.model.model.sta) == ["layer6", "layer8"]
    metrics = cli.trainer.callback_metrics
    for name in (
        "train/box_loss_epoch",
        "train/cls_loss_epoch",
        "train/dfl_loss_epoch",
        "val/mAP",
        "val/mAR100",
    ):
        assert torch.isfinite(metrics[name]), name
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


OLD_CONFIG = """\
model:
  model_scale: s
  sta: default
  optimizer: AdamW
  lr0: 0.002
  ema: false
data:
  class_path: sta_lightning.data.DemoDataModule
  init_args:
    batch_size: 4
    mosaic: 0.5
"""


def test_moved_keys_are_found_in_config_sections_and_flags():
    assert moved_in_section("model", {"model_scale": "s", "optimizer": "AdamW", "ema": False}) == [
        "model.model_scale -> model.detector.scale",
        "model.optimizer -> model.optimizer.name",
        "model.ema -> model.ema.enabled",
    ]
    # optimizer, ema and compile are group names now: a mapping under them is the new layout.
    assert moved_in_section("model", {"optimizer": {"name": "SGD"}, "ema": {"tau": 5}, "compile": {}}) == []
    assert moved_in_section("data", {"init_args": {"train_images": "a", "batch_size": 4, "root": "r"}}) == [
        "data.train_images -> data.train.images",
        "data.batch_size -> data.loader.batch_size",
    ]
    flags = [
        "--model.lr0=0.1",
        "--model.optimizer.lr0=0.1",
        "--data.init_args.close_mosaic=2",
        "--data.root=x",
    ]
    assert moved_in_arguments(flags) == [
        "--model.lr0 -> --model.optimizer.lr0",
        "--data.init_args.close_mosaic -> --data.augment.close_mosaic",
    ]


def test_the_cli_refuses_an_old_config_naming_each_moved_key(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text(OLD_CONFIG)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(old), "--model.warmup_epochs=0"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "docs/configuration.md" in error
    for moved in (
        f"{old}: model.model_scale -> model.detector.scale",
        f"{old}: model.sta -> model.detector.sta",
        f"{old}: model.optimizer -> model.optimizer.name",
        f"{old}: model.lr0 -> model.optimizer.lr0",
        f"{old}: model.ema -> model.ema.enabled",
        f"{old}: data.batch_size -> data.loader.batch_size",
        f"{old}: data.mosaic -> data.augment.mosaic",
        "--model.warmup_epochs -> --model.warmup.epochs",
    ):
        assert moved in error, moved


def test_old_config_keys_fail_in_a_fresh_process_too(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  model_scale: s\n")
    result = subprocess.run(
        [sys.executable, "-m", "sta_lightning", "fit", "--config", str(old)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "model.model_scale -> model.detector.scale" in result.stderr


def test_the_cli_refuses_a_checkpoint_of_the_flat_layout_naming_it(tmp_path, capsys):
    content = torch.load(write_scoring_checkpoint(tmp_path / "model.ckpt"), weights_only=True)
    content["hyper_parameters"] = {"model_scale": "n", "sta": None, "num_classes": 5, "lr0": 0.01}
    old = tmp_path / "old.ckpt"
    torch.save(content, old)
    DemoDataModule(root=str(tmp_path / "demo"), num_train=2, num_val=2).prepare_data()
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["validate", f"--ckpt_path={old}", "--trainer.accelerator=cpu", "--trainer.logger=false"]
            + data_args(tmp_path / "demo")
        )
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"checkpoint {old} was written by sta_lightning 0.1" in error and "model.detector.scale" in error


@pytest.mark.parametrize(
    "configs",
    [
        ["demo.yaml"],
        *[["coco.yaml", f"yolov8{scale}{sta}.yaml"] for scale in "nsmlx" for sta in ("", "-sta")],
    ],
    ids=lambda configs: "+".join(configs),
)
def test_the_shipped_configs_parse(configs, capsys):
    arguments = [argument for name in configs for argument in ("--config", str(REPO_ROOT / "configs" / name))]
    assert moved_in_arguments(arguments) == []
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *arguments, "--print_config"])
    assert exit_info.value.code == 0
    assert "detector:" in capsys.readouterr().out


def step_losses(run: Path) -> list[float]:
    """The total (box + class + DFL) loss of each logged training step of a run's metrics.csv."""
    names = [f"train/{term}_loss_step" for term in ("box", "cls", "dfl")]
    with open(next(run.rglob("metrics.csv"))) as file:
        rows = [row for row in csv.DictReader(file) if row[names[0]]]
    return [sum(float(row[name]) for name in names) for row in rows]


@pytest.mark.slow
def test_compiled_channels_last_fit_through_the_cli_trains_like_the_eager_one(tmp_path):
    # --model.compile (backend aot_eager: traced forward and backward, no code generation) and
    # --model.channels_last and --model.sta_pixel_layout (set on every STA module): 8 images of 64 px, one
    # optimizer step per batch of 4, no validation.
    small = ["--trainer.max_epochs=1", "--trainer.limit_val_batches=0", "--data.num_train=8"]
    small += ["--data.image_size=64", "--model.optimizer.nominal_batch_size=4"]
    accelerated = ["--model.compile.enabled=true", "--model.compile.backend=aot_eager"]
    accelerated += ["--model.channels_last=true", "--model.sta_pixel_layout=cells"]
    losses = {}
    for name, extra in {"eager": [], "compiled": accelerated}.items():
        root = tmp_path / name
        logger = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}"]
        arguments = [*TRAIN_ARGS, *data_args(tmp_path / "demo"), *small, *extra, *logger]
        cli = main(["fit", *arguments, f"--trainer.default_root_dir={root}"])
        assert cli.model.compile_config.enabled == (name == "compiled")
        if name == "compiled":
            assert cli.model._compiled_model is not None  # the train step really went through torch.compile
            weight = cli.model.model.layer(0).conv.weight
            assert weight.is_contiguous(memory_format=torch.channels_last)
            layouts = {m.pixel_layout for m in cli.model.modules() if isinstance(m, StokenAttention)}
            assert layouts == {"cells"}
        losses[name] = step_losses(root)
    assert len(losses["eager"]) == 2
    # Same first loss; after one optimizer step the kernels' summation order (NHWC, traced graph) shows.
    assert losses["compiled"][0] == pytest.approx(losses["eager"][0], rel=1e-5)
    assert losses["compiled"][1] == pytest.approx(losses["eager"][1], rel=2e-3)
