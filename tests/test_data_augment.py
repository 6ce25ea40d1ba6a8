"""Training data: draws that depend on (seed, epoch, index) only, epoch order, close_mosaic, valid targets;
the recipe's optional augmentations on real demo samples: flipud, shear, perspective, mixup, copy-paste and
pixel-level albumentations from the config (their statistics against the reference:
benchmarks/augment_stats.py)."""

import json
import random
import warnings
from dataclasses import fields

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from sta_lightning.data import AugmentConfig, DemoDataModule, LoaderConfig
from sta_lightning.data.coco_index import load_coco_index
from sta_lightning.data.errors import DataWarning
from sta_lightning.data.index_cache import CACHE_DIR_ENV
from sta_lightning.data.order import BatchSliceSampler, epoch_order
from sta_lightning.data.transforms import PAD_VALUE, TrainAugmentation, letterbox, pixel_transform
from sta_lightning.data.yolo_augment import copy_paste

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


def _train_data(root, **kwargs) -> DemoDataModule:
    """The demo's training data at SIZE px; ``kwargs`` are fields of LoaderConfig or AugmentConfig."""
    groups = {
        group: {name: value for name, value in kwargs.items() if name in {f.name for f in fields(group)}}
        for group in (LoaderConfig, AugmentConfig)
    }
    dm = DemoDataModule(
        root=str(root),
        num_train=24,
        num_val=4,
        image_size=SIZE,
        loader=LoaderConfig(**groups[LoaderConfig]),
        augment=AugmentConfig(**groups[AugmentConfig]),
    )
    dm.setup("fit")
    return dm


def _epoch(dm: DemoDataModule, epoch: int, world_size: int = 1, rank: int = 0) -> list[dict]:
    dm.set_epoch(epoch, 100)
    return list(dm.training_loader(epoch, world_size, rank))


def _equal(batches_a: list[dict], batches_b: list[dict]) -> bool:
    return len(batches_a) == len(batches_b) and all(
        a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in ("images", "bboxes", "image_ids"))
        for a, b in zip(batches_a, batches_b, strict=True)
    )


EVERY_OPTION = dict(
    mixup=0.5,
    degrees=10.0,
    shear=5.0,
    perspective=0.0005,
    flipud=0.5,
    albumentations=({"class_path": "albumentations.Blur", "init_args": {"p": 0.5}},),
)


@pytest.mark.parametrize(
    "recipe", [{}, EVERY_OPTION, {"mosaic_group": 4}], ids=["default", "every-option", "mosaic-group"]
)
def test_an_epoch_depends_on_the_seed_and_epoch_only_not_on_workers_or_global_state(
    demo_root, monkeypatch, recipe
):
    in_process = _train_data(demo_root, num_workers=0, batch_size=8, **recipe)
    two_workers = _train_data(demo_root, num_workers=2, batch_size=8, **recipe)
    torch.manual_seed(123)  # torch's global generator plays no part in the data
    epoch0 = _epoch(in_process, 0)
    torch.manual_seed(456)
    assert _equal(_epoch(two_workers, 0), epoch0)
    assert _equal(_epoch(in_process, 0), epoch0)  # and it repeats

    epoch1 = _epoch(in_process, 1)
    assert not torch.equal(epoch1[0]["image_ids"], epoch0[0]["image_ids"])  # another order
    order0 = torch.cat([b["image_ids"] for b in epoch0])
    assert sorted(order0.tolist()) == sorted(torch.cat([b["image_ids"] for b in epoch1]).tolist())
    # The same image in another epoch is augmented differently.
    first = order0[0]
    again = next(b["images"][i] for b in epoch1 for i, j in enumerate(b["image_ids"]) if j == first)
    assert not torch.equal(again, epoch0[0]["images"][0])

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what seed_everything(7) sets
    assert not _equal(_epoch(_train_data(demo_root, num_workers=0, batch_size=8, **recipe), 0), epoch0)


@pytest.mark.parametrize("recipe", [{}, {"mosaic_group": 4}], ids=["default", "mosaic-group"])
def test_ranks_share_the_one_process_batches(demo_root, recipe):
    # With N processes of batch b, each step's N batches, one after the other, are one process's batch of
    # N x b: the same images, augmented alike.
    single = _epoch(_train_data(demo_root, num_workers=0, batch_size=8, **recipe), 3)
    per_rank = [
        _epoch(_train_data(demo_root, num_workers=0, batch_size=4, **recipe), 3, 2, rank) for rank in (0, 1)
    ]
    joined = [
        {key: torch.cat([a[key], b[key]]) for key in ("images", "image_ids")}
        for a, b in zip(*per_rank, strict=True)
    ]
    assert len(joined) == len(single) == 3
    for got, expected in zip(joined, single, strict=True):
        assert torch.equal(got["image_ids"], expected["image_ids"])
        assert torch.equal(got["images"], expected["images"])


