"""YOLO-format datasets: data.yaml rules, label parsing and its bad input, the same samples as the COCO
path for the same data, a CLI fit, and (with ultralytics importable) the reference's labels."""

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from sta_lightning.cli import main
from sta_lightning.data import (
    AnnotationError,
    COCODataModule,
    DataWarning,
    LoaderConfig,
    Split,
    YOLODataModule,
)
from sta_lightning.data.demo import annotation_path, generate_demo_dataset
from sta_lightning.data.index_cache import CACHE_DIR_ENV
from sta_lightning.data.yolo_format import label_path, read_data_yaml, read_labels, to_coco, write_split

NAMES = ["a", "b", "c"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))


def write_image(path: Path, width: int = 64, height: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), 127, np.uint8))
    return path


def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def demo_as_yolo(demo: Path, root: Path) -> Path:
    """The demo dataset's train and val splits in YOLO layout under ``root`` (``convert``'s writer; crowd
    regions left out)."""
    for split in ("train", "val"):
        write_split(annotation_path(demo, split), demo / split, root, split, copy=True)
    return root / "data.yaml"


def test_demo_in_yolo_layout_gives_the_samples_of_the_coco_path(tmp_path):
    demo = generate_demo_dataset(tmp_path / "demo", num_train=6, num_val=4, seed=3)
    data_yaml = demo_as_yolo(demo, tmp_path / "yolo")
    loader = LoaderConfig(batch_size=2, num_workers=0)
    coco = COCODataModule(
        train=Split(str(demo / "train"), str(annotation_path(demo, "train"))),
        val=Split(str(demo / "val"), str(annotation_path(demo, "val"))),
        image_size=128,
        loader=loader,
    )
    yolo = YOLODataModule(str(data_yaml), image_size=128, loader=loader)
    assert yolo.classes.names == coco.classes.names and yolo.classes.category_ids == [0, 1, 2, 3, 4]
    for dm in (coco, yolo):
        dm.setup("fit")
    for split in ("train", "val"):
        a, b = coco.datasets[split], yolo.datasets[split]
        assert len(a) == len(b)
        for i in range(len(a)):
            boxes_a, labels_a = a.index.targets(i)
            boxes_b, labels_b = b.index.targets(i)
            np.testing.assert_allclose(boxes_b, boxes_a, atol=1e-4)
            np.testing.assert_array_equal(labels_b, labels_a)
            assert tuple(b.index.sizes[i]) == tuple(a.index.sizes[i])
    for i in range(4):
        sample_a, sample_b = coco.datasets["train"][i], yolo.datasets["train"][i]
        assert torch.equal(sample_a["image"], sample_b["image"])
        torch.testing.assert_close(sample_b["boxes"], sample_a["boxes"], atol=1e-4, rtol=0)
        assert torch.equal(sample_a["labels"], sample_b["labels"])
    # A second datamodule of unchanged files re-uses the converted json.
    assert YOLODataModule(str(data_yaml)).annotation_file("validate") == yolo.annotation_file("validate")


