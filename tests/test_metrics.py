"""evaluate_coco and COCOEvaluator (single process) against the real pycocotools COCOeval."""

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO as ReferenceCOCO
from pycocotools.cocoeval import COCOeval as ReferenceCOCOeval

import sta_lightning.metrics.evaluator as evaluator_module
from sta_lightning.metrics import STAT_NAMES, COCOEvaluator, evaluate_coco, load_coco_annotations

# Non-contiguous, like COCO's 1..90 with gaps; the last one never has ground truth.
SYNTHETIC_CATEGORY_IDS = (1, 3, 7, 18, 44, 90)


def reference_coco_eval(annotation_file, detections, image_ids=None) -> ReferenceCOCOeval:
    """pycocotools' COCOeval (iouType bbox) on COCO result dicts, its printout silenced; after summarize()."""
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = ReferenceCOCO(str(annotation_file))
        evaluation = ReferenceCOCOeval(ground_truth, ground_truth.loadRes(copy.deepcopy(detections)), "bbox")
        if image_ids is not None:
            evaluation.params.imgIds = sorted(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def assert_stats_equal(metrics: dict, reference: ReferenceCOCOeval) -> None:
    assert list(metrics)[:12] == list(STAT_NAMES)
    np.testing.assert_allclose([metrics[name] for name in STAT_NAMES], reference.stats, rtol=0, atol=1e-12)


def write_synthetic_coco(path, seed: int, num_images: int = 40) -> list[dict]:
    """Write a COCO instances json to `path` and return COCO result dicts for it.

    Ground truth: random image sizes and box sizes (small, medium and large), json `area` 35-95% of the box
    area (as segmentation areas are), ~10% crowd regions, some images without annotations, non-contiguous
    image and category ids. Detections: jittered copies of the objects (some with a wrong class, some
    duplicated), false positives, boxes inside crowd regions, and images with more than 100 detections.
    Coordinates are multiples of 1/16 so that xyxy <-> xywh conversions are exact.
    """
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []

    def box_in(width, height, low, high):
        w, h = np.exp(rng.uniform(np.log(low), np.log(high), 2)).clip(2, (width - 1, height - 1))
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        return [float(v) for v in np.round(np.array([x, y, w, h]) * 16) / 16]

    def detection(image_id, category_id, bbox):
        detections.append(
            {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": float(rng.random())}
        )

    for index in range(num_images):
        image_id = 1000 + 7 * index
        width, height = (int(v) for v in rng.integers(200, 640, 2))
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id}.jpg"})
        for _ in range(int(rng.integers(0, 9))):
            category_id = int(rng.choice(SYNTHETIC_CATEGORY_IDS[:-1]))
            x, y, w, h = box_in(width, height, 4, 400)
            crowd = bool(rng.random() < 0.1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [x, y, w, h],
                    "area": float(w * h * rng.uniform(0.35, 0.95)),
                    "iscrowd": int(crowd),
                    "segmentation": {"size": [height, width], "counts": [height * width]}
                    if crowd
                    else [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
            if crowd:  # detections inside the crowd region are ignored by COCOeval, not false positives
                for _ in range(int(rng.integers(1, 4))):
                    inner_w, inner_h = np.round(np.array([w, h]) * rng.uniform(0.2, 0.6, 2) * 16) / 16
                    detection(
                        image_id, category_id, [x + w * 0.25, y + h * 0.25, float(inner_w), float(inner_h)]
                    )
                continue
            for _ in range(int(rng.integers(0, 3))):
                jitter = np.round(rng.normal(0, 0.08, 4) * np.array([w, h, w, h]) * 16) / 16
                jittered = (np.array([x, y, w, h]) + jitter).clip(0.5)
                wrong_class = rng.random() < 0.1
                detection(
                    image_id,
                    int(rng.choice(SYNTHETIC_CATEGORY_IDS)) if wrong_class else category_id,
                    [float(v) for v in jittered],
                )
        num_false_positives = int(rng.integers(90, 130)) if index % 10 == 0 else int(rng.integers(0, 6))
        for _ in range(num_false_positives):
            detection(image_id, int(rng.choice(SYNTHETIC_CATEGORY_IDS)), box_in(width, height, 4, 300))
    categories = [
        {"id": category_id, "name": f"class{category_id}"} for category_id in SYNTHETIC_CATEGORY_IDS
    ]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return detections


def to_array(detections: list[dict]) -> np.ndarray:
    """COCO result dicts -> (N, 7) [image_id, x, y, w, h, score, category_id]."""
    return np.array(
        [[d["image_id"], *d["bbox"], d["score"], d["category_id"]] for d in detections], dtype=np.float64
    ).reshape(-1, 7)


@pytest.fixture(scope="module")
def coco128_fake_results(shared_data):
    """(coco128 annotation file, the COCO API's fake bbox results on its 43 images, those image ids)."""
    annotation_file = shared_data / "coco128" / "annotations" / "instances_train2017.json"
    image_ids = {image["id"] for image in json.loads(annotation_file.read_text())["images"]}
    results_file = shared_data / "cocoapi-results" / "instances_val2014_fakebbox100_results.json"
    detections = [d for d in json.loads(results_file.read_text()) if d["image_id"] in image_ids]
    return annotation_file, detections, sorted({d["image_id"] for d in detections})


@pytest.mark.parametrize("as_array", [False, True], ids=["dicts", "array"])
def test_real_data_equals_pycocotools(coco128_fake_results, as_array):
    annotation_file, detections, image_ids = coco128_fake_results
    assert len(image_ids) == 43
    reference = reference_coco_eval(annotation_file, detections, image_ids)
    metrics = evaluate_coco(annotation_file, to_array(detections) if as_array else detections, image_ids)
    assert_stats_equal(metrics, reference)
    # Anchor: the data README's figures (pycocotools, stats[0..2]).
    assert [round(metrics[name], 4) for name in ("map", "map_50", "map_75")] == [0.5485, 0.7446, 0.622]


def expected_per_class(reference: ReferenceCOCOeval) -> dict[int, float]:
    """Per category: mean of pycocotools' valid precision entries at area 'all', maxDets 100; -1 if none."""
    precision = reference.eval["precision"][:, :, :, 0, -1]
    return {
        int(category_id): float(precision[:, :, k][precision[:, :, k] > -1].mean())
        if (precision[:, :, k] > -1).any()
        else -1.0
        for k, category_id in enumerate(reference.params.catIds)
    }


def test_real_data_per_class(coco128_fake_results):
    annotation_file, detections, image_ids = coco128_fake_results
    reference = reference_coco_eval(annotation_file, detections, image_ids)
    per_class = evaluate_coco(annotation_file, detections, image_ids, per_class=True)["map_per_class"]
    expected = expected_per_class(reference)
    assert list(per_class) == list(expected) and len(per_class) == 80
    np.testing.assert_allclose(list(per_class.values()), list(expected.values()), rtol=0, atol=1e-12)
    # Classes without ground truth in these 43 images are -1 and the others average to COCO's AP.
    with_ground_truth = [ap for ap in per_class.values() if ap != -1]
    assert 0 < len(with_ground_truth) < 80
    assert np.mean(with_ground_truth) == pytest.approx(reference.stats[0], abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_equals_pycocotools(tmp_path, seed):
    annotation_file = tmp_path / "instances.json"
    detections = write_synthetic_coco(annotation_file, seed)
    all_ids = [image["id"] for image in json.loads(annotation_file.read_text())["images"]]
    for image_ids in (None, all_ids[::3]):
        reference = reference_coco_eval(annotation_file, detections, image_ids)
        metrics = evaluate_coco(annotation_file, to_array(detections), image_ids, per_class=True)
        assert_stats_equal(metrics, reference)
        assert metrics["map_per_class"] == pytest.approx(expected_per_class(reference), abs=1e-12)
        assert metrics["map_per_class"][SYNTHETIC_CATEGORY_IDS[-1]] == -1.0  # no ground truth
        assert all(0 < metrics[name] < 1 for name in STAT_NAMES)


def test_empty_detections_give_zeros(coco128_fake_results):
    annotation_file, _, image_ids = coco128_fake_results
    for empty in ([], np.zeros((0, 7))):
        metrics = evaluate_coco(annotation_file, empty, image_ids, per_class=True)
        assert {name: metrics[name] for name in STAT_NAMES} == dict.fromkeys(STAT_NAMES, 0.0)
        assert set(metrics["map_per_class"].values()) == {0.0, -1.0}


def test_silent_unless_verbose(tmp_path, capsys):
    annotation_file = tmp_path / "instances.json"
    detections = write_synthetic_coco(annotation_file, seed=3, num_images=5)
    annotations = load_coco_annotations(annotation_file)  # reused, as COCOEvaluator does
    evaluate_coco(annotations, detections)
    assert capsys.readouterr().out == ""
    evaluate_coco(annotations, detections, verbose=True)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in capsys.readouterr().out
    evaluate_coco(annotations, detections)
    assert capsys.readouterr().out == ""


def test_annotation_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate_coco(missing, [])
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        evaluate_coco(broken, [])
    no_annotations = tmp_path / "no_annotations.json"
    no_annotations.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ValueError, match="no_annotations.json.*'annotations'"):
        evaluate_coco(no_annotations, [])
    no_bbox = tmp_path / "no_bbox.json"
    annotation = {"id": 1, "image_id": 1, "category_id": 1, "area": 4.0}
    no_bbox.write_text(
        json.dumps({"images": [{"id": 1}], "annotations": [annotation], "categories": [{"id": 1}]})
    )
    with pytest.raises(ValueError, match=r"no_bbox.json: annotations\[0\]"):
        evaluate_coco(no_bbox, [])


def test_detection_errors(tmp_path):
    annotation_file = tmp_path / "instances.json"
    detections = write_synthetic_coco(annotation_file, seed=4, num_images=5)
    with pytest.raises(ValueError, match="category ids not in COCO annotations .*instances.json: 2$"):
        evaluate_coco(annotation_file, detections + [{**detections[0], "category_id": 2}])
    with pytest.raises(ValueError, match="image ids not in COCO annotations .*: 5$"):
        evaluate_coco(annotation_file, detections + [{**detections[0], "image_id": 5}])
    with pytest.raises(ValueError, match="image_ids not in COCO annotations .*: 6"):
        evaluate_coco(annotation_file, detections, image_ids=[1000, 6])
    with pytest.raises(ValueError, match="image_ids is empty"):
        evaluate_coco(annotation_file, detections, image_ids=[])
    with pytest.raises(ValueError, match=r"shape \(N, 7\)"):
        evaluate_coco(annotation_file, np.zeros((3, 6)))
    with pytest.raises(ValueError, match=r"detections\[1\] must have keys"):
        evaluate_coco(annotation_file, [detections[0], {"image_id": 1000, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="row 0 has a non-finite value"):
        evaluate_coco(annotation_file, np.array([[1000, 0, 0, np.nan, 1, 0.5, 1]]))


def per_image_tensors(detections: list[dict], category_ids: list[int]) -> dict[int, torch.Tensor]:
    """COCO result dicts -> {image_id: (n, 6) float64 tensor x1, y1, x2, y2, score, class index}."""
    class_index = {category_id: index for index, category_id in enumerate(category_ids)}
    rows: dict[int, list] = {}
    for d in detections:
        x, y, w, h = d["bbox"]
        rows.setdefault(d["image_id"], []).append(
            [x, y, x + w, y + h, d["score"], class_index[d["category_id"]]]
        )
    return {image_id: torch.tensor(r, dtype=torch.float64) for image_id, r in rows.items()}


def update_in_batches(evaluator: COCOEvaluator, image_ids: list[int], tensors: dict, batch_size: int = 4):
    """Feed `image_ids` (images without detections get an empty (0, 6) tensor) in batches."""
    for start in range(0, len(image_ids), batch_size):
        batch = image_ids[start : start + batch_size]
        evaluator.update(torch.tensor(batch), [tensors.get(i, torch.zeros(0, 6)) for i in batch])


def test_evaluator_single_process(tmp_path, monkeypatch):
    annotation_file = tmp_path / "instances.json"
    detections = write_synthetic_coco(annotation_file, seed=5)
    all_ids = [image["id"] for image in json.loads(annotation_file.read_text())["images"]]
    tensors = per_image_tensors(detections, list(SYNTHETIC_CATEGORY_IDS))
    loads, load = [], evaluator_module.load_coco_annotations
    monkeypatch.setattr(
        evaluator_module, "load_coco_annotations", lambda path: loads.append(path) or load(path)
    )
    evaluator = COCOEvaluator(annotation_file, SYNTHETIC_CATEGORY_IDS, per_class=True)

    # All images, one of them fed twice (as a padded sampler would): counted once.
    update_in_batches(evaluator, all_ids + all_ids[:1], tensors)
    metrics = evaluator.compute()
    reference = reference_coco_eval(annotation_file, detections)
    assert_stats_equal(metrics, reference)
    assert metrics["map_per_class"] == pytest.approx(expected_per_class(reference), abs=1e-12)

    # A subset of the images (next epoch): only those are evaluated; the annotations are not reloaded.
    evaluator.reset()
    subset = all_ids[1::2]
    update_in_batches(evaluator, subset, tensors)
    subset_detections = [d for d in detections if d["image_id"] in set(subset)]
    assert_stats_equal(evaluator.compute(), reference_coco_eval(annotation_file, subset_detections, subset))
    assert len(loads) == 1

    evaluator.reset()
    with pytest.raises(ValueError, match="no image was added"):
        evaluator.compute()


def test_evaluator_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        COCOEvaluator(tmp_path / "nothing.json", [1])
    annotation_file = tmp_path / "instances.json"
    write_synthetic_coco(annotation_file, seed=6, num_images=2)
    # A file that training accepts but evaluation cannot use fails when the evaluator is built (at setup,
    # before any training), not at the first validation.
    no_area = json.loads(annotation_file.read_text())
    del no_area["annotations"][1]["area"]
    (tmp_path / "no_area.json").write_text(json.dumps(no_area))
    with pytest.raises(
        ValueError, match=r"no_area.json: annotations\[1\] must be an object with keys .*'area'"
    ):
        COCOEvaluator(tmp_path / "no_area.json", SYNTHETIC_CATEGORY_IDS)
    evaluator = COCOEvaluator(annotation_file, SYNTHETIC_CATEGORY_IDS)
    with pytest.raises(ValueError, match="class index 6 out of range for 6 category ids"):
        evaluator.update(torch.tensor([1000]), [torch.tensor([[0.0, 0.0, 5.0, 5.0, 0.9, 6.0]])])
    with pytest.raises(ValueError, match=r"must have shape \(n, 6\)"):
        evaluator.update(torch.tensor([1000]), [torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="2 image ids but 1 detection tensors"):
        evaluator.update(torch.tensor([1000, 1007]), [torch.zeros(0, 6)])
