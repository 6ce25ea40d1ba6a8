"""The reference-style augmentations on real samples: mosaic geometry, affine scale, HSV gains, box filter."""

import albumentations as A
import cv2
import numpy as np
import pytest

from sta_lightning.data import AugmentConfig, DemoDataModule, LoaderConfig
from sta_lightning.data.index_cache import CACHE_DIR_ENV
from sta_lightning.data.transforms import PAD_VALUE, TrainAugmentation
from sta_lightning.data.yolo_augment import (
    YOLOAffine,
    YOLOMosaic,
    affine_boxes,
    box_candidates,
    paste,
    place_boxes,
    warp,
)

SIZE = 160


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_ENV, str(cache))
        dm = DemoDataModule(
            root=str(root), num_train=24, num_val=4, image_size=SIZE, loader=LoaderConfig(num_workers=0)
        )
        dm.prepare_data()
        dm.setup("fit")
    return dm.datasets["train"]


def _compose(*transforms) -> A.Compose:
    return A.Compose(
        list(transforms),
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_width=0, min_height=0),
    )


def _flat_item(colour: int, height: int, width: int, label: int) -> dict:
    """A constant-colour image whose one box covers it all, with that box's label."""
    return {
        "image": np.full((height, width, 3), colour, np.uint8),
        "bboxes": np.array([[0, 0, width, height]], np.float32),
        "labels": np.array([label]),
    }


def test_mosaic_images_meet_at_the_centre_and_leave_no_other_gap():
    # Four non-square images (the case where A.Mosaic centres images in cells and leaves grey between them).
    items = [
        _flat_item(10 + 40 * k, h, w, k)
        for k, (h, w) in enumerate([(90, 160), (160, 70), (60, 120), (150, 100)])
    ]
    mosaic = _compose(YOLOMosaic(SIZE, fill=PAD_VALUE))
    for seed in range(20):
        mosaic.set_random_seed(seed)
        out = mosaic(**items[0], mosaic_metadata=items[1:])
        canvas, boxes, labels = out["image"], np.asarray(out["bboxes"]), np.asarray(out["labels"])
        assert canvas.shape == (2 * SIZE, 2 * SIZE, 3)
        # Each box is its image's visible part; the four touch at one centre point.
        order = np.argsort(labels)
        x1, y1, x2, y2 = np.rint(boxes[order]).T
        cx, cy = x2[0], y2[0]
        assert SIZE / 2 <= cx <= 3 * SIZE / 2 and SIZE / 2 <= cy <= 3 * SIZE / 2
        assert (x1[1], y2[1], x2[2], y1[2], x1[3], y1[3]) == (cx, cy, cx, cy, cx, cy)
        for k, (a, b, c, d) in enumerate(np.rint(boxes[order]).astype(int)):
            assert (canvas[b:d, a:c] == 10 + 40 * k).all()
        # Grey only where no image lies: canvas area minus the four visible parts.
        covered = ((x2 - x1) * (y2 - y1)).sum()
        assert (canvas[..., 0] == PAD_VALUE).sum() == canvas.shape[0] * canvas.shape[1] - covered


def test_zoomed_out_affine_shows_the_mosaic_canvas_not_grey():
    # Fully zoomed out (scale factor 0.5) and centred, the S x S output shows the whole 2S canvas.
    canvas = np.full((2 * SIZE, 2 * SIZE, 3), 200, np.uint8)
    affine = _compose(YOLOAffine(SIZE, translate=0.0, scale=0.5))
    for seed in range(30):
        affine.set_random_seed(seed)
        out = affine(image=canvas, bboxes=np.zeros((0, 4)), labels=np.zeros(0))["image"]
        assert out.shape == (SIZE, SIZE, 3) and (out == 200).all()


