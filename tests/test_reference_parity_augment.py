"""Training targets against the reference's (Ultralytics 8.2) on the same images: resized targets and mosaic
boxes. The mosaic comparison skips without ultralytics (it is no project dependency) or ../shared."""

import json
import random

import cv2
import numpy as np
import pytest

import sta_lightning.data.transforms as transforms
from sta_lightning.data import AugmentConfig
from sta_lightning.data.coco_index import load_coco_index
from sta_lightning.data.dataset import COCODetectionDataset
from sta_lightning.data.transforms import TrainAugmentation
from sta_lightning.data.yolo_augment import affine_matrix
from sta_lightning.data.yolo_format import write_split

SIZE = 640
GEOMETRY_ONLY = dict(translate=0.0, fliplr=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0)  # mosaic and scale 0.5


def test_targets_scale_with_the_resized_pixels(tmp_path):
    # 500 x 333 at long side 640: the pixels become 640 x 427 (the short side rounded up, 427 / 333 = 1.2823
    # where 640 / 500 = 1.28), so a box over the whole image covers the whole resized image.
    cv2.imwrite(str(tmp_path / "a.jpg"), np.full((333, 500, 3), 90, np.uint8))
    document = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 500, "height": 333}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 500, 333], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(document))
    index = load_coco_index(tmp_path / "a.json", tmp_path)
    image, boxes, _ = COCODetectionDataset(index, SIZE, TrainAugmentation(SIZE)).load_resized(0)
    assert image.shape[:2] == (427, 640)
    np.testing.assert_allclose(boxes, [[0, 0, 640, 427]], atol=1e-3)
    # Evaluation samples keep the one ratio that maps their boxes (and predictions) back.
    _, boxes, _ = COCODetectionDataset(index, SIZE).load_resized(0)
    np.testing.assert_allclose(boxes, [[0, 0, 640, 333 * 1.28]], atol=1e-3)


def drawing(center: list[int], scale: float, uniform):
    """``random.uniform`` that draws the reference's mosaic centre (int(random.uniform(S / 2, 3S / 2)) for
    cy, then cx) and affine scale (random.uniform(0.5, 1.5)) as given, and calls ``uniform`` otherwise."""
    queue = [center[1], center[0]]

    def draw(a: float, b: float) -> float:
        if (a, b) == (SIZE // 2, 3 * SIZE // 2) and queue:
            return float(queue.pop(0))
        return scale if (a, b) == (0.5, 1.5) else uniform(a, b)

    return draw


class FixedScale(random.Random):
    """This project's augmentation stream, with the affine scale (uniform(0.5, 1.5)) drawn as given."""

    def __init__(self, scale: float) -> None:
        super().__init__(0)
        self.scale = scale

    def uniform(self, a: float, b: float) -> float:
        return self.scale if (a, b) == (0.5, 1.5) else super().uniform(a, b)


def test_mosaic_boxes_equal_the_references(shared_data, tmp_path, monkeypatch):
    # The same 4 images around the same centre, at the same affine scale (translation and flips off): the
    # reference's boxes.
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ultralytics"))
    reference_data = pytest.importorskip("ultralytics.data.dataset")
    from ultralytics.cfg import get_cfg
    from ultralytics.data.augment import Mosaic

    coco128 = shared_data / "coco128"
    annotations = coco128 / "annotations" / "instances_train2017.json"
    index = load_coco_index(annotations, coco128 / "train2017")
    ours = COCODetectionDataset(index, SIZE, TrainAugmentation(SIZE, AugmentConfig(**GEOMETRY_ONLY)))
    written = write_split(annotations, coco128 / "train2017", tmp_path / "yolo", "train")
    reference = reference_data.YOLODataset(
        img_path=str(tmp_path / "yolo" / "images" / "train"),
        imgsz=SIZE,
        augment=True,
        hyp=get_cfg(overrides={**GEOMETRY_ONLY, "mosaic": 1.0}),
        data={"names": {k: str(k) for k in range(80)}, "nc": 80},
    )
    reference_index = {str(path): k for k, path in enumerate(reference.im_files)}
    by_image_id = {int(image_id): k for k, image_id in enumerate(index.image_ids)}
    theirs_of = {
        by_image_id[image_id]: reference_index[str(path)] for image_id, path in written.paths.items()
    }
    draws = np.random.default_rng(0)
    uniform = random.uniform
    for _ in range(60):
        images = draws.choice(sorted(theirs_of), size=4).tolist()
        center = draws.integers(SIZE // 2, 3 * SIZE // 2, size=2).tolist()  # (cx, cy)
        scale = float(draws.choice([0.5, 0.7, 1.0, 1.3]))
        monkeypatch.setattr(transforms, "mosaic_center", lambda rng, size, center=center: tuple(center))
        monkeypatch.setattr(
            transforms,
            "affine_matrix",
            lambda rng, *args, scale=scale: affine_matrix(FixedScale(scale), *args),
        )
        monkeypatch.setattr(ours, "mosaic_partners", lambda i, rng, images=images: images[1:])
        sample = ours[images[0]]
        found = np.concatenate([sample["boxes"], sample["labels"][:, None]], axis=1)

        monkeypatch.setattr(random, "uniform", drawing(center, scale, uniform))
        partners = [theirs_of[k] for k in images[1:]]
        monkeypatch.setattr(Mosaic, "get_indexes", lambda self, buffer=True, partners=partners: partners)
        theirs = reference[theirs_of[images[0]]]
        monkeypatch.setattr(random, "uniform", uniform)
        cx, cy, w, h = (theirs["bboxes"].numpy().reshape(-1, 4) * SIZE).T
        expected = np.stack(
            [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, theirs["cls"].numpy().ravel()], 1
        )

        def rows(boxes: np.ndarray) -> np.ndarray:
            return boxes[np.lexsort(np.round(boxes, 2).T[::-1])]

        assert found.shape == expected.shape, (images, center, scale)
        np.testing.assert_allclose(
            rows(found), rows(expected), atol=2e-3, err_msg=str((images, center, scale))
        )
