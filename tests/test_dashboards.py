"""A short demo fit logs the dashboards to an offline W&B run, a TensorBoard log and the run folder: PR curves
whose points give the logged mAP, the F1 curve and best confidence, the confusion matrix, per-class AP and
the dataset statistics; the model summary counts real FLOPs."""

import csv
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import wandb
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.model_summary import summarize

from sta_lightning.callbacks import DatasetStatisticsCallback, EvaluationPlotsCallback
from sta_lightning.data import AugmentConfig, DemoDataModule, LoaderConfig
from sta_lightning.models import DetectorConfig
from sta_lightning.plugins.loggers import OfflineFallbackWandbLogger
from sta_lightning.training.evaluation import detections_to_original
from sta_lightning.training.module import DetectionModule
from sta_lightning.training.optim import OptimizerConfig, WarmupConfig

IMAGE_SIZE = 128
EPOCHS = 2
CLASS_NAMES = ("circle", "square", "triangle", "star", "cross")
VALIDATION_CHARTS = (
    "pr_curve_iou50",
    "pr_curve_iou50_95",
    "f1_curve",
    "confusion_matrix",
    "confusion_matrix_normalized",
    "ap_per_class",
)
DATA_CHARTS = ("instances_per_class", "box_sizes")


class OracleDetectionModule(DetectionModule):
    """Validation detections made from the ground truth, so that the curves have shape after a short fit:
    every object with a jittered box and a random score (every third one with the wrong class), plus three
    false positives per image; different in each epoch."""

    def validation_step(self, batch, batch_idx):
        generator = torch.Generator().manual_seed(1000 * self.current_epoch + batch_idx)
        num_classes = self.classes.num_classes
        found = []
        for index in range(len(batch["image_ids"])):
            own = batch["batch_idx"] == index
            boxes, classes = batch["bboxes"][own], batch["cls"][own]
            classes = torch.where(torch.arange(len(classes)) % 3 == 2, (classes + 1) % num_classes, classes)
            corners = torch.rand(3, 2, generator=generator) * (IMAGE_SIZE - 24)
            false_boxes = torch.cat([corners, corners + 24], dim=1)
            found.append(
                torch.cat(
                    [
                        torch.column_stack(
                            [
                                boxes + torch.randn(boxes.shape, generator=generator) * 2,
                                torch.rand(len(boxes), generator=generator),
                                classes.float(),
                            ]
                        ),
                        torch.column_stack(
                            [
                                false_boxes,
                                torch.rand(3, generator=generator) * 0.6,
                                torch.randint(0, num_classes, (3,), generator=generator).float(),
                            ]
                        ),
                    ]
                )
            )
        self.evaluation.evaluator.update(batch["image_ids"], detections_to_original(found, batch))


@pytest.fixture(scope="module")
def dashboard_fit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboards")
    datamodule = DemoDataModule(
        root=str(tmp / "demo"),
        num_train=8,
        num_val=9,
        image_size=IMAGE_SIZE,
        loader=LoaderConfig(batch_size=4, num_workers=0),
        augment=AugmentConfig(mosaic=0.0),
    )
    module = OracleDetectionModule(
        detector=DetectorConfig("n", sta=None),
        classes=datamodule.classes,
        optimizer=OptimizerConfig(nominal_batch_size=4),
        warmup=WarmupConfig(epochs=0),
    )
    csv_logger = CSVLogger(str(tmp), name="run")
    wandb_logger = OfflineFallbackWandbLogger(project="sta-test", save_dir=str(tmp))
    tensorboard_logger = TensorBoardLogger(str(tmp), name="tensorboard")
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=[csv_logger, wandb_logger, tensorboard_logger],
        callbacks=[EvaluationPlotsCallback(), DatasetStatisticsCallback()],
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp),
    )
    trainer.fit(module, datamodule)
    run_dir = Path(wandb_logger.experiment.dir).parent
    wandb.finish()
    tensorboard_logger.experiment.flush()
    with open(Path(csv_logger.log_dir) / "metrics.csv") as file:
        logged = [row for row in csv.DictReader(file)]
    return {
        "module": module,
        "datamodule": datamodule,
        "plots": Path(csv_logger.log_dir) / "plots",
        "logged": logged,
        "wandb_tables": run_dir / "files" / "media" / "table",
        "tensorboard": tensorboard_logger.log_dir,
    }


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path) as file:
        rows = list(csv.reader(file))
    return rows[0], rows[1:]