def test_object_scale_after_augmentation_follows_the_affine_scale(demo_dataset):
    # Without mosaic, translation, colour and flip, a real object's size changes by the affine's factor alone,
    # which the recipe promises to be U[1 - scale, 1 + scale].
    augmentation = TrainAugmentation(
        SIZE, AugmentConfig(translate=0.0, scale=0.5, hsv_h=0, hsv_s=0, hsv_v=0, fliplr=0)
    )
    augmentation.reseed(0)
    single = next(i for i in range(len(demo_dataset)) if len(demo_dataset.index.targets(i)[0]) == 1)
    image, boxes, labels = demo_dataset.load_resized(single)
    width = boxes[0, 2] - boxes[0, 0]
    factors = []
    for _ in range(400):
        _, out_boxes, _ = augmentation(image, boxes, labels)
        # A box cut by the output's edge says nothing of the scale: left out.
        if len(out_boxes) and (out_boxes[0, :2] > 0.5).all() and (out_boxes[0, 2:] < SIZE - 0.5).all():
            factors.append(float(out_boxes[0, 2] - out_boxes[0, 0]) / width)
    factors = np.array(factors)
    assert len(factors) > 200
    assert factors.min() >= 0.5 - 0.03 and factors.max() <= 1.5 + 0.03
    assert np.allclose(np.quantile(factors, [0.1, 0.5, 0.9]), [0.6, 1.0, 1.4], atol=0.07)


def test_mosaic_samples_show_images_and_objects_as_the_reference_does(demo_dataset):
    # Measured on the demo (400 images, 256 px, colour off, 300 samples): the reference's mosaic samples are
    # 9.8 % grey and hold 1.87x the boxes of one image; A.Mosaic with its cells centred and a zoomed-out
    # affine gave 34 % grey and 1.27x.
    dataset = demo_dataset
    dataset.augmentation = TrainAugmentation(SIZE, AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0))
    grey, counts = [], []
    for k in range(200):
        dataset.epoch = k // len(dataset)  # a sample's draws are a function of (seed, epoch, index)
        sample = dataset[k % len(dataset)]
        grey.append(float((sample["image"] == PAD_VALUE).all(0).float().mean()))
        counts.append(len(sample["boxes"]))
        assert ((sample["boxes"] >= 0) & (sample["boxes"] <= SIZE)).all()
    per_image = np.mean([len(dataset.index.targets(i)[0]) for i in range(len(dataset))])
    assert np.mean(grey) < 0.16
    assert np.mean(counts) > 1.55 * per_image


# The HSV tests read the output back as OpenCV 8-bit HSV (hue 0..179): the transform writes HSV -> RGB and the
# test reads RGB -> HSV. That round trip's error, derived per pixel from the output's value V and range
# D = max - min = s * v / 255 (and checked on every 8-bit HSV colour below):
# - HSV -> RGB gives the max channel V exactly and misses min and middle by under 1 level: OpenCV's vectorised
#   loop truncates ((-1, 0]), its scalar loop (a row's last pixels) rounds (+-0.5). Within a sixth of the
#   circle (30 levels) hue is 30 * f, f = (mid - min) / D; errors e_mid and e_min move f by
#   (e_mid - (1 - f) * e_min) / D, under 1 / D either way: hue by under 30 / D levels. Saturation
#   255 * D / V moves by under 255 / V.
# - RGB -> HSV rounds to a level after a fixed-point division by D (hue) or V (saturation) whose 12-bit
#   reciprocal tables are rounded: error <= 0.5 + 5 * 255 * 0.5 / 2**12 for hue (its numerator is <= 5 D) and
#   <= 0.5 + 255 * 0.5 / 2**12 for saturation. Value reads back exactly.
with np.errstate(divide="ignore"):  # infinite at D = 0 (grey has no hue) and V = 0 (black, no saturation)
    HUE_BOUND = 30 / np.arange(256) + 0.5 + 5 * 255 * 0.5 / 2**12  # by D
    SATURATION_BOUND = 255 / np.arange(256) + 0.5 + 255 * 0.5 / 2**12  # by V


