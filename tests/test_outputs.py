"""Outputs that score: ``test`` writes the COCO results that pycocotools scores to the logged metrics;
``predict`` with an annotation file writes its ids; EXIF-rotated images are read in the annotation's frame."""

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from detector_checkpoint import write_scoring_checkpoint
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sta_lightning.callbacks.prediction_writer import TEST_RESULTS_FILE
from sta_lightning.cli import main
from sta_lightning.data import DataWarning, DemoDataModule
from sta_lightning.data.coco_index import load_coco_index
from sta_lightning.data.dataset import COCODetectionDataset, ImageFolderDataset
from sta_lightning.data.demo import annotation_path
from sta_lightning.metrics import COCO_STATS

IMAGE_SIZE = 128
EXIF_ORIENTATION = 0x0112
COMMON = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--data.loader.num_workers=0"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("outputs")
    DemoDataModule(root=str(root / "demo"), num_train=4, num_val=7).prepare_data()
    return {
        "root": root,
        "val_images": root / "demo" / "val",
        "val_annotations": annotation_path(root / "demo", "val"),
        "checkpoint": write_scoring_checkpoint(root / "model.ckpt"),
    }


def csv_logger(save_dir: Path) -> str:
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(save_dir)}}
    return f"--trainer.logger={json.dumps(logger)}"