def last_logged(dashboard_fit, name: str) -> float:
    """The last value of ``name`` in the CSV logger's metrics.csv."""
    return float([row[name] for row in dashboard_fit["logged"] if row.get(name)][-1])


def test_run_folder_holds_every_chart_as_png_and_csv(dashboard_fit):
    for folder, names in (("val", VALIDATION_CHARTS), ("data", DATA_CHARTS)):
        for name in names:
            assert (dashboard_fit["plots"] / folder / f"{name}.png").stat().st_size > 1000, name
            assert (dashboard_fit["plots"] / folder / f"{name}.csv").is_file(), name
    assert (dashboard_fit["plots"] / "data" / "summary.csv").is_file()


def test_map50_from_the_pr_curve_points(dashboard_fit):
    metrics = dashboard_fit["module"].evaluation.metrics
    assert 0.1 < metrics["map_50"] < 0.95  # a curve with shape
    for name, stat, logged in (
        ("pr_curve_iou50", "map_50", "val/mAP50"),
        ("pr_curve_iou50_95", "map", "val/mAP"),
    ):
        columns, rows = read_csv(dashboard_fit["plots"] / "val" / f"{name}.csv")
        assert columns == ["recall", *CLASS_NAMES, "all"] and len(rows) == 101
        values = np.array(rows, dtype=np.float64)  # every class has objects in the validation images
        np.testing.assert_allclose(values[:, 0], np.linspace(0, 1, 101))
        per_class_ap = values[:, 1:-1].mean(axis=0)
        assert per_class_ap.mean() == pytest.approx(metrics[stat], abs=1e-12)
        assert values[:, -1].mean() == pytest.approx(metrics[stat], abs=1e-12)
        assert per_class_ap.mean() == pytest.approx(
            last_logged(dashboard_fit, logged), rel=1e-6
        )  # float32 log


def test_map50_from_the_wandb_pr_curve(dashboard_fit):
    tables = sorted(
        dashboard_fit["wandb_tables"].glob("val/pr_curve_iou50_table_*.table.json"),
        key=lambda path: int(path.name.rsplit("_", 2)[1]),  # <key>_table_<W&B step>_<hash>
    )
    assert len(tables) == EPOCHS
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["step", "lineKey", "lineVal"]  # W&B's line series: x, line, y
    curves = {}
    for recall, line, precision in table["data"]:
        curves.setdefault(line, []).append((recall, precision))
    assert list(curves) == [*CLASS_NAMES, "all"]
    per_class_ap = [np.mean([p for _, p in curves[name]]) for name in CLASS_NAMES]
    assert np.mean(per_class_ap) == pytest.approx(last_logged(dashboard_fit, "val/mAP50"), rel=1e-6)


def test_wandb_run_holds_every_chart(dashboard_fit):
    tables = dashboard_fit["wandb_tables"]
    for name in VALIDATION_CHARTS:
        assert len(list(tables.glob(f"val/{name}_table_*.table.json"))) == EPOCHS, name
    confusion = json.loads(next(tables.glob("val/confusion_matrix_table_*.table.json")).read_text())
    assert confusion["columns"] == ["Actual", "Predicted", "nPredictions"]
    assert len(confusion["data"]) == (len(CLASS_NAMES) + 1) ** 2
    ap = json.loads(next(tables.glob("val/ap_per_class_table_*.table.json")).read_text())
    assert [row[0] for row in ap["data"]] == list(CLASS_NAMES)
    assert list(tables.glob("data/instances_per_class_table_*.table.json"))
    assert list(tables.glob("data/summary_*.table.json"))


