"""The recipe's run controls through the CLI: class weights (given or "auto"), early stopping, extending a
finished fit to more epochs (the schedule and close_mosaic recomputed for the new length) and multi-scale
training (with STA blocks at every size)."""

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from sta_lightning.cli import main
from sta_lightning.data import DemoDataModule
from sta_lightning.models import DEFAULT_STA, YOLOv8, YOLOv8Loss
from sta_lightning.models.loss import class_weights_from_counts

ARGS = [
    "--trainer.accelerator=cpu",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
    "--model.detector.sta=null",
    "--model.optimizer.name=AdamW",
    "--model.optimizer.nominal_batch_size=4",
    "--model.warmup.epochs=0",
    "--data=sta_lightning.data.DemoDataModule",
    "--data.num_train=8",
    "--data.num_val=4",
    "--data.image_size=64",
    "--data.loader.batch_size=4",
    "--data.loader.num_workers=0",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe") / "demo"
    DemoDataModule(root=str(root), num_train=8, num_val=4).prepare_data()
    return root


def fit(demo: Path, run: Path, *extra: str):
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run)}}
    return main(
        ["fit", *ARGS, f"--data.root={demo}", f"--trainer.default_root_dir={run}"]
        + [f"--trainer.logger={json.dumps(logger)}", f"--checkpoint.dirpath={run / 'checkpoints'}", *extra]
    )


def metric_rows(cli) -> list[dict[str, str]]:
    with open(Path(cli.trainer.log_dir) / "metrics.csv") as file:
        return list(csv.DictReader(file))


def test_auto_class_weights_are_inverse_frequency_with_a_mean_of_one_over_the_objects():
    counts = np.array([10, 30, 0, 60])
    weights = class_weights_from_counts(counts, power=1.0)
    assert weights[2] == 1.0  # no objects, no positives to weigh
    assert (counts * weights).sum() == pytest.approx(counts.sum())
    assert weights[0] / weights[1] == pytest.approx(3.0) and weights[1] / weights[3] == pytest.approx(2.0)
    assert class_weights_from_counts(counts, power=0.5)[0] / class_weights_from_counts(counts, 0.5)[3] == (
        pytest.approx(6**0.5)
    )
    assert np.allclose(class_weights_from_counts(counts, power=0.0), 1.0)


