"""COCO bbox evaluation time: sta_lightning.metrics.evaluate_coco (faster-coco-eval) vs pycocotools COCOeval.

Synthetic case: 500 images x 100 detections, ~8 objects per image (some crowd, json area 35-95% of the box).
Both start from the annotation json path and the detections (COCO loading + results + evaluate + accumulate +
summarize); a third row reuses the loaded json (as COCOEvaluator does across epochs). Runs are interleaved;
prints medians, ratios and the largest stat difference to pycocotools.

    python benchmarks/metrics.py [--repeats 5]
"""

import argparse
import contextlib
import copy
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sta_lightning.metrics import STAT_NAMES, evaluate_coco, load_coco_annotations


def write_case(
    path: Path, num_images: int = 500, detections_per_image: int = 100, seed: int = 0
) -> np.ndarray:
    """Write the ground-truth json and return the detections as (N, 7) [image_id, x, y, w, h, score, cat]."""
    rng = np.random.default_rng(seed)
    category_ids = np.arange(1, 91)[rng.permutation(90)[:80]]
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 640, "height": 480})
        objects = []
        for _ in range(int(rng.integers(0, 17))):
            w, h = np.exp(rng.uniform(np.log(4), np.log(400), 2)).clip(2, (639, 479))
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            category_id = int(rng.choice(category_ids))
            objects.append((x, y, w, h, category_id))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [x, y, w, h],
                    "area": float(w * h * rng.uniform(0.35, 0.95)),
                    "iscrowd": int(rng.random() < 0.02),
                }
            )
        for index in range(detections_per_image):
            if objects and index < 3 * len(objects):  # jittered copies of the objects, the rest random
                x, y, w, h, category_id = objects[index % len(objects)]
                box = np.array([x, y, w, h]) + rng.normal(0, 0.1, 4) * np.array([w, h, w, h])
            else:
                w, h = np.exp(rng.uniform(np.log(4), np.log(300), 2))
                box, category_id = (
                    np.array([rng.uniform(0, 600), rng.uniform(0, 440), w, h]),
                    rng.choice(category_ids),
                )
            detections.append([image_id, *box.clip(0.5), rng.random(), category_id])
    categories = [{"id": int(category_id), "name": str(category_id)} for category_id in sorted(category_ids)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return np.array(detections, dtype=np.float64)


def run_pycocotools(annotation_file: Path, detections: list[dict]) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotation_file))
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        annotation_file = Path(directory) / "instances.json"
        array = write_case(annotation_file)
        detection_dicts = [
            {"image_id": int(r[0]), "bbox": r[1:5], "score": r[5], "category_id": int(r[6])}
            for r in array.tolist()
        ]
        annotations = load_coco_annotations(annotation_file)
        candidates = {
            "pycocotools COCOeval": lambda: run_pycocotools(annotation_file, copy.deepcopy(detection_dicts)),
            "evaluate_coco (faster-coco-eval)": lambda: evaluate_coco(annotation_file, array),
            "evaluate_coco, json loaded once": lambda: evaluate_coco(annotations, array),
        }
        times = {name: [] for name in candidates}
        outputs = {}
        for _ in range(args.repeats):
            for name, candidate in candidates.items():
                start = time.perf_counter()
                outputs[name] = candidate()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{len(array)} detections on 500 images, median of {args.repeats} interleaved runs:")
    for name, median in medians.items():
        print(f"  {name:34s} {median:7.3f} s   (runs: {', '.join(f'{t:.2f}' for t in times[name])})")
    for name in list(candidates)[1:]:
        ratio = medians["pycocotools COCOeval"] / medians[name]
        difference = max(
            abs(outputs[name][stat] - value)
            for stat, value in zip(STAT_NAMES, outputs["pycocotools COCOeval"], strict=True)
        )
        print(f"  {name}: {ratio:.1f}x faster than pycocotools, max |stat difference| {difference:.1e}")


if __name__ == "__main__":
    main()