def test_data_yaml_paths_lists_and_names(tmp_path):
    root = tmp_path / "set"
    a = write_image(root / "images" / "a" / "1.jpg")
    b = write_image(root / "images" / "b" / "sub" / "2.png")
    c = write_image(root / "other" / "images" / "3.jpg")
    (root / "val.txt").write_text(f"./images/a/1.jpg\n{c}\n\n")
    yaml_file = write_yaml(
        tmp_path / "cfg" / "data.yaml",
        "path: ../set\ntrain: [images/a, images/b]\nval: val.txt\nnames: {0: x, 1: y}\nnc: 2\n",
    )
    dataset = read_data_yaml(yaml_file)
    assert dataset.root == root.resolve() and dataset.names == ["x", "y"]
    assert dataset.splits["train"] == sorted([a.resolve(), b.resolve()])
    assert dataset.splits["val"] == sorted([a.resolve(), c.resolve()])
    assert label_path(c) == root / "other" / "labels" / "3.txt"
    assert label_path(Path("/d/images/x/images/y.png")) == Path("/d/images/x/labels/y.txt")
    # No 'path': the YAML's folder.
    assert read_data_yaml(write_yaml(root / "d2.yaml", "val: images/a\nnames: [x]\n")).root == root.resolve()
    # As the reference: './' lines are relative to the list's folder; 'nc' alone names the classes;
    # 'validation' is 'val'.
    d = write_image(root / "lists" / "x" / "4.jpg")
    (root / "lists" / "v.txt").write_text("./x/4.jpg\n")
    dataset = read_data_yaml(write_yaml(root / "d3.yaml", "validation: lists/v.txt\nnc: 2\n"))
    assert dataset.splits == {"val": [d.resolve()]} and dataset.names == ["class_0", "class_1"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("val: images\nnames: [x, y]\nnc: 3\n", "key 'nc' is 3 but 'names' has 2 names"),
        ("val: images\n", "missing the key 'names'"),
        ("names: [x]\n", "missing the keys 'train' and 'val'"),
        ("val: nowhere\nnames: [x]\n", "key 'val': {root}/nowhere does not exist"),
        ("val: images\nnames: {0: x, 2: y}\n", "key 'names' as a dict needs the indices 0..1"),
    ],
)
def test_data_yaml_errors_name_the_file_and_key(tmp_path, text, message):
    write_image(tmp_path / "images" / "1.jpg")
    yaml_file = write_yaml(tmp_path / "data.yaml", text)
    with pytest.raises(AnnotationError) as error:
        read_data_yaml(yaml_file)
    assert str(error.value).startswith(f"{yaml_file.resolve()}: ")
    assert message.format(root=tmp_path.resolve()) in str(error.value)


def test_missing_data_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.yaml not found"):
        read_data_yaml(tmp_path / "none.yaml")


# Label files of the bad-input test: (content, whether the image is kept).
LABELS = {
    "box": ("0 0.5 0.5 0.25 0.5\n2 0.25 0.25 0.1 0.1\n", True),
    "polygon": ("1 0.1 0.2 0.5 0.2 0.3 0.6\n", True),
    "empty": ("", True),
    "duplicate": ("0 0.5 0.5 0.25 0.5\n0 0.5 0.5 0.25 0.5\n1 0.5 0.5 0.1 0.1\n", True),
    "fields": ("0 0.5 0.5 0.25 0.5\n0 0.5 0.5 0.25\n", False),
    "number": ("0 0.5 0.5 0.25 x\n", False),
    "class": ("3 0.5 0.5 0.25 0.5\n", False),
    "negative_class": ("-1 0.5 0.5 0.25 0.5\n", False),
    "beyond": ("0 0.5 0.5 1.25 0.5\n", False),
    "negative": ("0 0.5 -0.1 0.25 0.5\n", False),
    # The reference's edge cases: float32 rounding, a 1-point polygon, 3 fields outside a polygon file.
    "rounding": ("0 0.5 0.5 1.00000004 0.5\n0 0.5 0.5 0.25 0.5\n0 0.50000001 0.5 0.25 0.5\n", True),
    "point": ("1 0.1 0.2 0.5 0.2 0.3 0.6\n0 0.5 0.5\n", True),
    "three": ("0 0.5 0.5\n", False),
}


def labelled_dataset(root: Path) -> Path:
    for name, (content, _) in LABELS.items():
        label_path(write_image(root / "images" / f"{name}.jpg")).parent.mkdir(parents=True, exist_ok=True)
        label_path(root / "images" / f"{name}.jpg").write_text(content)
    write_image(root / "images" / "missing.jpg")  # no label file: no objects
    label_path(write_image(root / "images" / "tiny.jpg", 9, 30)).write_text("0 0.5 0.5 0.5 0.5\n")  # dropped
    write_image(root / "images" / ".hidden" / "h.jpg")  # not listed, as the reference's glob skips it
    write_image(root / "images" / "._h.jpg")
    return write_yaml(root / "data.yaml", f"train: images\nval: images\nnames: {NAMES}\n")


