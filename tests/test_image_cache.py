"""The shared-memory image cache and reduced JPEG decoding: the same samples (boxes), the memory stated."""

import logging

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sta_lightning.data import DemoDataModule, LoaderConfig
from sta_lightning.data import image_cache as image_cache_module
from sta_lightning.data.coco_index import load_coco_index
from sta_lightning.data.dataset import COCODetectionDataset, collate_detection
from sta_lightning.data.index_cache import CACHE_DIR_ENV
from sta_lightning.data.transforms import TrainAugmentation
from sta_lightning.geometry import jpeg_reduction, read_resized, resized_shape

SIZE = 160


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("demo"), tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_ENV, str(cache))
        dm = DemoDataModule(
            root=str(root), num_train=16, num_val=4, image_size=SIZE, loader=LoaderConfig(num_workers=0)
        )
        dm.prepare_data()
        dm.setup("fit")
    return dm.datasets["train"].index


def _training_data(index, **kwargs) -> COCODetectionDataset:
    dataset = COCODetectionDataset(index, SIZE, TrainAugmentation(SIZE), **kwargs)
    dataset.seed = 3
    return dataset


def _batches(dataset, num_workers: int) -> list[dict]:
    return list(DataLoader(dataset, batch_size=4, num_workers=num_workers, collate_fn=collate_detection))


def _same(batches_a: list[dict], batches_b: list[dict]) -> bool:
    keys = ("images", "bboxes", "cls", "batch_idx", "image_ids")
    return len(batches_a) == len(batches_b) and all(
        torch.equal(a[key], b[key]) for a, b in zip(batches_a, batches_b, strict=True) for key in keys
    )


def test_cached_samples_are_the_decoded_ones_with_0_and_2_workers(demo_index):
    decoded = _training_data(demo_index)
    cached = _training_data(demo_index, cache="ram")
    # The memory: the resized images' bytes, in shared memory.
    expected = sum(h * w * 3 for h, w in (resized_shape(hw, SIZE) for hw in demo_index.sizes))
    assert cached.cache.nbytes == expected
    assert cached.cache._buffer.is_shared()
    assert not cached.load_image(0).flags.writeable
    for epoch in (0, 1):
        decoded.epoch = cached.epoch = epoch
        reference = _batches(decoded, 0)
        for workers in (0, 2):
            assert _same(_batches(cached, workers), reference)


def test_a_cache_larger_than_the_free_memory_is_refused_with_its_size(demo_index, monkeypatch):
    monkeypatch.setattr(image_cache_module, "available_memory", lambda: 1000)
    expected = sum(h * w * 3 for h, w in (resized_shape(hw, SIZE) for hw in demo_index.sizes))
    with pytest.raises(MemoryError, match=f"{expected / 2**30:.1f} GiB of shared memory"):
        _training_data(demo_index, cache="ram")
    with pytest.raises(ValueError, match="cache must be"):
        _training_data(demo_index, cache="disk")


def test_reduced_decoding_of_a_large_jpeg_keeps_the_shape_and_the_picture(tmp_path):
    # A smooth 700 x 500 photo-like image: at 160 px it is decoded at 1/4 (175 x 125), then resized.
    y, x = np.mgrid[:500, :700]
    image = np.stack([x * 255 // 700, y * 255 // 500, (x + y) * 255 // 1200], -1).astype(np.uint8)
    cv2.circle(image, (350, 250), 120, (200, 40, 90), -1)
    path = tmp_path / "large.jpg"
    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert jpeg_reduction(path, (500, 700), SIZE) == 4
    assert jpeg_reduction(path, (500, 700), 400) == 1  # not twice the size needed
    png = tmp_path / "large.png"
    cv2.imwrite(str(png), image)
    assert jpeg_reduction(png, (500, 700), SIZE) == 1  # only JPEGs decode at a reduced size
    full, reduced = (read_resized(path, (500, 700), SIZE, reduced=flag) for flag in (False, True))
    assert full.shape == reduced.shape == (*resized_shape((500, 700), SIZE), 3)
    assert np.abs(full.astype(int) - reduced).mean() < 2.0
    with pytest.raises(OSError, match="its annotation says 640 x 500"):
        read_resized(path, (500, 640), SIZE, reduced=True)


def test_reduced_decoding_changes_training_pixels_only_not_boxes_nor_evaluation(demo_index):
    # Demo images of 240..480 px at 160 px: those of 320 px and more decode at 1/2.
    factors = [jpeg_reduction(demo_index.image_path(i), hw, SIZE) for i, hw in enumerate(demo_index.sizes)]
    assert 2 in factors
    full, reduced = _training_data(demo_index), _training_data(demo_index, reduced_decoding=True)
    differences = []
    for i in range(len(demo_index)):
        a, b = full[i], reduced[i]
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
        differences.append((a["image"].int() - b["image"].int()).abs().float().mean())
    assert 0 < np.mean(differences) < 4.0
    evaluation = (COCODetectionDataset(demo_index, SIZE, reduced_decoding=flag)[0] for flag in (False, True))
    assert torch.equal(*(sample["image"] for sample in evaluation))


def test_reduced_decoding_on_real_photos(shared_data):
    # coco128 at 320 px: 110 of its 128 photos decode at 1/2; measured mean |difference| 1.7 grey levels.
    coco128 = shared_data / "coco128"
    index = load_coco_index(coco128 / "annotations" / "instances_train2017.json", coco128 / "train2017")
    differences = []
    for i in range(0, len(index), 4):
        path, hw = index.image_path(i), tuple(index.sizes[i])
        if jpeg_reduction(path, hw, 320) == 2:
            full, reduced = (read_resized(path, hw, 320, reduced=flag) for flag in (False, True))
            assert full.shape == reduced.shape
            differences.append(np.abs(full.astype(int) - reduced).mean())
    assert len(differences) > 20 and np.mean(differences) < 2.5


def test_the_datamodule_states_the_memory_of_its_cache(tmp_path, caplog):
    data = DemoDataModule(
        root=str(tmp_path / "demo"), num_train=6, num_val=2, image_size=SIZE, loader=LoaderConfig(cache="ram")
    )
    data.prepare_data()
    with caplog.at_level(logging.INFO):
        data.setup("fit")
    cache = data.datasets["train"].cache
    assert cache is not None and data.datasets["val"].cache is None  # evaluation decodes as it always did
    assert "Image cache: 6 images" in caplog.text and f"{cache.nbytes / 2**20:.1f} MiB" in caplog.text