def round_trip_bounds(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (..., 3) bounds of |HSV read back - HSV written| (hue, saturation, value)."""
    r, g, b = np.moveaxis(rgb, -1, 0)
    value = np.maximum(np.maximum(r, g), b)
    spread = value - np.minimum(np.minimum(r, g), b)
    return np.stack([HUE_BOUND[spread], SATURATION_BOUND[value], np.zeros(value.shape)], -1)


@pytest.mark.parametrize("width", [1, 256], ids=["scalar", "vectorised"])
def test_rgb_hsv_round_trip_stays_within_the_derived_bounds(width):
    hsv = np.empty((180, 256, 256, 3), np.uint8)  # every 8-bit HSV colour
    hsv[..., 0] = np.arange(180)[:, None, None]
    hsv[..., 1] = np.arange(256)[:, None]
    hsv[..., 2] = np.arange(256)
    hsv = hsv.reshape(-1, width, 3)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    error = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.int16) - hsv
    error[..., 0] = (error[..., 0] + 90) % 180 - 90  # hue is circular
    assert (np.abs(error) <= round_trip_bounds(rgb)).all()


def _hsv_after_augmentation(
    hsv: tuple[int, int, int], gains: np.ndarray, seeds: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image of one HSV colour through the training pipeline with only the HSV gains on: its HSV as the
    transform reads it, and per seed the output's HSV and that HSV's round-trip bounds."""
    rgb = cv2.cvtColor(np.array([[hsv]], np.uint8), cv2.COLOR_HSV2RGB)
    image = np.full((32, 32, 3), rgb[0, 0])
    reference = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[0, 0].astype(np.float64)
    config = AugmentConfig(translate=0, scale=0, hsv_h=gains[0], hsv_s=gains[1], hsv_v=gains[2], fliplr=0)
    augmentation = TrainAugmentation(32, config)
    no_boxes = np.zeros((0, 4), np.float32)
    outputs, bounds = [], []
    for seed in range(seeds):
        augmentation.reseed(seed)
        out, _, _ = augmentation(image, no_boxes, np.zeros(0, np.int64))
        outputs.append(cv2.cvtColor(out, cv2.COLOR_RGB2HSV)[16, 16].astype(np.float64))
        bounds.append(round_trip_bounds(out[16, 16]))
    return reference, np.array(outputs), np.array(bounds)


def _assert_multiplied_within_the_gains(hsv: tuple[int, int, int], gains: np.ndarray, seeds: int) -> None:
    reference, outputs, bounds = _hsv_after_augmentation(hsv, gains, seeds)
    # The lookup tables truncate x * factor to a level (-1 < error <= 0), then the round trip adds +-bounds.
    assert (outputs >= reference * (1 - gains) - 1 - bounds).all()
    assert (outputs <= reference * (1 + gains) + bounds).all()
    # The gains are used in full: 300 draws of U[-1, 1] span over 90 % of it (but with probability 2e-7),
    # and the measurement shrinks the span of x * factor by at most 1 + 2 bounds.
    expected = 0.9 * 2 * gains * reference - 1 - 2 * bounds.max(0)
    assert (outputs.max(0) - outputs.min(0) >= expected).all()


def test_hsv_gains_change_hue_saturation_and_value_within_the_gains():
    # Hue, saturation and value are multiplied by factors in [1 - g, 1 + g], as the reference's tables do.
    _assert_multiplied_within_the_gains((100, 120, 150), np.array([0.015, 0.7, 0.4]), 300)


@pytest.mark.parametrize("hue", [10, 170])
def test_hsv_hue_gain_multiplies_the_hue(hue):
    # On a saturated, bright colour (D = 255) the round trip errs by 0.78 at most: hue 170 x U[0.985, 1.015]
    # moves by up to 2.55 levels (the gain is used in full), hue 10 by 0.15 (a hue shift, as A.ColorJitter
    # makes, would move it by up to 2.7).
    _assert_multiplied_within_the_gains((hue, 255, 255), np.array([0.015, 0.0, 0.0]), 300)


def test_box_candidates_follow_the_reference_rule():
    before = np.array([[0, 0, 100, 100]] * 4, np.float64)
    after = np.array(
        [
            [0, 0, 50, 50],  # scale 0.5, all visible: kept
            [0, 0, 50, 4.9],  # under 10 % of the scaled area: dropped
            [0, 0, 50, 5.1],  # just over 10 %: kept
            [0, 0, 2, 40],  # side of 2 px: dropped
        ]
    )
    assert box_candidates(before, after, gain=0.5).tolist() == [True, False, True, False]


def _random_items(rng: np.random.Generator, count: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``count`` (image, boxes, labels): noise images with long side SIZE, three random boxes each."""
    items = []
    for k in range(count):
        short = int(rng.integers(40, SIZE + 1))
        h, w = (SIZE, short) if rng.random() < 0.5 else (short, SIZE)
        corner = rng.uniform(0, 0.8, (3, 2)) * (w, h)
        boxes = np.concatenate([corner, corner + rng.uniform(0.05, 0.2, (3, 2)) * (w, h)], 1)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        items.append((image, boxes.astype(np.float32), np.full(3, k)))
    return items


@pytest.mark.parametrize("degrees", [0.0, 10.0])
def test_rendering_only_what_the_output_shows_matches_the_whole_mosaic(degrees):
    # A sample is planned before any image is read, and only the part of the 2S canvas that the affine reads
    # is built: images the output shows nothing of are not needed (None here). The result is the whole
    # canvas's, warped: the same boxes (those of left-out images would all be dropped) and pixels (with
    # rotation, OpenCV's fixed-point coordinates may round a pixel by one level otherwise).
    config = AugmentConfig(degrees=degrees, hsv_h=0, hsv_s=0, hsv_v=0, fliplr=0)
    augmentation = TrainAugmentation(SIZE, config)
    rng = np.random.default_rng(0)
    left_out, changed = 0, []
    for seed in range(60):
        images, boxes, labels = (list(part) for part in zip(*_random_items(rng, 4), strict=True))
        augmentation.reseed(seed)
        plan = augmentation.plan([image.shape[:2] for image in images])
        shown = [image if visible else None for image, visible in zip(images, plan.visible, strict=True)]
        left_out += plan.visible.count(False)
        image, out_boxes, out_labels = augmentation.apply(plan, shown, boxes, labels)

        canvas = np.empty((2 * SIZE, 2 * SIZE, 3), np.uint8)
        paste((0, 0, 2 * SIZE, 2 * SIZE), list(plan.cells), images, PAD_VALUE, canvas)
        expected = warp(canvas, plan.matrix, SIZE, PAD_VALUE)
        placed = [
            place_boxes(b, im.shape[:2], cell, plan.canvas_hw)
            for b, im, cell in zip(boxes, images, plan.cells, strict=True)
        ]
        on_canvas = np.concatenate([b[keep] for b, keep in placed])
        canvas_labels = np.concatenate([lb[keep] for lb, (_, keep) in zip(labels, placed, strict=True)])
        expected_boxes, keep = affine_boxes(on_canvas, plan.matrix, plan.gain, SIZE)
        assert np.array_equal(out_boxes, expected_boxes.astype(np.float32))
        assert np.array_equal(out_labels, canvas_labels[keep])
        assert np.abs(image.astype(int) - expected).max() <= (1 if degrees else 0)
        changed.append((image != expected).any(-1).mean())
    assert left_out > 10
    assert np.mean(changed) < 0.01


def test_the_draws_of_a_sample_are_independent():
    # One stream serves the mosaic centre, the affine, the HSV gains and the flip in turn. (A seed per step,
    # as albumentations' Compose seeds its transforms, tied them: the flip came exactly when the centre lay
    # left of the middle and the hue gain was under 1, and the zoom followed the centre's y.)
    augmentation = TrainAugmentation(SIZE)
    draws = []
    for seed in range(2000):
        augmentation.reseed(seed)
        plan = augmentation.plan([(SIZE, SIZE)] * 4)
        (_, _, cx, cy), _ = plan.cells[0]  # the first image ends at the centre
        hsv = np.ravel([np.asarray(value, np.float64) for value in plan.hsv.values()])
        draws.append([cx, cy, plan.gain, *hsv, plan.flip])
    correlation = np.corrcoef(np.array(draws, np.float64).T)
    assert np.abs(correlation[~np.eye(len(correlation), dtype=bool)]).max() < 0.1
