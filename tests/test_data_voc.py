"""Pascal VOC datasets: the XML reader and its bad input, the box convention, the classes, difficult objects
as crowd regions (ignored by evaluation), and the same samples as the COCO path for the same data."""

import json
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from sta_lightning.data import (
    AnnotationError,
    COCODataModule,
    DataWarning,
    LoaderConfig,
    Split,
    VOCDataModule,
)
from sta_lightning.data.demo import DEMO_CLASS_NAMES, annotation_path, generate_demo_dataset
from sta_lightning.data.index_cache import CACHE_DIR_ENV
from sta_lightning.data.voc_format import VOC_CLASSES, read_voc, to_coco
from sta_lightning.metrics import evaluate_coco


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))


def voc_xml(filename: str, width: int, height: int, objects: list[tuple]) -> str:
    """A VOC annotation; objects are (name, xmin, ymin, xmax, ymax, difficult) in VOC's 1-based pixels."""
    parts = [f"<annotation><filename>{filename}</filename>"]
    parts.append(f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>")
    for name, xmin, ymin, xmax, ymax, difficult in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def write_voc_image(root: Path, image_id: str, width: int, height: int, objects: list[tuple]) -> None:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), np.full((height, width, 3), 90, np.uint8))
    (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", width, height, objects))


def write_set(root: Path, name: str, ids: list[str]) -> None:
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))


def demo_as_voc(demo: Path, root: Path) -> Path:
    """The demo's train and val splits as a VOC root (crowd regions as difficult objects)."""
    for split in ("train", "val"):
        document = json.loads(annotation_path(demo, split).read_text())
        names = {c["id"]: c["name"] for c in document["categories"]}
        ids = []
        for image in document["images"]:
            image_id = f"{split}_{Path(image['file_name']).stem}"
            (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
            shutil.copy(demo / split / image["file_name"], root / "JPEGImages" / f"{image_id}.jpg")
            objects = [
                (names[a["category_id"]], *map(repr, (a["bbox"][0] + 1, a["bbox"][1] + 1)),
                 *map(repr, (a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])), a["iscrowd"])
                for a in document["annotations"]
                if a["image_id"] == image["id"]
            ]  # fmt: skip
            (root / "Annotations").mkdir(parents=True, exist_ok=True)
            xml = voc_xml(f"{image_id}.jpg", image["width"], image["height"], objects)
            (root / "Annotations" / f"{image_id}.xml").write_text(xml)
            ids.append(image_id)
        write_set(root, split, ids)
    return root


def test_demo_as_voc_gives_the_samples_of_the_coco_path(tmp_path):
    demo = generate_demo_dataset(tmp_path / "demo", num_train=6, num_val=4, seed=3)
    root = demo_as_voc(demo, tmp_path / "VOC")
    loader = LoaderConfig(batch_size=2, num_workers=0)
    coco = COCODataModule(
        train=Split(str(demo / "train"), str(annotation_path(demo, "train"))),
        val=Split(str(demo / "val"), str(annotation_path(demo, "val"))),
        image_size=128,
        loader=loader,
    )
    voc = VOCDataModule(str(root), names=list(DEMO_CLASS_NAMES), image_size=128, loader=loader)
    assert voc.classes.names == coco.classes.names and voc.classes.category_ids == [0, 1, 2, 3, 4]
    for dm in (coco, voc):
        dm.setup("fit")
    for split in ("train", "val"):
        a, b = coco.datasets[split], voc.datasets[split]
        assert len(a) == len(b)
        for i in range(len(a)):
            boxes_a, labels_a = a.index.targets(i)
            boxes_b, labels_b = b.index.targets(i)
            np.testing.assert_allclose(boxes_b, boxes_a, atol=1e-4)
            np.testing.assert_array_equal(labels_b, labels_a)
    for i in range(4):
        sample_a, sample_b = coco.datasets["train"][i], voc.datasets["train"][i]
        assert torch.equal(sample_a["image"], sample_b["image"])
        torch.testing.assert_close(sample_b["boxes"], sample_a["boxes"], atol=1e-4, rtol=0)
    # predict without predict images: the test (here the val) split, with its image ids.
    voc.setup("predict")
    ids = [image["id"] for image in json.loads(Path(voc.annotation_file()).read_text())["images"]]
    assert voc.datasets["predict"].image_ids == ids


