"""The recipe's optional augmentations on real demo samples: flipud, shear, perspective, mixup and
pixel-level albumentations from the config (their statistics against the reference:
benchmarks/augment_stats.py)."""

import numpy as np
import pytest

from sta_lightning.data import AugmentConfig, DemoDataModule, LoaderConfig
from sta_lightning.data.index_cache import CACHE_DIR_ENV
from sta_lightning.data.transforms import PAD_VALUE, TrainAugmentation, pixel_transform

SIZE = 160
COLOUR_OFF = dict(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    DemoDataModule(root=str(root), num_train=24, num_val=4).prepare_data()
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))


def train_set(root, **augment):
    dm = DemoDataModule(
        root=str(root),
        num_train=24,
        num_val=4,
        image_size=SIZE,
        loader=LoaderConfig(num_workers=0),
        augment=AugmentConfig(**augment),
    )
    dm.setup("fit")
    return dm.datasets["train"]


def test_flipud_flips_the_sample_upside_down(demo_root):
    plain, flipped = train_set(demo_root, fliplr=0.0), train_set(demo_root, fliplr=0.0, flipud=1.0)
    for i in range(8):
        a, b = plain[i], flipped[i]
        assert np.array_equal(b["image"].numpy(), a["image"].numpy()[:, ::-1])
        x1, y1, x2, y2 = a["boxes"].unbind(1)
        assert np.allclose(b["boxes"].numpy(), np.stack([x1, SIZE - y2, x2, SIZE - y1], 1), atol=1e-4)
        assert b["labels"].tolist() == a["labels"].tolist()


@pytest.mark.parametrize(("shear", "perspective"), [(10.0, 0.0), (0.0, 0.002), (10.0, 0.002)])
def test_shear_and_perspective_boxes_enclose_the_warped_object(shear, perspective):
    # A white rectangle on grey, warped alone (no mosaic): its box is the enclosing box of the warped
    # rectangle's corners, which is the bounding box of the white pixels up to a pixel of interpolation.
    config = AugmentConfig(shear=shear, perspective=perspective, scale=0.2, **COLOUR_OFF, fliplr=0.0)
    augmentation = TrainAugmentation(SIZE, config)
    image = np.full((SIZE, SIZE, 3), PAD_VALUE, np.uint8)
    box = np.array([[40.0, 50.0, 110.0, 100.0]])
    image[50:100, 40:110] = 255
    tilted = 0
    for seed in range(30):
        augmentation.reseed(seed)
        out, boxes, _ = augmentation(image, box, np.array([0]))
        ys, xs = np.nonzero((out == 255).all(-1))
        mask_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
        assert len(boxes) == 1
        assert np.abs(boxes[0] - mask_box).max() <= 1.5, (seed, boxes[0], mask_box)
        # A sheared or projected rectangle is no longer an axis-aligned one: its box holds grey corners.
        tilted += (
            (
                out[int(boxes[0, 1]) + 1 : int(boxes[0, 3]) - 1, int(boxes[0, 0]) + 1 : int(boxes[0, 2]) - 1]
                == PAD_VALUE
            )
            .all(-1)
            .any()
        )
    assert tilted > 20


def test_mixup_blends_a_second_sample_and_keeps_the_boxes_of_both(demo_root):
    without, mixed = train_set(demo_root), train_set(demo_root, mixup=1.0)
    extra = []
    for i in range(12):
        a, b = without[i], mixed[i]
        n = len(a["boxes"])
        # The sample's own draws come first and are unchanged; the partner's boxes follow.
        assert np.array_equal(b["boxes"][:n].numpy(), a["boxes"].numpy())
        assert b["labels"][:n].tolist() == a["labels"].tolist()
        assert not np.array_equal(b["image"].numpy(), a["image"].numpy())
        extra.append(len(b["boxes"]) - n)
    assert sum(extra) > 12  # the partners bring objects
    mixed.mosaic_enabled = without.mosaic_enabled = False  # close_mosaic ends mixup too
    assert all(np.array_equal(mixed[i]["image"].numpy(), without[i]["image"].numpy()) for i in range(6))


def test_pixel_albumentations_come_from_the_config_and_keep_the_boxes(demo_root):
    grey = train_set(
        demo_root, albumentations=({"class_path": "albumentations.ToGray", "init_args": {"p": 1.0}},)
    )
    colour = train_set(demo_root)
    for i in range(4):
        a, b = colour[i], grey[i]
        image = b["image"].numpy()
        assert (image[0] == image[1]).all() and (image[1] == image[2]).all()
        assert np.array_equal(a["boxes"].numpy(), b["boxes"].numpy())
    blurred = train_set(
        demo_root, albumentations=({"class_path": "albumentations.Blur", "init_args": {"p": 0.5}},)
    )
    assert all(np.array_equal(blurred[i]["image"].numpy(), blurred[i]["image"].numpy()) for i in range(4))


def test_a_transform_that_moves_pixels_or_does_not_exist_is_refused_by_name():
    with pytest.raises(ValueError, match="albumentations.HorizontalFlip is not a pixel-level"):
        pixel_transform({"class_path": "albumentations.HorizontalFlip", "init_args": {"p": 0.5}})
    with pytest.raises(ValueError, match="cannot import 'albumentations.NoSuchBlur'"):
        pixel_transform({"class_path": "albumentations.NoSuchBlur"})


def test_perspective_renders_the_whole_canvas():
    augmentation = TrainAugmentation(SIZE, AugmentConfig(perspective=0.001))
    augmentation.reseed(0)
    plan = augmentation.plan([(SIZE, SIZE)] * 4)
    assert plan.window == (0, 0, 2 * SIZE, 2 * SIZE) and all(plan.visible)
