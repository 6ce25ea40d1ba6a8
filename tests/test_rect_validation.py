"""Validation in rect batches: the reference's batch shapes, one shape per batch, boxes mapped back to the
original pixels exactly, the processes' slices forming the one-process batches, the dashboards on rect
images (pycocotools scoring of rect batches: tests/test_outputs.py)."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sta_lightning.callbacks.validation_samples import ValidationSamplesCallback
from sta_lightning.cli import main
from sta_lightning.data import DemoDataModule, LoaderConfig
from sta_lightning.data.index_cache import CACHE_DIR_ENV
from sta_lightning.data.order import rect_order, rect_shapes
from sta_lightning.geometry import boxes_to_original

SIZE = 160
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    DemoDataModule(root=str(root), num_train=4, num_val=13).prepare_data()
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))


def _validation_batches(root, batch_size: int, world_size: int = 1, rank: int = 0) -> list[dict]:
    dm = DemoDataModule(
        root=str(root),
        num_train=4,
        num_val=13,
        image_size=SIZE,
        loader=LoaderConfig(batch_size=batch_size, num_workers=0, rect=True),
    )
    dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
    dm.setup("validate")
    return list(dm.val_dataloader())


def test_batch_shapes_follow_the_reference_rule():
    # (h, w) sizes; by aspect: 427x640 (0.67), 480x640 (0.75), 500x500 (1), 640x480 (1.33), 600x300 (2),
    # 640x400 (1.6). Batches of 2 at 640, pad half a stride: landscape (0.75 x 640 / 32 + 0.5 -> 16) x 21
    # strides; mixed (1, 1) -> 21 x 21; portrait (1 x 640 / 32 + 0.5 -> 21) x (640 / 1.6 / 32 + 0.5 -> 13).
    sizes = np.array([[480, 640], [427, 640], [640, 480], [500, 500], [600, 300], [640, 400]])
    names = np.array(["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"])
    order = rect_order(sizes, names)
    assert order.tolist() == [1, 0, 3, 2, 5, 4]
    shapes = rect_shapes(sizes, order, batch_size=2, image_size=640)
    assert shapes.tolist() == [[512, 672], [512, 672], [672, 672], [672, 672], [672, 416], [672, 416]]
    # Without the pad, the long side is the input size and the short one is rounded up to a stride.
    assert rect_shapes(sizes, order, batch_size=2, image_size=640, pad=0.0)[1].tolist() == [480, 640]


def test_each_batch_has_one_shape_and_its_boxes_map_back_to_the_annotations(demo_root):
    batches = _validation_batches(demo_root, batch_size=4)
    dm = DemoDataModule(root=str(demo_root), num_train=4, num_val=13, image_size=SIZE)
    dm.setup("validate")
    index = dm.datasets["val"].index
    row = {int(image_id): i for i, image_id in enumerate(index.image_ids)}
    shapes, seen = set(), []
    for batch in batches:
        height, width = batch["images"].shape[-2:]
        shapes.add((height, width))
        assert height % 32 == 0 and width % 32 == 0 and max(height, width) == SIZE + 32
        for k, image_id in enumerate(batch["image_ids"].tolist()):
            seen.append(image_id)
            original = boxes_to_original(
                batch["bboxes"][batch["batch_idx"] == k],
                batch["ratios"][k],
                batch["pads"][k],
                batch["orig_sizes"][k],
            )
            expected, _ = index.targets(row[image_id])
            np.testing.assert_allclose(original.numpy(), expected, atol=1e-3)
    assert sorted(seen) == sorted(row)  # every image once
    assert len(shapes) > 1  # the demo's mixed aspect ratios give batches of several shapes
    aspects = [h / w for h, w in (index.sizes[row[i]] for i in seen)]
    assert aspects == sorted(aspects)


def test_two_processes_validate_the_one_process_batches(demo_root):
    # 13 images, 2 processes of batch 3 = 1 process of batch 6; the 14th position, padding, repeats the last.
    single = _validation_batches(demo_root, batch_size=6)
    per_rank = [_validation_batches(demo_root, batch_size=3, world_size=2, rank=rank) for rank in (0, 1)]
    assert [len(batches) for batches in per_rank] == [3, 3]
    for step, expected in enumerate(single):
        images = torch.cat([per_rank[rank][step]["images"] for rank in (0, 1)])
        ids = torch.cat([per_rank[rank][step]["image_ids"] for rank in (0, 1)])
        count = len(expected["image_ids"])
        assert torch.equal(ids[:count], expected["image_ids"])
        assert torch.equal(images[:count], expected["images"])
    assert ids[-1] == ids[-2]  # the padding, dropped by the evaluator as a repeated image id


def test_the_dashboards_draw_the_first_rect_batch(demo_root, tmp_path):
    # configs/demo.yaml's callbacks (attention maps, prediction images) take rank 0's first validation images:
    # with rect batches, images of the first batch, in its shape (images of several shapes would not stack).
    cli = main(
        [
            "validate",
            f"--config={REPO_ROOT / 'configs' / 'demo.yaml'}",
            f"--data.root={demo_root}",
            "--data.num_train=4",
            "--data.num_val=13",
            f"--data.image_size={SIZE}",
            "--data.loader.num_workers=0",
            "--data.loader.batch_size=4",
            "--data.loader.rect=true",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    first = next(iter(cli.trainer.val_dataloaders))
    shown = [c for c in cli.trainer.callbacks if isinstance(c, ValidationSamplesCallback)]
    assert len(shown) == 2
    for callback in shown:
        samples = callback._samples[1]
        assert torch.equal(samples["images"], first["images"][: callback.num_images])
    assert first["images"].shape[-2:] != (SIZE, SIZE)