def test_labels_kept_and_dropped_with_one_summary_warning(tmp_path):
    dataset = read_data_yaml(labelled_dataset(tmp_path))
    with pytest.warns(DataWarning) as record:
        document = to_coco(dataset, "val")
    assert len(record) == 1
    message = str(record[0].message)
    assert "8 of 15 images dropped and 3 label lines removed" in message
    assert "1 image under 10 px" in message and "1 zero-size box" in message and "2 duplicate line" in message
    assert f"{tmp_path / 'labels' / 'beyond.txt'}:1" in message  # sorted first of the dropped images
    assert f"{tmp_path / 'labels' / 'class.txt'}:1: class 3 outside 0..2" in message
    assert "2 wrong field count" in message and "1 non-number" in message
    kept = {image["file_name"]: image["id"] for image in document["images"]}
    assert sorted(kept) == sorted(
        [f"images/{n}.jpg" for n, (_, ok) in LABELS.items() if ok] + ["images/missing.jpg"]
    )
    boxes = {
        name: sorted((a["category_id"], *a["bbox"]) for a in document["annotations"] if a["image_id"] == i)
        for name, i in kept.items()
    }
    assert boxes["images/empty.jpg"] == boxes["images/missing.jpg"] == []
    np.testing.assert_allclose(
        boxes["images/duplicate.jpg"], [(0, 24, 12, 16, 24), (1, 28.8, 21.6, 6.4, 4.8)]
    )
    np.testing.assert_allclose(boxes["images/polygon.jpg"], [(1, 6.4, 9.6, 25.6, 19.2)])
    (polygon,) = [a for a in document["annotations"] if a["image_id"] == kept["images/polygon.jpg"]]
    np.testing.assert_allclose(polygon["segmentation"], [[6.4, 9.6, 32, 9.6, 19.2, 28.8]])
    assert polygon["area"] == pytest.approx(25.6 * 19.2)
    assert document["categories"] == [{"id": k, "name": n} for k, n in enumerate(NAMES)]


def test_zero_size_boxes_are_left_out(tmp_path):
    label = tmp_path / "l.txt"
    label.write_text("0 0.5 0.5 0 0.5\n1 0.5 0.5 0.2 0.2\n")
    labels = read_labels(label, 2)
    assert labels.dropped is None and labels.boxes[:, 0].tolist() == [1]
    assert labels.notes[0][0] == "zero-size box" and f"{label}:1" in labels.notes[0][1]


def test_exif_rotated_images_are_read_in_their_oriented_frame(tmp_path):
    # Stored 64 x 48, EXIF orientation 6 (rotated 90 degrees): the reference normalises in the 48 x 64 view.
    image = tmp_path / "images" / "r.jpg"
    image.parent.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 48)).save(image, exif=exif)
    label_path(image).parent.mkdir()
    label_path(image).write_text("0 0.5 0.25 0.5 0.25\n")
    dm = YOLODataModule(str(write_yaml(tmp_path / "data.yaml", "val: images\nnames: [x]\n")))
    dm.setup("validate")
    index = dm.datasets["val"].index
    assert index.sizes[0].tolist() == [64, 48] and bool(index.exif_oriented[0])
    np.testing.assert_allclose(index.targets(0)[0], [[12, 8, 36, 24]])


def test_reference_reads_the_same_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ultralytics"))
    pytest.importorskip("ultralytics.data.dataset")
    # 8.2's check is `max_cls <= num_cls`: it keeps class K of K classes (then an out-of-range target);
    # we drop that image.
    assert_reference_reads_the_same(labelled_dataset(tmp_path / "set"), "val", skip=("class.jpg",))


