"""COCO loading on real data (counts, categories, crowd, empty images, letterbox round trip); bad input on
damaged copies of real and generated data."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from sta_lightning.data import (
    AnnotationError,
    COCODataModule,
    DataWarning,
    LoaderConfig,
    PredictSource,
    Split,
)
from sta_lightning.data import coco_index as coco_index_module
from sta_lightning.data.coco_index import load_coco_index
from sta_lightning.data.demo import annotation_path, generate_demo_dataset
from sta_lightning.data.index_cache import CACHE_DIR_ENV
from sta_lightning.geometry import boxes_to_original

COCO128 = ("coco128/train2017", "coco128/annotations/instances_train2017.json")
TINY_VAL = ("coco-tiny-val2017/val2017", "coco-tiny-val2017/annotations/instances_val2017.json")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))


@pytest.mark.parametrize(
    ("split", "images", "annotations", "crowd"), [(COCO128, 128, 939, 10), (TINY_VAL, 80, 815, 11)]
)
def test_real_counts_categories_and_crowd(shared_data, split, images, annotations, crowd):
    image_dir, annotation_file = (shared_data / p for p in split)
    index = load_coco_index(annotation_file, image_dir)
    reference = COCO(str(annotation_file))
    assert (index.num_listed_images, len(index)) == (images, images)
    assert (len(index.boxes) + index.num_crowd, index.num_crowd) == (annotations, crowd)
    category_ids = sorted(reference.getCatIds())
    assert list(index.category_ids) == category_ids and len(category_ids) == 80
    assert category_ids[0] == 1 and category_ids[-1] == 90  # ids with gaps map to 0..79
    assert list(index.class_names) == [c["name"] for c in reference.loadCats(category_ids)]
    for i, image_id in enumerate(index.image_ids):
        boxes, labels = index.targets(i)
        expected = [a for a in reference.imgToAnns[int(image_id)] if not a["iscrowd"]]
        assert len(boxes) == len(expected)  # crowd regions are never targets
        expected_boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in expected)])
        np.testing.assert_allclose(boxes, expected_boxes.reshape(-1, 4), atol=1e-3)
        assert [index.category_ids[k] for k in labels] == [a["category_id"] for a in expected]
        assert labels.dtype == np.int64


def test_letterbox_round_trip_and_empty_images(shared_data):
    image_dir, annotation_file = (str(shared_data / p) for p in COCO128)
    dm = COCODataModule(
        val=Split(image_dir, annotation_file),
        image_size=320,
        loader=LoaderConfig(batch_size=64, num_workers=0),
    )
    classes = dm.classes
    assert (
        classes.num_classes == 80 and classes.category_ids[:3] == [1, 2, 3] and classes.names[0] == "person"
    )
    dm.setup("validate")
    reference = COCO(annotation_file)
    seen, empty = 0, 0
    for batch in dm.val_dataloader():
        assert batch["images"].dtype == torch.uint8 and batch["images"].shape[1:] == (3, 320, 320)
        for b, image_id in enumerate(batch["image_ids"].tolist()):
            info = reference.imgs[image_id]
            assert batch["orig_sizes"][b].tolist() == [info["height"], info["width"]]
            assert batch["ratios"][b].item() == pytest.approx(320 / max(info["height"], info["width"]))
            pad_x, pad_y = batch["pads"][b].long().tolist()
            assert (batch["images"][b, :, :pad_y, :] == 114).all() and (
                batch["images"][b, :, :, :pad_x] == 114
            ).all()
            boxes = batch["bboxes"][batch["batch_idx"] == b]
            back = boxes_to_original(boxes, batch["ratios"][b], batch["pads"][b], batch["orig_sizes"][b])
            expected = [a["bbox"] for a in reference.imgToAnns[image_id] if not a["iscrowd"]]
            expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in expected]).reshape(-1, 4)
            assert torch.allclose(back, expected.float(), atol=1.0)
            empty += len(boxes) == 0
            seen += 1
    assert seen == 128 and empty == 2  # images 250 and 508 have no annotation
    assert sorted(dm.datasets["val"].index.image_ids.tolist()) == sorted(reference.getImgIds())
    assert dm.annotation_file("validate") == annotation_file and dm.annotation_file("test") == annotation_file


def test_boxes_to_original_numpy_and_clipping():
    boxes = np.array([[10.0, 20.0, 50.0, 60.0], [-5.0, 0.0, 400.0, 30.0]], dtype=np.float32)
    back = boxes_to_original(boxes, 0.5, (4.0, 10.0), (100, 150))
    assert isinstance(back, np.ndarray)
    np.testing.assert_allclose(back, [[12.0, 20.0, 92.0, 100.0], [0.0, 0.0, 150.0, 40.0]])


@pytest.fixture(scope="module", params=["coco128", "demo"])
def source(request, tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, annotation file) of a COCO-format split that the bad-input tests damage copies of: real
    coco128 JPEGs when ../shared/data is present, and always 12 generated demo images."""
    if request.param == "coco128":
        shared_data = request.getfixturevalue("shared_data")
        return shared_data / COCO128[0], shared_data / COCO128[1]
    root = generate_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=12, num_val=1)
    return root / "train", annotation_path(root, "train")


