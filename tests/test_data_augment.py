"""Training augmentation: per-worker and per-epoch draws, reproducibility, close_mosaic, valid targets."""

import pytest
import torch
from torch.utils.data import DataLoader

from sta_lightning.data import DemoDataModule
from sta_lightning.data import coco as coco_module
from sta_lightning.data.dataset import collate_detection, seed_worker
from sta_lightning.data.transforms import letterbox


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    DemoDataModule(root=str(root), num_train=24, num_val=4).prepare_data()
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(coco_module.CACHE_DIR_ENV, str(tmp_path / "cache"))


def _train_data(root, **kwargs) -> DemoDataModule:
    dm = DemoDataModule(root=str(root), num_train=24, num_val=4, image_size=160, **kwargs)
    dm.setup("fit")
    return dm


def _same_image_epochs(dataset, epochs: int = 2) -> list[list[torch.Tensor]]:
    """Per epoch, 4 augmented draws of image 0 by 2 workers (draws 0, 2 from worker 0; 1, 3 from worker 1)."""
    loader = DataLoader(
        dataset,
        batch_size=1,
        sampler=[0] * 4,
        num_workers=2,
        collate_fn=collate_detection,
        worker_init_fn=seed_worker,
        persistent_workers=False,
    )
    return [[batch["images"][0] for batch in loader] for _ in range(epochs)]


def test_augmentation_differs_across_workers_and_epochs_and_repeats_for_a_seed(demo_root):
    dataset = _train_data(demo_root, num_workers=2).datasets["train"]
    torch.manual_seed(0)
    first_run = _same_image_epochs(dataset)
    (w0_first, w1_first, w0_second, _), (w0_next_epoch, *_) = first_run
    assert not torch.equal(w0_first, w1_first)  # workers draw differently
    assert not torch.equal(w0_first, w0_second)  # successive draws in one worker differ
    assert not torch.equal(w0_first, w0_next_epoch)  # a new epoch does not repeat the last one
    torch.manual_seed(0)
    second_run = _same_image_epochs(dataset)
    assert all(
        torch.equal(a, b)
        for run_a, run_b in zip(first_run, second_run, strict=True)
        for a, b in zip(run_a, run_b, strict=True)
    )


def test_in_process_loading_reseeds_per_epoch(demo_root):
    dm = _train_data(demo_root, num_workers=0)
    dataset = dm.datasets["train"]

    def draw(epoch):
        dm.set_epoch(epoch, 100)
        return dataset[0]["image"]

    torch.manual_seed(3)
    epoch0, epoch1 = draw(0), draw(1)
    assert not torch.equal(epoch0, epoch1)
    torch.manual_seed(3)
    assert torch.equal(draw(0), epoch0) and torch.equal(draw(1), epoch1)


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
    resized, boxes, _, ratio = dataset.load_resized(0)
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
    torch.manual_seed(0)
    for batch in dm.train_dataloader():
        boxes = batch["bboxes"]
        assert batch["images"].shape[1:] == (3, 160, 160) and batch["images"].dtype == torch.uint8
        assert batch["cls"].dtype == torch.int64 and ((batch["cls"] >= 0) & (batch["cls"] < 5)).all()
        assert ((boxes >= 0) & (boxes <= 160)).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 2 - 1e-4).all()
        assert batch["batch_idx"].max() < len(batch["image_ids"])
