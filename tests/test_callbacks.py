"""Experiment tracking: a real offline W&B run of a short fit holds the attention maps, prediction boxes and
COCO tables; the W&B logger falls back to offline mode; TensorBoard and PNG files get the images otherwise."""

import copy
import glob
import json
import logging
import os
import socket
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import wandb
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from sta_lightning.callbacks import AttentionMapsCallback, COCOMetricTableCallback, PredictionImagesCallback
from sta_lightning.callbacks.drawing import label_boundaries
from sta_lightning.callbacks.image_logging import log_images, run_folder
from sta_lightning.callbacks.prediction_images import wandb_box_group
from sta_lightning.data import AugmentConfig, DemoDataModule, LoaderConfig
from sta_lightning.metrics import STAT_NAMES
from sta_lightning.models import DetectorConfig, NMSConfig
from sta_lightning.plugins.loggers import OfflineFallbackWandbLogger, wandb_credentials_available
from sta_lightning.training.ema import EMAConfig
from sta_lightning.training.module import DetectionModule
from sta_lightning.training.optim import OptimizerConfig, WarmupConfig

IMAGE_SIZE = 96
NUM_SHOWN = 2  # images per callback
# Two super-token STA blocks: P3 (stride 8, 12x12 map, 4x4 cells: 3x3 grid), P4 (stride 16, 6x6, 2x2: 3x3).
DEMO_STA = [{"layer": 4, "stoken_size": (4, 4)}, {"layer": 6, "stoken_size": (2, 2)}]
BLOCKS = ("sta.layer4.0", "sta.layer6.0")
TOKENS_SHOWN = 4  # the corner-quarter tokens of a 3x3 grid: 4, 5, 7, 8
BOUNDARY_COLOR = (255, 255, 0)


def demo_datamodule(root: Path) -> DemoDataModule:
    return DemoDataModule(
        root=str(root),
        num_train=8,
        num_val=4,
        image_size=IMAGE_SIZE,
        loader=LoaderConfig(batch_size=4, num_workers=0),
        augment=AugmentConfig(mosaic=0.0),
    )


def demo_module(datamodule: DemoDataModule) -> DetectionModule:
    # nominal batch = batch size: one optimizer step per batch; ema.tau 1: the EMA lags far behind.
    return DetectionModule(
        detector=DetectorConfig("n", sta=DEMO_STA),
        classes=datamodule.classes,
        optimizer=OptimizerConfig(nominal_batch_size=4),
        warmup=WarmupConfig(epochs=0),
        ema=EMAConfig(tau=1.0),
    )


class RawWeights(L.Callback):
    """Keeps the detector's own (non-EMA) weights at each training epoch end, i.e. after its validation."""

    def on_train_epoch_end(self, trainer, pl_module):
        self.state = copy.deepcopy(pl_module.model.state_dict())


@pytest.fixture(scope="module")
def offline_fit(tmp_path_factory):
    """One 2-epoch fit with the offline W&B logger and the three callbacks; yields what the test needs."""
    tmp = tmp_path_factory.mktemp("tracking")
    datamodule = demo_datamodule(tmp / "demo")
    module = demo_module(datamodule)
    raw_weights = RawWeights()
    logger = OfflineFallbackWandbLogger(project="sta-test", save_dir=str(tmp))
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=logger,
        callbacks=[
            AttentionMapsCallback(num_images=NUM_SHOWN, every_n_epochs=2),
            PredictionImagesCallback(num_images=NUM_SHOWN, conf_threshold=0.0, max_det=20),
            COCOMetricTableCallback(),
            raw_weights,
        ],
        num_sanity_val_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp),
    )
    trainer.fit(module, datamodule)
    folder = run_folder(trainer)  # where PNG images or predictions of this run would go
    summary = dict(logger.experiment.summary)
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()
    samples = [datamodule.datasets["val"][i] for i in range(NUM_SHOWN)]
    yield {
        "run_dir": run_dir,
        "media": run_dir / "files" / "media",
        "module": module,
        "samples": samples,
        "raw_weights": raw_weights.state,
        "summary": summary,
        "root": tmp,
        "run_folder": folder,
        "run_id": logger.version,
    }


def test_exactly_one_offline_run(offline_fit):
    runs = list((offline_fit["root"] / "wandb").glob("*run-*"))
    assert [run.name for run in runs] == [offline_fit["run_dir"].name]
    assert offline_fit["run_dir"].name.startswith("offline-run-")
    assert len(list(offline_fit["run_dir"].glob("run-*.wandb"))) == 1


def test_run_folder_of_a_wandb_run_is_its_own(offline_fit):
    # The checkpoint folder's parent (ModelCheckpoint's rule), not the shared save_dir.
    assert offline_fit["run_folder"] == str(offline_fit["root"] / "sta-test" / offline_fit["run_id"])


