"""Training data: draws that depend on (seed, epoch, index) only, epoch order, close_mosaic, valid targets."""

from dataclasses import fields

import pytest
import torch

from sta_lightning.data import AugmentConfig, DemoDataModule, LoaderConfig
from sta_lightning.data.index_cache import CACHE_DIR_ENV
from sta_lightning.data.transforms import letterbox


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    DemoDataModule(root=str(root), num_train=24, num_val=4).prepare_data()
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))


def _train_data(root, **kwargs) -> DemoDataModule:
    """The demo's training data at 160 px; ``kwargs`` are fields of LoaderConfig or AugmentConfig."""
    groups = {
        group: {name: value for name, value in kwargs.items() if name in {f.name for f in fields(group)}}
        for group in (LoaderConfig, AugmentConfig)
    }
    dm = DemoDataModule(
        root=str(root),
        num_train=24,
        num_val=4,
        image_size=160,
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


@pytest.mark.parametrize("recipe", [{}, EVERY_OPTION], ids=["default", "every-option"])
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


def test_ranks_share_the_one_process_batches(demo_root):
    # With N processes of batch b, each step's N batches are the images of one process's batch of N x b.
    single = _train_data(demo_root, num_workers=0, batch_size=8)
    expected = [set(b["image_ids"].tolist()) for b in _epoch(single, 3)]
    per_rank = [_epoch(_train_data(demo_root, num_workers=0, batch_size=4), 3, 2, rank) for rank in (0, 1)]
    got = [
        set(a["image_ids"].tolist()) | set(b["image_ids"].tolist()) for a, b in zip(*per_rank, strict=True)
    ]
    assert got == expected


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
