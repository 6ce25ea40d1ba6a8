"""What a training sample shows, as numbers: shared by benchmarks/augment_stats.py (this project's samples)
and benchmarks/reference_augment.py (the reference's, in its own interpreter), so numpy only."""

from __future__ import annotations

import numpy as np

GREY = 114  # the padding level of both pipelines


def sample_numbers(image: np.ndarray, boxes: np.ndarray, size: int) -> dict:
    """(S, S, 3) uint8 image and (n, 4) xyxy pixel boxes -> the box count, the fraction of pure grey pixels,
    each box's size (sqrt of its area, px) and centre height (fraction of S, 0 at the top)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sides = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
    return {
        "boxes": len(boxes),
        "grey": float((image == GREY).all(-1).mean()),
        "sizes": sides.tolist(),
        "centres_y": ((boxes[:, 1] + boxes[:, 3]) / 2 / size).tolist(),
    }


def summary(samples: list[dict]) -> dict:
    """Per option: boxes per sample, grey fraction, box size quartiles (px) and the mean box centre height."""
    sizes = np.concatenate([s["sizes"] for s in samples]) if samples else np.zeros(0)
    centres = np.concatenate([s["centres_y"] for s in samples]) if samples else np.zeros(0)
    q25, q50, q75 = np.percentile(sizes, [25, 50, 75]) if len(sizes) else (np.nan,) * 3
    return {
        "boxes per sample": float(np.mean([s["boxes"] for s in samples])),
        "grey fraction": float(np.mean([s["grey"] for s in samples])),
        "box size p25": float(q25),
        "box size p50": float(q50),
        "box size p75": float(q75),
        "box centre y": float(centres.mean()) if len(centres) else float("nan"),
    }