def test_a_mosaic_group_is_decoded_once_and_holds_the_partners(demo_root):
    # mosaic_group 4 with batch 8: each mosaic's partners are images of its group, 4 consecutive positions
    # of the epoch's order; every image is decoded at most once in the epoch (against about 3.5 times).
    decodes = {}
    for group in (None, 4):
        dm = _train_data(demo_root, num_workers=0, batch_size=8, mosaic_group=group)
        dataset = dm.datasets["train"]
        read, reads = dataset._read, []
        dataset._read = lambda i, read=read, reads=reads: reads.append(i) or read(i)
        batches = _epoch(dm, 2)
        decodes[group] = len(reads)
    order = torch.cat([b["image_ids"] for b in batches]).tolist()
    index_of = {int(image_id): i for i, image_id in enumerate(dataset.index.image_ids)}
    assert order == [dataset.index.image_ids[i] for i in epoch_order(dataset.seed, 2, len(dataset))]
    assert decodes[4] <= len(dataset) < 2 * len(dataset) < decodes[None]
    rng = np.random.default_rng(0)
    for p, image_id in enumerate(order):
        group = {index_of[j] for j in order[p // 4 * 4 : p // 4 * 4 + 4]}
        assert set(dataset.mosaic_partners(index_of[image_id], rng)) <= group


def test_the_sampler_slices_global_batches_of_the_padded_order():
    # One process: the order DistributedSampler draws. Three processes of batch 2 over 10 images: the padded
    # order (12 positions, the last image repeated) in global batches of 6, process r taking slice r.
    order = epoch_order(5, 3, 10).tolist()
    single = BatchSliceSampler(range(10), 4, seed=5)
    single.set_epoch(3)
    distributed = DistributedSampler(range(10), num_replicas=1, rank=0, shuffle=True, seed=5)
    distributed.set_epoch(3)
    assert list(single) == list(distributed) == order
    padded = order + order[-1:] * 2
    for rank in range(3):
        sampler = BatchSliceSampler(range(10), 2, seed=5, world_size=3, rank=rank)
        sampler.set_epoch(3)
        assert len(sampler) == 4
        assert list(sampler) == padded[2 * rank : 2 * rank + 2] + padded[6 + 2 * rank : 8 + 2 * rank]


def test_persistent_workers_follow_the_epoch_and_the_mosaic_switch(demo_root):
    # One loader for three epochs of a 3-epoch fit with close_mosaic 1: its two workers are started once and
    # still draw each epoch's samples (mosaic off in the last one) as a fresh in-process loader does.
    dm = _train_data(demo_root, num_workers=2, batch_size=8, close_mosaic=1)
    reference = _train_data(demo_root, num_workers=0, batch_size=8, close_mosaic=1)
    loader = dm.training_loader(0)
    workers = None
    for epoch in range(3):
        dm.set_epoch(epoch, 3)
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        pids = [worker.pid for worker in loader._iterator._workers]
        assert workers in (None, pids)  # the same processes every epoch
        workers = pids
        reference.set_epoch(epoch, 3)
        assert _equal(batches, list(reference.training_loader(epoch)))
    assert not dm.datasets["train"].mosaic_enabled


def test_close_mosaic_leaves_the_letterboxed_image(demo_root):
    # With every random geometric and colour step neutralised, a sample without mosaic is the plain letterbox.
    dm = _train_data(
        demo_root,
        num_workers=0,
        close_mosaic=3,
        translate=0.0,
        scale=0.0,
        hsv_h=0.0,
        hsv_s=0.0,
        hsv_v=0.0,
        fliplr=0.0,
    )
    dataset = dm.datasets["train"]
    resized, boxes, _ = dataset.load_resized(0)
    padded, pad = letterbox(resized, 160)
    expected = torch.from_numpy(padded).permute(2, 0, 1)
    dm.set_epoch(6, 10)
    assert dataset.mosaic_enabled and not torch.equal(dataset[0]["image"], expected)
    dm.set_epoch(7, 10)
    assert not dataset.mosaic_enabled
    sample = dataset[0]
    assert torch.equal(sample["image"], expected)
    assert torch.allclose(sample["boxes"], torch.from_numpy(boxes) + torch.tensor(pad * 2), atol=1e-3)


def test_training_targets_are_valid(demo_root):
    dm = _train_data(demo_root, num_workers=0, batch_size=8)
    for batch in dm.train_dataloader():
        boxes = batch["bboxes"]
        assert batch["images"].shape[1:] == (3, 160, 160) and batch["images"].dtype == torch.uint8
        assert batch["cls"].dtype == torch.int64 and ((batch["cls"] >= 0) & (batch["cls"] < 5)).all()
        assert ((boxes >= 0) & (boxes <= 160)).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 2 - 1e-4).all()
        assert batch["batch_idx"].max() < len(batch["image_ids"])


def _train_set(root, **augment):
    """The training dataset of ``_train_data`` with workers off."""
    return _train_data(root, num_workers=0, **augment).datasets["train"]


def test_flipud_flips_the_sample_upside_down(demo_root):
    plain, flipped = _train_set(demo_root, fliplr=0.0), _train_set(demo_root, fliplr=0.0, flipud=1.0)
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
    without, mixed = _train_set(demo_root), _train_set(demo_root, mixup=1.0)
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


def test_copy_paste_mirrors_objects_by_their_polygons_where_the_mirror_is_free():
    # A red triangle on the left is free on the right; a centred square's mirror covers itself; an object
    # without polygons is never pasted.
    image = np.full((100, 200, 3), 50, np.uint8)
    triangle = np.array([[10, 10], [50, 10], [10, 60]], np.float32)
    cv2.fillPoly(image, [triangle.astype(np.int32)], (255, 0, 0))
    square = np.array([[90, 70], [110, 70], [110, 90], [90, 90]], np.float32)
    cv2.fillPoly(image, [square.astype(np.int32)], (0, 255, 0))
    boxes = np.array([[10, 10, 50, 60], [90, 70, 110, 90], [150, 70, 170, 90]], np.float64)
    original = image.copy()
    pasted, mirrored, mirrored_polygons = copy_paste(
        image, (0, 0, 200, 100), boxes, [[triangle], [square], []], 1.0, random.Random(0)
    )
    assert pasted.tolist() == [0]
    assert mirrored.tolist() == [[150, 10, 190, 60]]
    assert [[p.tolist() for p in shapes] for shapes in mirrored_polygons] == [
        [[[190, 10], [150, 10], [190, 60]]]
    ]
    changed = np.nonzero((image != original).any(-1))
    # filled polygons cover their edge pixels: the mirrored fill spans columns 199 - 50 to 199 - 10
    assert changed[1].min() == 149 and changed[1].max() == 189 and changed[0].min() == 10
    assert (image[15, 185] == (255, 0, 0)).all()  # the mirrored triangle's top right corner
    assert (image[55, 160] == 50).all()  # outside the mirrored triangle: untouched
    # Within a region (the single image's part of a padded canvas) the mirror is about the region's centre.
    image = original.copy()
    pasted, mirrored, _ = copy_paste(image, (0, 0, 100, 100), boxes[:1], [[triangle]], 1.0, random.Random(0))
    assert mirrored.tolist() == [[50, 10, 90, 60]] and (image[15, 85] == (255, 0, 0)).all()
    assert (image[:, 100:] == original[:, 100:]).all()
    # round(fraction x candidates) objects are pasted: 0.5 of 1 rounds to 0, as Python's round does.
    assert (
        len(
            copy_paste(
                original.copy(), (0, 0, 200, 100), boxes, [[triangle], [square], []], 0.5, random.Random(0)
            )[0]
        )
        == 0
    )


def test_copy_paste_adds_mirrored_objects_to_demo_samples_and_stops_with_mosaic(demo_root):
    plain, pasting = _train_set(demo_root, **COLOUR_OFF), _train_set(demo_root, copy_paste=1.0, **COLOUR_OFF)
    extra = [len(pasting[i]["boxes"]) - len(plain[i]["boxes"]) for i in range(12)]
    assert min(extra) >= 0 and sum(extra) > 6
    assert all(torch.equal(pasting[i]["image"], pasting[i]["image"]) for i in range(3))  # deterministic
    assert all(torch.equal(pasting[i]["boxes"], pasting[i]["boxes"]) for i in range(3))
    plain.mosaic_enabled = pasting.mosaic_enabled = False  # close_mosaic ends copy-paste too
    for i in range(6):
        assert torch.equal(pasting[i]["image"], plain[i]["image"])
        assert torch.equal(pasting[i]["boxes"], plain[i]["boxes"])


def test_polygon_boxes_enclose_the_warped_polygon_inside_the_output():
    # A white triangle rotated alone (no mosaic): its polygon box is the white pixels' box within 2 px (the
    # fill covers its edge pixels; interpolation), while the warped corners of its box enclose more.
    config = AugmentConfig(degrees=45.0, scale=0.2, **COLOUR_OFF, fliplr=0.0, polygon_boxes=True)
    augmentation = TrainAugmentation(SIZE, config)
    image = np.full((SIZE, SIZE, 3), PAD_VALUE, np.uint8)
    triangle = np.array([[40, 40], [120, 40], [40, 120]], np.float32)
    cv2.fillPoly(image, [triangle.astype(np.int32)], (255, 255, 255))
    box = np.array([[40.0, 40.0, 120.0, 120.0]])
    tighter = 0
    for seed in range(20):
        augmentation.reseed(seed)
        plan = augmentation.plan([(SIZE, SIZE)])
        out, boxes, _ = augmentation.render(plan, [image], [box], [np.array([0])], [[[triangle]]])
        _, corner_boxes, _ = augmentation.render(plan, [image], [box], [np.array([0])])
        ys, xs = np.nonzero((out == 255).all(-1))
        mask_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
        assert len(boxes) == 1 and np.abs(boxes[0] - mask_box).max() <= 2.0, (seed, boxes[0], mask_box)
        tighter += np.prod(boxes[0, 2:] - boxes[0, :2]) < 0.9 * np.prod(
            corner_boxes[0, 2:] - corner_boxes[0, :2]
        )
    assert tighter > 10


def test_objects_without_polygons_are_reported_once_when_copy_paste_is_on(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.jpg"), np.full((40, 60, 3), 90, np.uint8))
    box = {"image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "iscrowd": 0}
    annotations = [
        {**box, "id": 1, "segmentation": [[5, 5, 25, 5, 5, 25]]},
        {**box, "id": 2, "segmentation": {"size": [40, 60], "counts": "abc"}},
        {**box, "id": 3, "segmentation": [[5, 5, 25]]},
        {**box, "id": 4},
    ]
    document = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 60}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(document))
    index = load_coco_index(tmp_path / "a.json", images)
    polygons = index.polygons(0)
    assert [len(p) for p in polygons] == [1, 0, 0, 0]
    assert polygons[0][0].tolist() == [[5, 5], [25, 5], [5, 25]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index.warn_missing_polygons()
    (message,) = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert (
        "3 of 4 objects have none and are not pasted (the file has 2 RLE masks or malformed polygons"
        in message
    )
    assert "annotation 2 segmentation is an RLE mask" in message
    assert "annotation 3 segmentation[0] is not an even count of at least 6 numbers" in message


def test_pixel_albumentations_come_from_the_config_and_keep_the_boxes(demo_root):
    grey = _train_set(
        demo_root, albumentations=({"class_path": "albumentations.ToGray", "init_args": {"p": 1.0}},)
    )
    colour = _train_set(demo_root)
    for i in range(4):
        a, b = colour[i], grey[i]
        image = b["image"].numpy()
        assert (image[0] == image[1]).all() and (image[1] == image[2]).all()
        assert np.array_equal(a["boxes"].numpy(), b["boxes"].numpy())
    blurred = _train_set(
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


def test_multi_scale_sizes_are_multiples_of_32_in_half_to_one_and_a_half_s_drawn_from_seed_and_iteration(
    demo_root, monkeypatch
):
    plain = _train_data(demo_root, num_workers=0)
    assert {plain.input_size(i) for i in range(50)} == {SIZE}
    data, again = (_train_data(demo_root, num_workers=0, multi_scale=True) for _ in range(2))
    sizes = [data.input_size(i) for i in range(2000)]
    assert sizes == [again.input_size(i) for i in range(2000)]  # every process, every resume
    assert set(sizes) == {64, 96, 128, 160, 192, 224, 256}  # U{[80, 272)} floored to a multiple of 32
    assert len(set(sizes[:8])) > 1
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    assert [data.input_size(i) for i in range(50)] != sizes[:50]