def test_attention_map_images(offline_fit):
    sample_images = [sample["image"].permute(1, 2, 0).numpy() for sample in offline_fit["samples"]]
    for block in BLOCKS:
        # every_n_epochs=2: logged after the second epoch only (not the sanity check, not epoch 1)
        files = sorted(
            glob.glob(str(offline_fit["media"] / "images" / "val" / "attention" / f"{block}_*.png"))
        )
        assert len(files) == NUM_SHOWN, files
        matched = set()
        for file in files:
            panel = np.asarray(Image.open(file).convert("RGB"))
            assert panel.shape == (IMAGE_SIZE, IMAGE_SIZE * (1 + TOKENS_SHOWN), 3)
            hard_tile = panel[:, :IMAGE_SIZE]
            drawn = (hard_tile == BOUNDARY_COLOR).all(-1)
            assert drawn.any()
            # outside the boundary lines the tile is the letterboxed validation image itself
            for index, image in enumerate(sample_images):
                if (hard_tile[~drawn] == image[~drawn]).all():
                    matched.add(index)
            # heatmap tiles are the image with colour blended in, not the image itself
            assert (panel[:, IMAGE_SIZE:] != np.tile(hard_tile, (1, TOKENS_SHOWN, 1))).any()
        assert matched == set(range(NUM_SHOWN))


def _box_files(offline_fit) -> list[dict]:
    files = sorted(
        glob.glob(str(offline_fit["media"] / "metadata" / "boxes2D" / "val" / "predictions_*.json"))
    )
    return [json.loads(Path(file).read_text()) for file in files]


def _labelled_boxes(captions, boxes) -> tuple:
    """A comparable set: sorted (caption, x1, y1, x2, y2) rounded to 1e-3 pixel."""
    return tuple(sorted((caption, *np.round(box, 3)) for caption, box in zip(captions, boxes, strict=True)))


def test_prediction_boxes_ground_truth(offline_fit):
    names = offline_fit["module"].classes.names
    payloads = [p for p in _box_files(offline_fit) if not any("scores" in box for box in p["box_data"])]
    expected = {
        _labelled_boxes([names[int(label)] for label in s["labels"]], s["boxes"].tolist())
        for s in offline_fit["samples"]
    }
    found = {
        _labelled_boxes(
            [box["box_caption"] for box in p["box_data"]],
            [[box["position"][k] for k in ("minX", "minY", "maxX", "maxY")] for box in p["box_data"]],
        )
        for p in payloads
    }
    assert found == expected
    assert all(p["class_labels"] == {str(i): name for i, name in enumerate(names)} for p in payloads)


def test_prediction_boxes_come_from_the_validated_ema_weights(offline_fit):
    module = offline_fit["module"]
    predicted = [
        payload for payload in _box_files(offline_fit) if any("scores" in b for b in payload["box_data"])
    ]
    assert len(predicted) == 2 * NUM_SHOWN  # two epochs (identical payloads would have been stored once)
    logged = {tuple(b["scores"]["conf"] for b in payload["box_data"]) for payload in predicted}
    for payload in predicted:
        for box in payload["box_data"]:
            name, score = box["box_caption"].rsplit(" ", 1)
            assert name == module.classes.names[box["class_id"]] and score == f"{box['scores']['conf']:.2f}"

    images = torch.stack([sample["image"] for sample in offline_fit["samples"]])

    def scores(model_state=None):
        if model_state is not None:
            module.model.load_state_dict(model_state)
        detections = module.predict_batch(
            images, NMSConfig(conf_threshold=0.0, max_det=20, multi_label=False)
        )
        return {tuple(d[:, 4].tolist()) for d in detections}

    ema_scores = scores()  # after fit the module holds the EMA weights
    assert ema_scores <= logged
    assert not scores(offline_fit["raw_weights"]) & logged


def test_coco_metric_tables_and_best_map(offline_fit):
    module = offline_fit["module"]
    tables = offline_fit["media"] / "table" / "val"
    stat_tables = sorted(tables.glob("coco_[0-9]*.table.json"), key=lambda p: int(p.name.split("_")[1]))
    assert len(stat_tables) == 2  # one per epoch, none from the sanity check
    last = json.loads(stat_tables[-1].read_text())
    assert last["columns"] == ["metric", "description", "value"]
    assert [row[0] for row in last["data"]] == list(STAT_NAMES)
    assert [row[2] for row in last["data"]] == pytest.approx(
        [module.evaluation.metrics[name] for name in STAT_NAMES]
    )

    per_class = sorted(tables.glob("coco_per_class_*.table.json"), key=lambda p: int(p.name.split("_")[3]))
    rows = json.loads(per_class[-1].read_text())
    assert rows["columns"] == ["class_index", "category_id", "class", "AP"]
    assert [row[2] for row in rows["data"]] == module.classes.names
    assert [row[3] for row in rows["data"]] == pytest.approx(
        [module.evaluation.metrics["map_per_class"][cid] for cid in module.classes.category_ids]
    )
    maps = [json.loads(p.read_text())["data"][0][2] for p in stat_tables]
    assert offline_fit["summary"]["best/mAP"] == pytest.approx(max(maps))