def test_class_weights_weigh_the_positives_of_their_class_only():
    torch.manual_seed(0)
    loss = YOLOv8Loss(num_classes=3)
    preds = [torch.randn(2, 64 + 3, 64 // s, 64 // s) for s in (8, 16, 32)]
    targets = {
        "batch_idx": torch.tensor([0, 1]),
        "cls": torch.tensor([0, 0]),  # class 0 only
        "bboxes": torch.tensor([[8.0, 8.0, 40.0, 40.0], [20.0, 10.0, 60.0, 50.0]]),
    }
    _, plain = loss(preds, targets)
    loss.set_class_weights([1.0, 1.0, 1.0])
    assert torch.equal(loss(preds, targets)[1], plain)
    loss.set_class_weights([1.0, 5.0, 0.2])  # classes without targets: nothing changes
    assert torch.equal(loss(preds, targets)[1], plain)
    loss.set_class_weights([3.0, 1.0, 1.0])
    weighted = loss(preds, targets)[1]
    assert weighted[1] > plain[1] and torch.equal(weighted[[0, 2]], plain[[0, 2]])
    with pytest.raises(ValueError, match="model.loss.class_weights: 3 positive values needed"):
        loss.set_class_weights([1.0, 2.0])


def test_a_fit_with_auto_class_weights_reports_them_once(demo, tmp_path, caplog):
    cli = fit(demo, tmp_path / "run", "--trainer.max_epochs=1", "--model.loss.class_weights=auto")
    counts = cli.datamodule.class_counts()
    expected = class_weights_from_counts(counts, 1.0)
    assert cli.model.loss.positive_weights.tolist() == pytest.approx(expected.tolist())
    assert caplog.text.count("Class weights (auto, power 1.0)") == 1


def test_early_stopping_stops_the_fit_and_its_state_resumes_with_last_ckpt(demo, tmp_path):
    # min_delta 1: no validation can improve on the first, so patience 1 stops the fit after the second.
    stopper = {
        "class_path": "lightning.pytorch.callbacks.EarlyStopping",
        "init_args": {"monitor": "val/mAP", "mode": "max", "patience": 1, "min_delta": 1.0},
    }
    arguments = ["--trainer.max_epochs=6", f"--trainer.callbacks+={json.dumps(stopper)}"]
    cli = fit(demo, tmp_path / "run", *arguments)
    assert cli.trainer.current_epoch == 2 and cli.trainer.should_stop
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert state["epoch"] == 1
    (stopping,) = [value for key, value in state["callbacks"].items() if key.startswith("EarlyStopping")]
    assert stopping["wait_count"] == 1 and stopping["stopped_epoch"] == 1
    # Resumed, the counter goes on: one more validation without improvement, and it stops again.
    resumed = fit(demo, tmp_path / "run", *arguments, f"--ckpt_path={last}")
    assert resumed.trainer.current_epoch == 3
    assert torch.load(last, weights_only=False)["epoch"] == 2


def test_a_fit_without_validation_writes_last_ckpt_without_warning_of_the_missing_metric(demo, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(demo, tmp_path / "run", "--trainer.max_epochs=1", "--trainer.limit_val_batches=0")
    assert not [w for w in caught if "could not find the monitored key" in str(w.message)]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0
    assert [path.name for path in (tmp_path / "run" / "checkpoints").iterdir()] == ["last.ckpt"]


def test_a_finished_fit_extended_to_more_epochs_follows_the_longer_schedule(demo, tmp_path, caplog):
    # A 2-epoch fit, extended to 4 from its last.ckpt, trains epochs 2 and 3 with the lr and the mosaic switch
    # of a fit planned for 4 epochs from the start (close_mosaic 1: mosaic on again in epoch 2, off in 3).
    common = ["--data.augment.close_mosaic=1", "--trainer.check_val_every_n_epoch=2"]
    short = fit(demo, tmp_path / "short", "--trainer.max_epochs=2", *common)
    assert "Mosaic off from epoch 1" in caplog.text
    caplog.clear()
    last = tmp_path / "short" / "checkpoints" / "last.ckpt"
    extended = fit(demo, tmp_path / "extended", "--trainer.max_epochs=4", *common, f"--ckpt_path={last}")
    assert "Mosaic off from epoch 3" in caplog.text
    planned = fit(demo, tmp_path / "planned", "--trainer.max_epochs=4", *common)
    assert short.trainer.global_step == 4 and extended.trainer.global_step == planned.trainer.global_step == 8

    def learning_rates(cli) -> dict[int, float]:
        return {int(r["step"]): float(r["lr/weight"]) for r in metric_rows(cli) if r.get("lr/weight")}

    extended_lrs, planned_lrs = learning_rates(extended), learning_rates(planned)
    assert set(extended_lrs) == {step for step in planned_lrs if step >= 4}
    assert extended_lrs == {step: lr for step, lr in planned_lrs.items() if step >= 4}


class InputSizes(Callback):
    """Records the side of every training input the detector sees, by iteration."""

    def __init__(self) -> None:
        self.sides: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        def record(module, inputs):
            if module.training:
                self.sides.append(inputs[0].shape[-1])

        pl_module.model.register_forward_pre_hook(record)


def test_multi_scale_fits_each_iteration_at_its_drawn_size(demo, tmp_path):
    cli = fit(
        demo,
        tmp_path / "run",
        "--trainer.max_epochs=2",
        "--data.augment.multi_scale=true",
        "--model.detector.sta=default",
        "--trainer.callbacks+=test_recipe.InputSizes",
    )
    (recorder,) = [c for c in cli.trainer.callbacks if isinstance(c, InputSizes)]
    assert recorder.sides == [cli.datamodule.input_size(i) for i in range(4)]
    assert torch.isfinite(torch.tensor(cli.trainer.callback_metrics["train/box_loss_epoch"]))


def test_sta_blocks_train_at_odd_multi_scale_sizes():
    # The default preset's 4x4 super tokens on P4 (stride 16) leave partial cells unless the side is a
    # multiple of 64: at 352 px a 22 x 22 map is a 6 x 6 grid, padded. Sizes of 320 px multi-scale training.
    torch.manual_seed(0)
    model = YOLOv8("n", num_classes=5, sta=DEFAULT_STA).train()
    loss = YOLOv8Loss(num_classes=5)
    for size in (160, 224, 352, 480):
        model.zero_grad()
        targets = {
            "batch_idx": torch.tensor([0]),
            "cls": torch.tensor([1]),
            "bboxes": torch.tensor([[0.2, 0.3, 0.7, 0.8]]) * size,
        }
        total, _ = loss(model(torch.rand(1, 3, size, size)), targets)
        total.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert torch.isfinite(total) and all(torch.isfinite(g).all() for g in grads), size
