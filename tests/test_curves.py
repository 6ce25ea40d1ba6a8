"""Precision-recall curves are COCOeval's own arrays (their means are mAP50 and mAP); the F1-confidence curve
read off them, on a hand-made curve and on a real evaluation."""

import json

import numpy as np
import pytest
from test_metrics import SYNTHETIC_CATEGORY_IDS, reference_coco_eval, write_synthetic_coco

from sta_lightning.metrics import PrecisionRecallCurves, evaluate_coco, f1_confidence_curve

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """(metrics of evaluate_coco with curves, pycocotools' COCOeval) on a synthetic case."""
    annotation_file = tmp_path_factory.mktemp("curves") / "instances.json"
    detections = write_synthetic_coco(annotation_file, seed=11)
    image_ids = [image["id"] for image in json.loads(annotation_file.read_text())["images"]]
    metrics = evaluate_coco(annotation_file, detections, image_ids, per_class=True, curves=True)
    return metrics, reference_coco_eval(annotation_file, detections, image_ids)


def test_curves_are_the_cocoeval_arrays(evaluation):
    metrics, reference = evaluation
    curves = metrics["curves"]
    np.testing.assert_allclose(
        curves.precision, reference.eval["precision"][:, :, :, 0, -1], rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(curves.scores, reference.eval["scores"][:, :, :, 0, -1], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(curves.iou_thresholds, reference.params.iouThrs)
    np.testing.assert_array_equal(curves.recall_thresholds, reference.params.recThrs)
    assert curves.category_ids.tolist() == list(SYNTHETIC_CATEGORY_IDS)
    assert curves.has_ground_truth.tolist() == [True] * 5 + [False]  # the last category has no objects


def test_curve_means_are_the_logged_statistics(evaluation):
    metrics, _ = evaluation
    curves = metrics["curves"]
    assert curves.mean_precision("0.5").mean() == pytest.approx(metrics["map_50"], abs=1e-12)
    assert curves.mean_precision("0.5:0.95").mean() == pytest.approx(metrics["map"], abs=1e-12)
    per_class = dict(zip(curves.category_ids.tolist(), curves.average_precision().tolist(), strict=True))
    assert per_class == pytest.approx(metrics["map_per_class"], abs=1e-12)
    assert np.isnan(curves.precision_per_class("0.5")[:, -1]).all()


def hand_made_curves() -> PrecisionRecallCurves:
    """Class 0: recall up to 0.5 at precision 1 by detections scoring 0.9, up to 0.8 at precision 0.5 by
    detections scoring 0.4, never beyond; class 1: no ground truth."""
    precision = np.zeros((10, 101, 2))
    scores = np.zeros((10, 101, 2))
    precision[:, :51, 0], scores[:, :51, 0] = 1.0, 0.9
    precision[:, 51:81, 0], scores[:, 51:81, 0] = 0.5, 0.4
    precision[:, :, 1] = -1
    return PrecisionRecallCurves(IOU_THRESHOLDS, RECALL_THRESHOLDS, np.array([3, 8]), precision, scores)


def test_f1_curve_on_a_hand_made_case():
    f1 = f1_confidence_curve(hand_made_curves())
    assert len(f1.confidences) == 101 and np.isnan(f1.f1[:, 1]).all()
    low, middle, high = (
        f1.confidences <= 0.4,
        (f1.confidences > 0.4) & (f1.confidences <= 0.9),
        f1.confidences > 0.9,
    )
    np.testing.assert_allclose(f1.recall[low, 0], 0.8)
    np.testing.assert_allclose(f1.precision[low, 0], 0.5)
    np.testing.assert_allclose(f1.f1[low, 0], 2 * 0.5 * 0.8 / 1.3)
    np.testing.assert_allclose(f1.f1[middle, 0], 2 * 1.0 * 0.5 / 1.5)
    np.testing.assert_array_equal(f1.f1[high, 0], 0.0)
    np.testing.assert_array_equal(f1.mean_f1, f1.f1[:, 0])
    assert f1.best_confidence == pytest.approx(0.41)  # the lowest threshold of the best F1
    assert f1.best_f1 == pytest.approx(2 / 3)


def test_best_f1_point_lies_on_the_pr_curve(evaluation):
    curves = evaluation[0]["curves"]
    f1 = f1_confidence_curve(curves)
    assert 0 < f1.best_f1 < 1 and 0 < f1.best_confidence < 1
    assert f1.best_f1 == pytest.approx(np.nanmean(f1.f1[f1.best_index]))
    for k in np.flatnonzero(curves.has_ground_truth):
        recall, precision = f1.recall[f1.best_index, k], f1.precision[f1.best_index, k]
        on_curve = np.isclose(curves.recall_thresholds, recall) & np.isclose(
            curves.precision[0, :, k], precision
        )
        assert on_curve.any() or recall == precision == 0
