"""Detection confusion matrix: counts on hand-made cases, and over a COCO evaluation."""

import json

import numpy as np
from test_metrics import SYNTHETIC_CATEGORY_IDS, write_synthetic_coco

from sta_lightning.metrics import evaluate_coco, image_confusion_matrix
from sta_lightning.metrics.confusion import normalize_rows

TRUTH_BOXES = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], dtype=np.float64)
TRUTH_CLASSES = np.array([0, 1, 2])
CROWD = np.array([[60, 0, 100, 40]], dtype=np.float64)
DETECTIONS = np.array(
    [
        [0, 0, 10, 10, 0.9, 0],  # finds object 0
        [1, 0, 11, 10, 0.8, 0],  # also overlaps object 0 (IoU 0.82), which is taken: background
        [20, 0, 30, 10, 0.7, 2],  # finds object 1 with the wrong class
        [40, 0, 50, 10, 0.2, 2],  # would find object 2, but scores under 0.25: object 2 is missed
        [0, 0, 10, 10, 0.25, 1],  # at the threshold: not counted
        [70, 10, 80, 20, 0.6, 1],  # inside the crowd region: ignored
        [200, 200, 210, 210, 0.5, 1],  # nothing there: background
    ],
    dtype=np.float64,
)


def test_counts_of_a_hand_made_image():
    matrix = image_confusion_matrix(DETECTIONS, TRUTH_BOXES, TRUTH_CLASSES, 3, crowd_boxes=CROWD)
    expected = [
        [1, 0, 0, 0],  # true 0: found as 0
        [0, 0, 1, 0],  # true 1: found as 2
        [0, 0, 0, 1],  # true 2: missed (background)
        [1, 1, 0, 0],  # background: a duplicate of class 0, a detection of class 1 on nothing
    ]
    np.testing.assert_array_equal(matrix, expected)
    without_crowd = image_confusion_matrix(DETECTIONS, TRUTH_BOXES, TRUTH_CLASSES, 3)
    assert without_crowd[3, 1] == 2  # the detection in the crowd region becomes background too
    np.testing.assert_allclose(normalize_rows(matrix)[3], [0.5, 0.5, 0, 0])
    np.testing.assert_array_equal(normalize_rows(np.zeros((2, 2))), np.zeros((2, 2)))


def test_one_to_one_from_the_highest_iou():
    truth = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], dtype=np.float64)
    detections = np.array([[3, 0, 13, 10, 0.9, 1], [5, 0, 15, 10, 0.5, 1]], dtype=np.float64)
    # IoU: detection 0 with object 0 0.54 and object 1 0.67; detection 1 with object 1 1.0, so object 1 goes
    # to detection 1 and detection 0 takes object 0.
    matrix = image_confusion_matrix(detections, truth, np.array([0, 1]), 2)
    np.testing.assert_array_equal(matrix, [[0, 1, 0], [0, 1, 0], [0, 0, 0]])
    nothing = image_confusion_matrix(np.zeros((0, 6)), truth, np.array([0, 1]), 2)
    np.testing.assert_array_equal(nothing, [[0, 0, 1], [0, 0, 1], [0, 0, 0]])


def test_over_a_coco_evaluation(tmp_path):
    annotation_file = tmp_path / "instances.json"
    detections = write_synthetic_coco(annotation_file, seed=3, num_images=20)
    data = json.loads(annotation_file.read_text())
    image_ids = [image["id"] for image in data["images"]][::2]  # only these images count
    matrix = evaluate_coco(annotation_file, detections, image_ids, confusion=True)["confusion_matrix"]
    assert matrix.shape == (len(SYNTHETIC_CATEGORY_IDS) + 1,) * 2
    objects = [a for a in data["annotations"] if a["image_id"] in image_ids and not a["iscrowd"]]
    per_class = [
        sum(a["category_id"] == category_id for a in objects) for category_id in SYNTHETIC_CATEGORY_IDS
    ]
    np.testing.assert_array_equal(matrix[:-1].sum(axis=1), per_class)  # every object counted once
    np.testing.assert_array_equal(matrix[-1, -1], 0)

    # The sum of the per-image matrices (category ids -> class indices, x, y, w, h -> corners).
    expected = np.zeros_like(matrix)
    for image_id in image_ids:
        found = np.array(
            [
                [*corners(d["bbox"]), d["score"], SYNTHETIC_CATEGORY_IDS.index(d["category_id"])]
                for d in detections
                if d["image_id"] == image_id
            ]
        ).reshape(-1, 6)
        own = [a for a in data["annotations"] if a["image_id"] == image_id]
        plain = [a for a in own if not a["iscrowd"]]
        crowd = [a for a in own if a["iscrowd"]]
        expected += image_confusion_matrix(
            found,
            np.array([corners(a["bbox"]) for a in plain]).reshape(-1, 4),
            np.array([SYNTHETIC_CATEGORY_IDS.index(a["category_id"]) for a in plain]),
            len(SYNTHETIC_CATEGORY_IDS),
            crowd_boxes=np.array([corners(a["bbox"]) for a in crowd]).reshape(-1, 4),
        )
    np.testing.assert_array_equal(matrix, expected)
    assert matrix.trace() > 0 and matrix[-1].sum() > 0  # the case has matches and background detections


def corners(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]