def test_box_convention_classes_and_sets(tmp_path):
    root = tmp_path / "VOC2007"
    write_voc_image(root, "a", 40, 30, [("dog", 1, 1, 40, 30, 0), ("person", 11, 6, 20, 15, 1)])
    write_voc_image(root, "b", 40, 30, [("cat", 5, 5, 10, 10, 0)])
    write_set(root, "trainval", ["a"])
    write_set(root, "test", ["b"])
    dataset = read_voc(root)
    assert list(dataset.sets) == ["trainval", "test"] and dataset.names == list(VOC_CLASSES)
    document = to_coco(dataset, "trainval")
    whole, difficult = document["annotations"]
    assert whole["bbox"] == [0, 0, 40, 30] and whole["area"] == 1200 and whole["iscrowd"] == 0
    assert difficult["bbox"] == [10, 5, 10, 10] and difficult["iscrowd"] == 1
    assert whole["category_id"] == VOC_CLASSES.index("dog")
    assert document["images"] == [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}]
    # Names outside the VOC classes: the names found, sorted.
    write_voc_image(root, "c", 40, 30, [("zebra", 1, 1, 4, 4, 0)])
    write_set(root, "val", ["c"])
    assert read_voc(root, ["val", "test"]).names == ["cat", "zebra"]


def test_difficult_objects_are_ignored_by_evaluation(tmp_path):
    root = tmp_path / "VOC"
    write_voc_image(root, "a", 64, 64, [("dog", 1, 1, 20, 20, 0), ("dog", 31, 31, 60, 60, 1)])
    write_set(root, "test", ["a"])
    document = to_coco(read_voc(root), "test")
    annotations, counted = tmp_path / "test.json", tmp_path / "counted.json"
    annotations.write_text(json.dumps(document))
    for annotation in document["annotations"]:
        annotation["iscrowd"] = 0
    counted.write_text(json.dumps(document))
    dog = VOC_CLASSES.index("dog")
    found = [1, 0, 0, 20, 20, 0.9, dog]  # image id, x, y, w, h, score, category
    on_difficult = [1, 30, 30, 30, 30, 0.95, dog]
    # The missed difficult object costs no recall; a detection on it is no false positive.
    assert evaluate_coco(annotations, np.array([found]))["map"] == pytest.approx(1.0)
    assert evaluate_coco(annotations, np.array([found, on_difficult]))["map"] == pytest.approx(1.0)
    assert evaluate_coco(counted, np.array([found]))["map"] < 0.6  # as an ordinary object it is missed


def test_bad_annotations_give_one_summary_warning(tmp_path):
    root = tmp_path / "VOC"
    write_voc_image(root, "good", 32, 32, [("dog", 2, 2, 10, 10, 0), ("dog", 6, 5, 5, 9, 0)])
    write_voc_image(root, "unknown", 32, 32, [("dog", 2, 2, 10, 10, 0), ("unicorn", 2, 2, 10, 10, 0)])
    write_voc_image(root, "nan", 32, 32, [("dog", 2, 2, 10, 10, 0)])
    xml = root / "Annotations" / "nan.xml"
    xml.write_text(xml.read_text().replace("<xmax>10</xmax>", "<xmax>ten</xmax>"))
    write_voc_image(root, "broken", 32, 32, [])
    (root / "Annotations" / "broken.xml").write_text("<annotation><size>")
    write_voc_image(root, "size", 32, 32, [("dog", 2, 2, 10, 10, 0)])
    cv2.imwrite(str(root / "JPEGImages" / "size.jpg"), np.zeros((20, 20, 3), np.uint8))
    write_voc_image(root, "noimage", 32, 32, [("dog", 2, 2, 10, 10, 0)])
    (root / "JPEGImages" / "noimage.jpg").unlink()
    write_set(root, "train", ["good", "unknown", "nan", "broken", "size", "noimage", "noxml"])
    dataset = read_voc(root, names=["dog", "cat"])
    with pytest.warns(DataWarning) as record:
        document = to_coco(dataset, "train")
    assert len(record) == 1
    message = str(record[0].message)
    assert "5 of 7 images left out and 2 objects removed" in message
    for kind in ("1 bad field", "1 malformed XML", "1 missing XML", "1 missing image", "1 unknown class"):
        assert kind in message, kind
    assert "1 image size differs from the XML" in message and "1 zero-size box" in message
    assert f"{xml}: <xmax> is 'ten', not a number" in message
    assert [image["file_name"] for image in document["images"]] == ["good.jpg", "unknown.jpg"]
    assert len(document["annotations"]) == 2


def test_root_and_set_errors_name_what_is_missing(tmp_path):
    with pytest.raises(AnnotationError, match="the folder Annotations/ is missing"):
        read_voc(tmp_path)
    root = tmp_path / "VOC"
    write_voc_image(root, "a", 8, 8, [])
    write_set(root, "train", ["a"])
    with pytest.raises(AnnotationError, match=r"image set 'test' not found \(.*test.txt is missing\)"):
        read_voc(root, ["train", "test"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert VOCDataModule(str(root), val_set="train", train_set=None).classes.names == list(VOC_CLASSES)
    assert not [w for w in record if issubclass(w.category, DataWarning)]  # a clean set: no data warning