def pycocotools_stats(annotation_file: Path, results_file: Path) -> np.ndarray:
    truth = COCO(str(annotation_file))
    evaluation = COCOeval(truth, truth.loadRes(json.loads(results_file.read_text())), iouType="bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return evaluation.stats


def run_test(checkpoint: Path, data: list[str], run: Path) -> tuple[Path, dict[str, float]]:
    """``test`` through the CLI; returns (test_results.json, the logged test metrics)."""
    cli = main(["test", f"--ckpt_path={checkpoint}", *COMMON, *data, csv_logger(run)])
    log_dir = Path(cli.trainer.log_dir)
    with open(log_dir / "metrics.csv") as file:
        (row,) = list(csv.DictReader(file))
    return log_dir / TEST_RESULTS_FILE, {key: float(value) for key, value in row.items() if value}


@pytest.mark.parametrize("rect", [False, True], ids=["square", "rect"])
def test_test_writes_coco_results_that_pycocotools_scores_to_the_logged_metrics(demo, rect):
    # Square letterboxes, or rect batches (each batch letterboxed to its own shape): the same scoring.
    data = ["--data=sta_lightning.data.DemoDataModule", f"--data.root={demo['root'] / 'demo'}"]
    data += [
        "--data.num_train=4",
        "--data.num_val=7",
        f"--data.image_size={IMAGE_SIZE}",
        "--data.loader.batch_size=2",
        f"--data.loader.rect={str(rect).lower()}",
    ]
    results_file, logged = run_test(demo["checkpoint"], data, demo["root"] / f"test_run_{rect}")
    results = json.loads(results_file.read_text())
    truth = json.loads(demo["val_annotations"].read_text())
    assert {r["image_id"] for r in results} <= {image["id"] for image in truth["images"]}
    assert {r["category_id"] for r in results} <= {category["id"] for category in truth["categories"]}
    stats = pycocotools_stats(demo["val_annotations"], results_file)
    assert logged["test/mAP50"] > 0
    assert stats == pytest.approx([logged[f"test/{stat.logged}"] for stat in COCO_STATS], abs=1e-6)


@pytest.mark.slow
def test_test_results_on_real_coco_images_score_to_the_logged_metrics(shared_data, tmp_path):
    coco = shared_data / "coco-tiny-val2017"
    annotations = coco / "annotations" / "instances_val2017.json"
    checkpoint = write_scoring_checkpoint(tmp_path / "coco80.ckpt", num_classes=80)
    data = ["--data=sta_lightning.data.COCODataModule", f"--data.val.images={coco / 'val2017'}"]
    data += [f"--data.val.annotations={annotations}", "--data.image_size=320", "--data.loader.batch_size=8"]
    results_file, logged = run_test(checkpoint, data, tmp_path / "run")
    results = json.loads(results_file.read_text())
    assert results and {r["category_id"] for r in results} <= set(COCO(str(annotations)).getCatIds())
    stats = pycocotools_stats(annotations, results_file)
    assert stats == pytest.approx([logged[f"test/{stat.logged}"] for stat in COCO_STATS], abs=1e-6)


def test_predict_with_an_annotation_file_writes_its_image_ids(demo, tmp_path):
    listing = json.loads(demo["val_annotations"].read_text())
    for image in listing["images"]:
        image["id"] = 1000 + 7 * image["id"]  # ids unlike running indices
    del listing["annotations"]  # an image info file, as COCO's test-dev list
    listing["images"].append({"id": 5, "file_name": "absent.jpg", "height": 300, "width": 400})
    listing_file = tmp_path / "to_predict.json"
    listing_file.write_text(json.dumps(listing))

    arguments = ["predict", f"--ckpt_path={demo['checkpoint']}", *COMMON, "--trainer.logger=false"]
    arguments += ["--data=sta_lightning.data.COCODataModule", f"--data.predict.images={demo['val_images']}"]
    arguments += [f"--data.predict.annotations={listing_file}", f"--data.image_size={IMAGE_SIZE}"]
    arguments += ["--model.predict_nms.conf_threshold=0.01", f"--prediction.output_dir={tmp_path / 'out'}"]
    with pytest.warns(DataWarning, match=r"1 of 8 images .* missing.*absent\.jpg \(missing\)"):
        main(arguments)
    images = json.loads((tmp_path / "out" / "images.json").read_text())
    listed = {image["id"]: image for image in listing["images"][:-1]}
    assert [image["id"] for image in images["images"]] == sorted(listed)
    for image in images["images"]:
        assert (image["height"], image["width"]) == (
            listed[image["id"]]["height"],
            listed[image["id"]]["width"],
        )
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert predictions and {p["image_id"] for p in predictions} <= set(listed)
    assert {p["category_id"] for p in predictions} <= {c["id"] for c in listing["categories"]}


def exif_rotated_copy(demo: dict, folder: Path) -> tuple[str, tuple[int, int]]:
    """Copy the demo val images to ``folder``, the first non-square one re-encoded by PIL with its pixels
    turned 90 degrees counter-clockwise and EXIF orientation 6 (turn clockwise to view), so that its viewed
    image is the original one. Returns its file name and original (h, w)."""
    folder.mkdir()
    chosen = None
    for path in sorted(demo["val_images"].glob("*.jpg")):
        image = Image.open(path)
        if chosen is None and image.width != image.height:
            chosen = (path.name, (image.height, image.width))
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = 6
            image.rotate(90, expand=True).save(folder / path.name, quality=100, exif=exif)
        else:
            (folder / path.name).write_bytes(path.read_bytes())
    return chosen


def test_exif_rotated_images_are_read_in_the_annotation_frame(demo, tmp_path):
    name, (height, width) = exif_rotated_copy(demo, tmp_path / "rotated")
    original = load_coco_index(demo["val_annotations"], demo["val_images"])
    i = list(original.file_names).index(name)

    # The annotation (COCO's val json, made on the viewed image) has the EXIF-oriented size: read that view.
    rotated = load_coco_index(demo["val_annotations"], tmp_path / "rotated")
    assert len(rotated) == len(original) and rotated.exif_oriented.tolist() == [
        k == i for k in range(len(original))
    ]
    seen, expected = (
        COCODetectionDataset(rotated, IMAGE_SIZE)[i],
        COCODetectionDataset(original, IMAGE_SIZE)[i],
    )
    assert seen["orig_size"] == (height, width) and np.array_equal(seen["boxes"], expected["boxes"])
    assert np.abs(seen["image"].float() - expected["image"].float()).mean() < 3  # JPEG re-encoding only

    # An annotation of the stored pixels (width and height swapped, boxes turned with them): read as stored.
    stored = copy.deepcopy(json.loads(demo["val_annotations"].read_text()))
    image_id = int(original.image_ids[i])
    for image in stored["images"]:
        if image["id"] == image_id:
            image["height"], image["width"] = width, height
    for annotation in stored["annotations"]:
        if annotation["image_id"] == image_id:
            x, y, w, h = annotation["bbox"]
            annotation["bbox"] = [y, width - x - w, h, w]  # (x, y) -> (y, width - x) under the CCW turn
    stored_file = tmp_path / "stored.json"
    stored_file.write_text(json.dumps(stored))
    as_stored = load_coco_index(stored_file, tmp_path / "rotated")
    assert not as_stored.exif_oriented.any()
    sample = COCODetectionDataset(as_stored, IMAGE_SIZE)[i]
    assert sample["orig_size"] == (width, height)
    turned = np.rot90(expected["image"].numpy(), k=1, axes=(1, 2))  # the letterboxed view, turned CCW
    assert np.abs(sample["image"].float().numpy() - turned).mean() < 3

    # Prediction without an annotation file: the EXIF-oriented view, as a viewer shows it.
    bare = ImageFolderDataset([tmp_path / "rotated" / name], IMAGE_SIZE)[0]
    assert bare["orig_size"] == (height, width)
    assert np.abs(bare["image"].float() - expected["image"].float()).mean() < 3