def test_tensorboard_log_holds_every_chart(dashboard_fit):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(dashboard_fit["tensorboard"], size_guidance={"images": 0})
    events.Reload()
    images = events.Tags()["images"]
    assert {f"val/{name}" for name in VALIDATION_CHARTS} <= set(images)
    assert {f"data/{name}" for name in DATA_CHARTS} <= set(images)
    assert len(events.Images("val/pr_curve_iou50")) == EPOCHS
    assert {"val/best_f1", "val/best_f1_confidence", "val/mAP50"} <= set(events.Tags()["scalars"])


def test_f1_curve_and_best_confidence(dashboard_fit):
    columns, rows = read_csv(dashboard_fit["plots"] / "val" / "f1_curve.csv")
    assert columns == ["confidence", *CLASS_NAMES, "all"]
    values = np.array(rows, dtype=np.float64)
    best = int(np.argmax(values[:, -1]))
    assert last_logged(dashboard_fit, "val/best_f1") == pytest.approx(values[best, -1], rel=1e-6)
    assert last_logged(dashboard_fit, "val/best_f1_confidence") == pytest.approx(values[best, 0], rel=1e-6)
    assert 0 < values[best, -1] < 1


def test_confusion_matrix_counts_every_object(dashboard_fit):
    annotations = json.loads((Path(dashboard_fit["datamodule"].annotation_file("validate"))).read_text())[
        "annotations"
    ]
    objects = [sum(a["category_id"] == k + 1 and not a["iscrowd"] for a in annotations) for k in range(5)]
    columns, rows = read_csv(dashboard_fit["plots"] / "val" / "confusion_matrix.csv")
    assert columns == ["true \\ predicted", *CLASS_NAMES, "background"]
    assert [row[0] for row in rows] == [*CLASS_NAMES, "background"]
    matrix = np.array([row[1:] for row in rows], dtype=np.int64)
    np.testing.assert_array_equal(matrix[:-1].sum(axis=1), objects)
    np.testing.assert_array_equal(matrix, dashboard_fit["module"].evaluation.metrics["confusion_matrix"])
    _, normalized = read_csv(dashboard_fit["plots"] / "val" / "confusion_matrix_normalized.csv")
    np.testing.assert_allclose(np.array([row[1:] for row in normalized], dtype=float)[:-1].sum(axis=1), 1.0)


def test_ap_per_class_chart(dashboard_fit):
    metrics = dashboard_fit["module"].evaluation.metrics
    columns, rows = read_csv(dashboard_fit["plots"] / "val" / "ap_per_class.csv")
    assert columns == ["class", "category_id", "AP50_95", "AP50"]
    assert [float(row[2]) for row in rows] == pytest.approx(
        [metrics["map_per_class"][k] for k in range(1, 6)]
    )


def test_dataset_statistics(dashboard_fit):
    datamodule = dashboard_fit["datamodule"]
    _, summary = read_csv(dashboard_fit["plots"] / "data" / "summary.csv")
    expected = []
    for split in ("train", "val"):
        index = datamodule.datasets[split].index
        counts = np.diff(index.box_starts)
        expected.append([split, len(index), int((counts == 0).sum()), len(index.labels), index.num_crowd])
    assert summary == [[str(value) for value in row] for row in expected]
    columns, instances = read_csv(dashboard_fit["plots"] / "data" / "instances_per_class.csv")
    assert columns == ["class", "train", "val"] and [row[0] for row in instances] == list(CLASS_NAMES)
    val_labels = datamodule.datasets["val"].index.labels
    assert [int(row[2]) for row in instances] == np.bincount(val_labels, minlength=5).tolist()
    _, histograms = read_csv(dashboard_fit["plots"] / "data" / "box_sizes.csv")
    for quantity in ("width", "height", "aspect"):
        assert sum(int(row[4]) for row in histograms if row[0] == quantity) == len(val_labels)


def test_model_summary_counts_flops(dashboard_fit):
    module = dashboard_fit["module"]
    assert tuple(module.example_input_array.shape) == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert summarize(module).total_flops > 1e8  # YOLOv8n at 128 px: about 0.35 GFLOPs