@pytest.mark.parametrize("polygons", [False, True], ids=["boxes", "polygons"])
def test_reference_reads_the_same_labels_of_real_images(polygons, shared_data, tmp_path, monkeypatch):
    # convert's box lines, and its polygon lines (objects of several polygons joined, RLE masks as corners)
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ultralytics"))
    pytest.importorskip("ultralytics.data.dataset")
    coco128 = shared_data / "coco128"
    annotations = coco128 / "annotations" / "instances_train2017.json"
    write_split(annotations, coco128 / "train2017", tmp_path / "yolo", "train", copy=True, polygons=polygons)
    assert_reference_reads_the_same(tmp_path / "yolo" / "data.yaml", "train", polygons=polygons)


def assert_reference_reads_the_same(
    data_yaml: Path, split: str, skip: tuple[str, ...] = (), polygons: bool = False
) -> None:
    """The images we keep of a split and their boxes are those ultralytics reads (but the images ``skip``
    and the zero-size boxes we leave out); with ``polygons`` (every line a polygon) it read them as such."""
    from ultralytics.data.dataset import YOLODataset as ReferenceDataset

    dataset = read_data_yaml(data_yaml)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        document = to_coco(dataset, split)
    names = dict(enumerate(dataset.names))
    images = str(dataset.splits[split][0].parent)
    theirs = ReferenceDataset(img_path=images, data={"names": names, "nc": len(names)}, task="detect").labels
    theirs = [label for label in theirs if Path(label["im_file"]).name not in skip]
    assert sorted(Path(label["im_file"]).name for label in theirs) == sorted(
        Path(image["file_name"]).name for image in document["images"]
    )
    for label in theirs:
        ours = read_labels(label_path(Path(label["im_file"])), len(names))
        if polygons:  # the reference read them as polygons too
            assert len(label["segments"]) == len(label["cls"]), label["im_file"]
        expected = np.concatenate([label["cls"], label["bboxes"]], axis=1)
        expected = expected[(expected[:, 3] > 0) & (expected[:, 4] > 0)]  # we leave zero-size boxes out
        np.testing.assert_allclose(
            sorted(ours.boxes.tolist()), sorted(expected.tolist()), atol=1e-6, err_msg=label["im_file"]
        )


@pytest.mark.slow
def test_cli_fit_on_a_data_yaml(tmp_path):
    demo = generate_demo_dataset(tmp_path / "demo", num_train=8, num_val=4, seed=0)
    data_yaml = demo_as_yolo(demo, tmp_path / "yolo")
    cli = main(
        [
            "fit",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.max_epochs=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--model.detector.scale=n",
            "--model.detector.sta=[{layer: 8, stoken_size: [1, 1], num_heads: 2}]",
            "--model.optimizer.nominal_batch_size=4",
            "--model.warmup.epochs=0",
            "--data=sta_lightning.data.YOLODataModule",
            f"--data.data_yaml={data_yaml}",
            "--data.image_size=64",
            "--data.loader.batch_size=4",
            "--data.loader.num_workers=0",
        ]
    )
    metrics = cli.trainer.callback_metrics
    for name in ("val/mAP", "val/mAP50"):
        assert torch.isfinite(metrics[name]), name
    # The same checkpoint scores the same on the YOLO copy and on the COCO original (which has no crowd
    # region in its val split, so nothing was left out of the copy).
    assert not any(a["iscrowd"] for a in json.loads(annotation_path(demo, "val").read_text())["annotations"])
    checkpoint = next((tmp_path / "run").rglob("last.ckpt"))
    common = ["validate", f"--ckpt_path={checkpoint}", "--trainer.logger=false", "--trainer.accelerator=cpu"]
    common += ["--trainer.devices=1", "--trainer.enable_progress_bar=false", "--data.loader.num_workers=0"]
    yolo = main([*common, "--data=sta_lightning.data.YOLODataModule", f"--data.data_yaml={data_yaml}"])
    coco = main(
        [
            *common,
            "--data=sta_lightning.data.COCODataModule",
            f"--data.val.images={demo / 'val'}",
            f"--data.val.annotations={annotation_path(demo, 'val')}",
        ]
    )
    for name in ("val/mAP", "val/mAP50", "val/mAR100"):
        assert yolo.trainer.callback_metrics[name] == coco.trainer.callback_metrics[name], name