def test_wandb_box_group_payload():
    boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0], [5.0, 6.0, 7.0, 8.0]])
    group = wandb_box_group(boxes, torch.tensor([1, 0]), torch.tensor([0.875, 0.25]), ["cat", "dog"])
    assert group["class_labels"] == {0: "cat", 1: "dog"}
    first = group["box_data"][0]
    assert first["position"] == {"minX": 1.0, "minY": 2.0, "maxX": 30.0, "maxY": 40.0}
    assert first["domain"] == "pixel" and first["class_id"] == 1
    assert first["box_caption"] == "dog 0.88" and first["scores"] == {"conf": 0.875}
    truth = wandb_box_group(boxes[:1], torch.tensor([0]), None, ["cat", "dog"])
    assert truth["box_data"][0]["box_caption"] == "cat" and "scores" not in truth["box_data"][0]
    wandb.Image(np.zeros((48, 48, 3), dtype=np.uint8), boxes={"predictions": group, "ground_truth": truth})


def _boxed_image():
    image = np.full((48, 64, 3), 90, dtype=np.uint8)
    boxes = {
        "predictions": wandb_box_group(
            torch.tensor([[4.0, 4.0, 30.0, 40.0]]), torch.tensor([0]), torch.tensor([0.9]), ["a"]
        ),
        "ground_truth": wandb_box_group(
            torch.tensor([[35.0, 10.0, 60.0, 44.0]]), torch.tensor([0]), None, ["a"]
        ),
    }
    return image, boxes


def test_png_files_without_image_logger(tmp_path):
    trainer = L.Trainer(logger=CSVLogger(tmp_path), accelerator="cpu", enable_progress_bar=False)
    image, boxes = _boxed_image()
    log_images(trainer, "val/predictions", [image], ["one"], [boxes])
    files = list((tmp_path / "lightning_logs" / "version_0" / "images" / "val" / "predictions").glob("*.png"))
    assert len(files) == 1
    saved = np.asarray(Image.open(files[0]))
    assert (saved[20, 4] == (0, 255, 0)).all()  # prediction: green left edge
    assert (saved[30, 60] == (255, 64, 64)).all()  # ground truth: red right edge
    assert (saved[25, 45] == 90).all()


def test_tensorboard_gets_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    trainer = L.Trainer(logger=logger, accelerator="cpu", enable_progress_bar=False)
    image, boxes = _boxed_image()
    labels = np.zeros((48, 64), dtype=np.int64)
    labels[:, 32:] = 1
    log_images(
        trainer,
        "val/attention/block",
        [image, np.where(label_boundaries(labels)[..., None], 255, image)],
        ["a", "b"],
    )
    log_images(trainer, "val/predictions", [image], ["p"], [boxes])
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == [
        "val/attention/block/0",
        "val/attention/block/1",
        "val/predictions/0",
    ]
    stored = events.Images("val/predictions/0")[0]
    assert (stored.width, stored.height) == (64, 48)


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    wandb.teardown()  # wandb reads the environment once per process setup
    yield
    wandb.teardown()


def test_credentials_detection(no_wandb_credentials, monkeypatch, tmp_path):
    assert not wandb_credentials_available()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")
    assert wandb_credentials_available()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a login for another server
    assert not wandb_credentials_available()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_credentials_available()


def test_offline_without_credentials_and_log_model_ignored(no_wandb_credentials, tmp_path, caplog):
    with pytest.warns(UserWarning, match="log_model"):
        logger = OfflineFallbackWandbLogger(project="sta-test", save_dir=str(tmp_path), log_model=True)
    assert logger.offline
    with caplog.at_level(logging.INFO):
        run = logger.experiment
    try:
        assert run.settings.mode == "offline" and os.environ.get("WANDB_MODE") is None
        logger.finalize("success")
    finally:
        wandb.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert f"wandb sync {run_dir}" in caplog.text


def test_unreachable_server_falls_back_to_offline(no_wandb_credentials, monkeypatch, tmp_path):
    # Fault injection: a key, but the server address refuses connections.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    logger = OfflineFallbackWandbLogger(project="sta-test", save_dir=str(tmp_path), init_timeout=2)
    assert not logger.offline
    with pytest.warns(UserWarning, match="unreachable"):
        run = logger.experiment
    try:
        assert logger.offline and run.settings.mode == "offline"
        run.log({"x": 1.0})
    finally:
        wandb.finish()
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
