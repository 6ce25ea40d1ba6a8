"""Ground-truth statistics of a detection split: instances per class, box sizes and aspect ratios, images
without boxes, crowd regions. Pure numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ASPECT_RANGE = (1 / 8, 8.0)  # width / height shown in the aspect histogram; rarer shapes go to the end bins


@dataclass(frozen=True)
class SplitStatistics:
    """One split's ground truth (crowd regions counted apart, as evaluation ignores them).

    instances: (K,) objects per class; widths, heights: (M,) box sides in input pixels (letterboxed to the
    training size S); num_images, images_without_boxes, num_crowd: counts.
    """

    num_images: int
    images_without_boxes: int
    num_crowd: int
    instances: np.ndarray
    widths: np.ndarray
    heights: np.ndarray

    @property
    def num_boxes(self) -> int:
        return len(self.widths)

    @property
    def aspect_ratios(self) -> np.ndarray:
        """(M,) width / height."""
        return self.widths / np.maximum(self.heights, np.finfo(np.float64).tiny)


def split_statistics(
    boxes: np.ndarray,
    labels: np.ndarray,
    box_starts: np.ndarray,
    sizes: np.ndarray,
    num_classes: int,
    image_size: int,
    num_crowd: int = 0,
) -> SplitStatistics:
    """Statistics of N images and their M boxes.

    Args:
        boxes: (M, 4) x1, y1, x2, y2 in original image pixels; labels: (M,) class indices.
        box_starts: (N + 1,) image i owns boxes ``box_starts[i]:box_starts[i + 1]``.
        sizes: (N, 2) original (height, width) of each image.
        num_classes: K; image_size: the input size S that images are letterboxed to.
        num_crowd: crowd regions of the split (not among ``boxes``).
    """
    counts = np.diff(box_starts)
    scale = image_size / sizes.max(axis=1)  # letterbox: the long side becomes S
    per_box = np.repeat(scale, counts)
    return SplitStatistics(
        num_images=len(sizes),
        images_without_boxes=int((counts == 0).sum()),
        num_crowd=int(num_crowd),
        instances=np.bincount(labels, minlength=num_classes)[:num_classes],
        widths=(boxes[:, 2] - boxes[:, 0]) * per_box,
        heights=(boxes[:, 3] - boxes[:, 1]) * per_box,
    )


def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(B,) counts of ``values`` in the B bins of ``edges`` (B + 1,); values outside go to the end bins."""
    return np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0]


def size_bins(image_size: int, count: int = 32) -> np.ndarray:
    """(count + 1,) edges from 0 to S pixels for the width and height histograms."""
    return np.linspace(0.0, float(image_size), count + 1)


def aspect_bins(count: int = 24) -> np.ndarray:
    """(count + 1,) log-spaced edges over ``ASPECT_RANGE`` for the aspect-ratio histogram."""
    return np.geomspace(*ASPECT_RANGE, count + 1)
