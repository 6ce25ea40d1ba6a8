"""Ground-truth statistics of a split, on hand-made arrays."""

import numpy as np

from sta_lightning.data.statistics import aspect_bins, histogram, size_bins, split_statistics


def test_split_statistics():
    # Image 0: 200 x 100 (w x h), letterboxed to 64 (scale 0.32), two boxes; image 1: no boxes; image 2:
    # 64 x 64 (scale 1), one box.
    boxes = np.array([[0, 0, 50, 25], [10, 10, 20, 60], [0, 0, 64, 32]], dtype=np.float32)
    statistics = split_statistics(
        boxes,
        labels=np.array([1, 0, 1]),
        box_starts=np.array([0, 2, 2, 3]),
        sizes=np.array([[100, 200], [50, 25], [64, 64]]),
        num_classes=3,
        image_size=64,
        num_crowd=4,
    )
    assert (statistics.num_images, statistics.images_without_boxes, statistics.num_crowd) == (3, 1, 4)
    assert statistics.num_boxes == 3
    np.testing.assert_array_equal(statistics.instances, [1, 2, 0])
    np.testing.assert_allclose(statistics.widths, [16, 3.2, 64], rtol=1e-6)
    np.testing.assert_allclose(statistics.heights, [8, 16, 32], rtol=1e-6)
    np.testing.assert_allclose(statistics.aspect_ratios, [2, 0.2, 2], rtol=1e-6)
    np.testing.assert_array_equal(histogram(statistics.widths, size_bins(64, 4)), [1, 1, 0, 1])


def test_histogram_puts_outliers_in_the_end_bins():
    edges = aspect_bins(6)  # 1/8 ... 8, a factor 2 per bin
    np.testing.assert_allclose(edges, [1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8])
    np.testing.assert_array_equal(histogram(np.array([0.01, 0.3, 1.5, 100.0]), edges), [1, 1, 0, 1, 0, 1])