def _small_copy(source: tuple[Path, Path], root: Path, count: int = 12) -> tuple[Path, Path, dict]:
    """The first ``count`` images of ``source`` and their annotations, copied to ``root``."""
    source_images, source_annotations = source
    data = json.loads(source_annotations.read_text())
    data["images"] = data["images"][:count]
    kept = {image["id"] for image in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    for image in data["images"]:
        shutil.copy(source_images / image["file_name"], image_dir)
    annotation_file = root / "instances.json"
    annotation_file.write_text(json.dumps(data))
    return image_dir, annotation_file, data


def test_bad_images_are_left_out_with_one_warning(source, tmp_path, monkeypatch):
    image_dir, annotation_file, data = _small_copy(source, tmp_path)
    truncated, missing = data["images"][2], data["images"][5]
    jpeg = (image_dir / truncated["file_name"]).read_bytes()
    (image_dir / truncated["file_name"]).write_bytes(jpeg[: len(jpeg) // 2])
    (image_dir / missing["file_name"]).unlink()

    with pytest.warns(DataWarning) as record:
        dm = COCODataModule(
            train=Split(str(image_dir), str(annotation_file)),
            image_size=256,
            loader=LoaderConfig(batch_size=4, num_workers=0),
        )
        dm.setup("fit")
    [message] = [str(w.message) for w in record]
    assert "instances.json: 2 of 12 images" in message
    assert "evaluation covers the remaining 10 images" in message
    assert f"{truncated['file_name']} (corrupt" in message and f"{missing['file_name']} (missing)" in message
    ids = set(dm.datasets["train"].index.image_ids.tolist())
    assert len(ids) == 10 and truncated["id"] not in ids and missing["id"] not in ids
    batch = next(iter(dm.train_dataloader()))  # training goes on
    assert batch["images"].shape == (4, 3, 256, 256)

    # The scan is cached: a second load does not look at the images again, and still warns.
    def no_scan(*args, **kwargs):
        raise AssertionError("images scanned again")

    monkeypatch.setattr(coco_index_module, "scan_images", no_scan)
    with pytest.warns(DataWarning, match="2 of 12 images"):
        assert len(load_coco_index(annotation_file, image_dir)) == 10
    annotation_file.write_text(annotation_file.read_text() + "\n")  # a changed file invalidates the cache
    with pytest.raises(AssertionError, match="images scanned again"):
        load_coco_index(annotation_file, image_dir)


def test_bad_boxes_are_dropped_or_clipped_with_one_warning(source, tmp_path):
    image_dir, annotation_file, data = _small_copy(source, tmp_path, count=3)
    first = data["images"][0]
    bad = [[10, 10, 0, 5], [10, 10, -3, 5], [float("nan"), 1, 2, 3], [first["width"] + 5, 1, 10, 10]]
    template = next(a for a in data["annotations"] if not a["iscrowd"])
    for k, bbox in enumerate([*bad, [first["width"] - 20, 5, 70, 30]]):
        data["annotations"].append({**template, "id": 10_000 + k, "image_id": first["id"], "bbox": bbox})
    annotation_file.write_text(json.dumps(data))
    with pytest.warns(DataWarning) as record:
        index = load_coco_index(annotation_file, image_dir)
    [message] = [str(w.message) for w in record]
    assert (
        "4 boxes with non-positive or non-finite sides or wholly outside their image were dropped" in message
    )
    assert "1 boxes reaching outside their image were clipped" in message
    assert "annotation 10000 bbox [10, 10, 0, 5]" in message
    boxes, _ = index.targets(0)
    assert boxes[-1].tolist() == [first["width"] - 20, 5, first["width"], 35]
    assert (
        len(boxes) == sum(a["image_id"] == first["id"] and not a["iscrowd"] for a in data["annotations"]) - 4
    )


@pytest.mark.parametrize(
    ("damage", "error", "expected"),
    [
        (lambda d: "{not json", AnnotationError, "not valid JSON"),
        (lambda d: {k: v for k, v in d.items() if k != "images"}, AnnotationError, "'images'"),
        (lambda d: {**d, "annotations": {}}, AnnotationError, "top-level 'annotations' must be a list"),
        (lambda d: {**d, "categories": {}}, AnnotationError, "top-level 'categories' must be a list"),
        (lambda d: d["images"][1].update(width="640") or d, AnnotationError, "images[1] field 'width'"),
        (
            lambda d: d["annotations"][0].update(bbox="abc") or d,
            AnnotationError,
            "field 'bbox' must be a list",
        ),
        (lambda d: d["annotations"][0].pop("image_id") and d, AnnotationError, "has no 'image_id' field"),
        (lambda d: d["annotations"][0].update(category_id=999) or d, AnnotationError, "category_id 999"),
    ],
)
def test_malformed_annotation_file_errors_name_file_and_field(source, tmp_path, damage, error, expected):
    image_dir, annotation_file, data = _small_copy(source, tmp_path, count=3)
    damaged = damage(data)
    annotation_file.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    with pytest.raises(error) as raised:
        load_coco_index(annotation_file, image_dir)
    assert str(annotation_file) in str(raised.value) and expected in str(raised.value)
    if "999" in expected:
        assert f"annotation {data['annotations'][0]['id']} has category_id 999" in str(raised.value)


def test_missing_files_and_stages_without_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        COCODataModule(val=Split(str(tmp_path), str(tmp_path / "nowhere.json")))
    dm = COCODataModule(predict=PredictSource(str(tmp_path / "no_such_folder")))
    with pytest.raises(RuntimeError, match="no annotation file"):
        _ = dm.classes
    with pytest.raises(ValueError, match=r"'fit' needs the data's train split \(images and annotations\)"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="'validate' needs the data's val split"):
        dm.setup("validate")
    with pytest.raises(ValueError, match=r"'test' needs the data's test \(or val\) split"):
        dm.setup("test")
    with pytest.raises(ValueError, match="'predict' needs data.predict.images"):
        COCODataModule().setup("predict")
    with pytest.raises(ValueError, match="data.image_size: the input size must be a positive multiple of 32"):
        COCODataModule(image_size=100)


def test_predict_folder_skips_corrupt_files(source, tmp_path):
    folder = tmp_path / "predict"
    folder.mkdir()
    sources = sorted(source[0].glob("*.jpg"))[:3]
    for source in sources:
        shutil.copy(source, folder)
    (folder / "broken.jpg").write_bytes(b"not an image")
    dm = COCODataModule(
        predict=PredictSource(str(folder)), image_size=320, loader=LoaderConfig(batch_size=8, num_workers=0)
    )
    with pytest.warns(DataWarning, match=r"1 of 4 images to predict .*broken\.jpg \(corrupt"):
        dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["images"].shape == (3, 3, 320, 320) and batch["image_ids"].tolist() == [0, 1, 2]
    assert batch["paths"] == [str(folder / s.name) for s in sources]
    assert batch["ratios"].tolist() == pytest.approx(
        [320 / max(h, w) for h, w in batch["orig_sizes"].tolist()]
    )


def test_category_names_that_differ_between_splits_warn(source, tmp_path):
    image_dir, train_file, data = _small_copy(source, tmp_path, count=3)
    data["categories"][0]["name"] = "renamed"
    val_file = tmp_path / "renamed.json"
    val_file.write_text(json.dumps(data))
    dm = COCODataModule(
        train=Split(str(image_dir), str(train_file)),
        val=Split(str(image_dir), str(val_file)),
        loader=LoaderConfig(num_workers=0),
    )
    # The classes come from the validation file (the first one read); the training file is the odd one out.
    expected = r"instances.json: the same category ids carry other names .* annotation file given \['renamed'"
    with pytest.warns(DataWarning, match=expected):
        dm.setup("fit")


def test_an_image_info_file_as_evaluation_split_warns_that_nothing_is_annotated(source, tmp_path):
    # An image info file (no "annotations", as COCO's test-dev list) is for predict; given as the split to
    # validate, it loads but is named in a warning instead of silently scoring nothing.
    image_dir, annotation_file, data = _small_copy(source, tmp_path, count=3)
    del data["annotations"]
    info_file = tmp_path / "image_info.json"
    info_file.write_text(json.dumps(data))
    dm = COCODataModule(val=Split(str(image_dir), str(info_file)), loader=LoaderConfig(num_workers=0))
    expected = r"image_info\.json: no object is annotated, so 'validate' has nothing"
    with pytest.warns(DataWarning, match=expected):
        dm.setup("validate")
    assert len(dm.datasets["val"]) == 3


def test_prepare_data_scans_once_so_setup_reads_the_cache(source, tmp_path, monkeypatch):
    image_dir, annotation_file, _ = _small_copy(source, tmp_path, count=4)
    split = Split(str(image_dir), str(annotation_file))
    dm = COCODataModule(train=split, val=split, loader=LoaderConfig(num_workers=0))
    dm.prepare_data()  # Lightning: local rank 0 of each node, before every rank's setup

    def no_scan(*args, **kwargs):
        raise AssertionError("images scanned again")

    monkeypatch.setattr(coco_index_module, "scan_images", no_scan)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == len(dm.datasets["val"]) == 4
