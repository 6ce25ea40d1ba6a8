"""``python -m sta_lightning convert``: COCO json -> YOLO -> COCO keeps every box, YOLO and VOC to COCO json
with the readers of the datamodules, and bad input named."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from sta_lightning.__main__ import main
from sta_lightning.data import COCODataModule, LoaderConfig, Split, YOLODataModule
from sta_lightning.data.coco_json import read_instances
from sta_lightning.data.demo import DEMO_CLASS_NAMES, annotation_path, generate_demo_dataset
from sta_lightning.data.index_cache import CACHE_DIR_ENV
from sta_lightning.data.voc_format import read_voc
from sta_lightning.data.voc_format import to_coco as voc_to_coco
from sta_lightning.data.yolo_format import join_polygons, read_data_yaml
from sta_lightning.data.yolo_format import to_coco as yolo_to_coco
from tests.test_data_voc import demo_as_voc


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))


def boxes_by_file(annotation_file: Path) -> dict[str, np.ndarray]:
    """file name -> (n, 5) rows x1, y1, x2, y2, class index as the training reader reads them, sorted."""
    instances = read_instances(annotation_file)
    return {
        Path(file_name).name: np.array(sorted(instances.boxes_of[image_id])).reshape(-1, 5)
        for image_id, (file_name, _, _) in instances.images.items()
    }


def assert_same_boxes(before: Path, after: Path) -> None:
    """Every image and box of ``before`` in ``after``, boxes within 1e-6 of their size."""
    expected, found = boxes_by_file(before), boxes_by_file(after)
    assert sorted(found) == sorted(expected)
    for name, boxes in expected.items():
        assert found[name].shape == boxes.shape, name
        sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])[:, None]
        assert (np.abs(found[name][:, :4] - boxes[:, :4]) <= 1e-6 * sides).all(), name
        np.testing.assert_array_equal(found[name][:, 4], boxes[:, 4])


def round_trip(annotation_file: Path, images: Path, tmp_path: Path, split: str) -> Path:
    """COCO json -> YOLO (convert) -> COCO json (convert); returns the final json."""
    main(["convert", str(annotation_file), str(tmp_path / "yolo"), "--images", str(images), "--split", split])
    main(["convert", str(tmp_path / "yolo" / "data.yaml"), str(tmp_path / "coco")])
    return tmp_path / "coco" / "annotations" / f"instances_{split}.json"


def test_coco_yolo_coco_round_trip_keeps_every_box(tmp_path, capsys):
    demo = generate_demo_dataset(tmp_path / "demo", num_train=4, num_val=40, seed=1)
    source = annotation_path(demo, "val")
    final = round_trip(source, demo / "val", tmp_path, "val")
    assert_same_boxes(source, final)
    crowd = sum(a["iscrowd"] for a in json.loads(source.read_text())["annotations"])
    assert crowd > 0 and f"({crowd} crowd regions left out)" in capsys.readouterr().out
    data = yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text())
    assert data["names"] == {0: "circle", 1: "square", 2: "triangle", 3: "star", 4: "cross"}
    assert "path" not in data  # the YAML's folder is the root, for the reference too
    assert (tmp_path / "yolo" / "images" / "val" / "000000.jpg").is_symlink()
    # A second split goes into the same data.yaml; the datamodule reads both.
    main(
        [
            "convert",
            str(annotation_path(demo, "train")),
            str(tmp_path / "yolo"),
            "--images",
            str(demo / "train"),
        ]
    )
    assert set(read_data_yaml(tmp_path / "yolo" / "data.yaml").splits) == {"train", "val"}
    assert len(YOLODataModule(str(tmp_path / "yolo" / "data.yaml")).classes.names) == 5


def test_round_trip_of_real_coco_images(shared_data, tmp_path):
    coco128 = shared_data / "coco128"
    source = coco128 / "annotations" / "instances_train2017.json"
    final = round_trip(source, coco128 / "train2017", tmp_path, "train")
    assert_same_boxes(source, final)
    # The category ids become 0..K-1 in ascending order of the original ids; the names stay.
    assert read_instances(final).class_names == read_instances(source).class_names


def objects_by_file(annotation_file: Path) -> dict[str, tuple[tuple[int, int], list]]:
    """file name -> ((width, height), per object in file order: (x1, y1, x2, y2, class index), polygons)."""
    instances = read_instances(annotation_file)
    return {
        Path(file_name).name: (
            (width, height),
            list(zip(instances.boxes_of[image_id], instances.polygons_of[image_id], strict=True)),
        )
        for image_id, (file_name, height, width) in instances.images.items()
    }


@pytest.mark.parametrize("source", ["demo", "coco128"])
def test_polygon_lines_round_trip(source, tmp_path, request):
    # --polygons: every object comes back with its polygons joined into one (a single one unchanged, to
    # float32 precision; an RLE mask as its box's corners), and the enclosing box of that polygon as its box.
    if source == "demo":
        images = generate_demo_dataset(tmp_path / "demo", num_train=4, num_val=40, seed=1) / "val"
        annotation_file, split = annotation_path(images.parent, "val"), "val"
    else:
        coco128 = request.getfixturevalue("shared_data") / "coco128"
        images, split = coco128 / "train2017", "train"
        annotation_file = coco128 / "annotations" / "instances_train2017.json"
    main(["convert", str(annotation_file), str(tmp_path / "yolo"), "--images", str(images), "--polygons"])
    main(["convert", str(tmp_path / "yolo" / "data.yaml"), str(tmp_path / "coco")])
    before = objects_by_file(annotation_file)
    after = objects_by_file(tmp_path / "coco" / "annotations" / f"instances_{split}.json")
    assert sorted(after) == sorted(before)
    joined = 0
    for name, (size, objects) in before.items():
        assert len(after[name][1]) == len(objects), name
        for ((x1, y1, x2, y2, label), polygons), (found_box, (found,)) in zip(
            objects, after[name][1], strict=True
        ):
            assert found_box[4] == label
            joined += len(polygons) > 1
            corners = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])
            expected = np.clip(join_polygons(polygons), 0, size) if polygons else corners
            np.testing.assert_allclose(found, expected, atol=1e-4, err_msg=name)
            np.testing.assert_allclose(found_box[:4], [*found.min(axis=0), *found.max(axis=0)], atol=1e-4)
    assert joined > 0 or source == "demo"  # coco128 has objects of several polygons


def test_join_polygons_runs_once_around_each_polygon():
    triangle = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 2.0]])
    square = np.array([[5.0, 0.0], [7.0, 0.0], [7.0, 2.0], [5.0, 2.0]])
    polygons = [triangle, square, np.array([[5.0, 6.0], [9.0, 6.0], [9.0, 9.0]])]
    assert join_polygons(polygons[:1]) is polygons[0]
    outline = join_polygons(polygons)
    steps = list(zip(map(tuple, outline), map(tuple, outline[1:]), strict=False))
    steps = [step for step in steps if step[0] != step[1]]
    edges = [(tuple(p[i]), tuple(p[(i + 1) % len(p)])) for p in polygons for i in range(len(p))]
    # Each polygon edge once, in the polygon's direction; the rest are the two bridges, each there and back,
    # between the closest points of consecutive polygons (3 and 4 apart).
    assert sorted(step for step in steps if step in edges) == sorted(edges)
    bridges = sorted(step for step in steps if step not in edges)
    bridges_expected = [((2.0, 0.0), (5.0, 0.0)), ((5.0, 2.0), (5.0, 6.0))]
    assert bridges == sorted(bridges_expected + [(end, start) for start, end in bridges_expected])
    # So it encloses what the polygons do: its shoelace area is the sum of theirs.
    x, y = outline[:, 0], outline[:, 1]
    assert 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) == pytest.approx(12.0)


def test_yolo_to_coco_json_is_the_datamodule_conversion(tmp_path, capsys):
    demo = generate_demo_dataset(tmp_path / "demo", num_train=6, num_val=4, seed=2)
    train = [str(annotation_path(demo, "train")), str(tmp_path / "yolo"), "--images", str(demo / "train")]
    main(["convert", *train, "--copy"])
    data_yaml = tmp_path / "yolo" / "data.yaml"
    main(["convert", str(data_yaml), str(tmp_path / "coco")])
    written = tmp_path / "coco" / "annotations" / "instances_train.json"
    assert json.loads(written.read_text()) == yolo_to_coco(read_data_yaml(data_yaml), "train")
    assert f"image root (the folder of every file_name): {data_yaml.parent}" in capsys.readouterr().out
    loader = LoaderConfig(batch_size=2, num_workers=0)
    coco = COCODataModule(train=Split(str(data_yaml.parent), str(written)), loader=loader)
    yolo = YOLODataModule(str(data_yaml), loader=loader)
    coco.setup("fit")
    yolo.setup("fit")
    for i in range(len(coco.datasets["train"])):
        np.testing.assert_array_equal(
            coco.datasets["train"].index.targets(i)[0], yolo.datasets["train"].index.targets(i)[0]
        )


def test_voc_to_coco_json(tmp_path, capsys):
    demo = generate_demo_dataset(tmp_path / "demo", num_train=4, num_val=40, seed=1)
    root = demo_as_voc(demo, tmp_path / "VOC")
    main(["convert", str(root), str(tmp_path / "coco"), "--names", *DEMO_CLASS_NAMES])
    out = capsys.readouterr().out
    written = tmp_path / "coco" / "annotations" / "instances_val.json"
    assert f"image root (the folder of every file_name): {root / 'JPEGImages'}" in out
    document = json.loads(written.read_text())
    assert document == voc_to_coco(read_voc(root, names=list(DEMO_CLASS_NAMES)), "val")
    source = json.loads(annotation_path(demo, "val").read_text())
    assert (
        sum(a["iscrowd"] for a in document["annotations"])
        == sum(a["iscrowd"] for a in source["annotations"])
        > 0
    )
    # The boxes are the demo's, renamed images aside (difficult objects are crowd regions again).
    ours = sorted(tuple(np.round(a["bbox"], 6)) + (a["iscrowd"],) for a in document["annotations"])
    theirs = sorted(tuple(np.round(a["bbox"], 6)) + (a["iscrowd"],) for a in source["annotations"])
    assert ours == theirs


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["{demo}/annotations/instances_val.json", "out"], "needs --images"),
        (
            ["{demo}/annotations/instances_val.json", "out", "--images", "{demo}/val", "--split", "x"],
            "invalid choice",
        ),
        (["{demo}/missing.yaml", "out"], "data.yaml not found"),
        (["{demo}/val", "out"], "not a Pascal VOC root, the folder Annotations/ is missing"),
        (["{demo}/val/000000.jpg", "out"], "neither a data.yaml, a VOC root folder nor a COCO json"),
    ],
)
def test_bad_input_is_named(tmp_path, capsys, arguments, message):
    demo = generate_demo_dataset(tmp_path / "demo", num_train=2, num_val=2, seed=0)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", *(a.format(demo=demo) for a in arguments)])
    assert message in str(exit_info.value) + capsys.readouterr().err


def test_a_split_with_other_names_is_refused(tmp_path):
    demo = generate_demo_dataset(tmp_path / "demo", num_train=2, num_val=2, seed=0)
    output = tmp_path / "yolo"
    output.mkdir()
    (output / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [a, b]\n")
    with pytest.raises(SystemExit, match="names .* differ from the converted split's"):
        main(["convert", str(annotation_path(demo, "val")), str(output), "--images", str(demo / "val")])
