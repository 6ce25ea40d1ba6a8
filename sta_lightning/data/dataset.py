"""Datasets turning a CocoIndex (or image files) into letterboxed or augmented samples; the batch collate.

A sample is a dict: ``image`` (3, S, S) uint8 RGB, ``boxes`` (n, 4) float32 xyxy input pixels, ``labels`` (n,)
int64, ``image_id`` int, ``orig_size`` (h, w), ``scale`` float and ``pad`` (x, y) such that
original = (box - pad) / scale. For augmented training samples ``scale`` is the long-side resize ratio and
``pad`` is (0, 0): after mosaic and affine no single mapping back exists, and none is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sta_lightning.data.coco import CocoIndex, check_image_file
from sta_lightning.data.transforms import TrainAugmentation
from sta_lightning.geometry import letterbox, read_image, resize_long_side

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class CocoDetectionDataset(Dataset):
    """Images and targets of a CocoIndex at input size S: letterboxed, or augmented by ``augmentation``.

    ``mosaic`` is the probability of a 4-image mosaic for a training sample; ``mosaic_enabled`` (set through
    the datamodule's ``set_epoch``) switches it off for the last epochs. ``epoch`` and ``mosaic_enabled`` live
    in shared memory, so persistent DataLoader workers read what the main process sets.

    The random draws of training sample i (mosaic or not, its partners, the whole augmentation) are a
    function of (``seed``, ``epoch``, i) alone: the same on any process, in any DataLoader worker, whatever
    came before. So a resumed fit, another worker count or another DDP layout see the same samples.
    """

    def __init__(
        self,
        index: CocoIndex,
        image_size: int,
        augmentation: TrainAugmentation | None = None,
        mosaic: float = 1.0,
    ) -> None:
        self.index = index
        self.image_size = image_size
        self.augmentation = augmentation
        self.mosaic = mosaic
        self.seed = 0  # base seed of the training augmentation
        self._epoch_state = torch.tensor([0, 1], dtype=torch.int64).share_memory_()  # epoch, mosaic on

    def __len__(self) -> int:
        return len(self.index)

    @property
    def epoch(self) -> int:
        return int(self._epoch_state[0])

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self._epoch_state[0] = epoch

    @property
    def mosaic_enabled(self) -> bool:
        return bool(self._epoch_state[1])

    @mosaic_enabled.setter
    def mosaic_enabled(self, enabled: bool) -> None:
        self._epoch_state[1] = int(enabled)

    def load_resized(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Image i resized to long side S, its boxes (n, 4) in resized pixels, labels (n,), and the ratio."""
        image = read_image(self.index.image_path(i), bool(self.index.exif_oriented[i]))
        image, ratio = resize_long_side(image, self.image_size)
        boxes, labels = self.index.targets(i)
        return image, boxes * np.float32(ratio), labels.copy(), ratio

    def __getitem__(self, i: int) -> dict:
        image, boxes, labels, ratio = self.load_resized(i)
        if self.augmentation is None:
            image, pad = letterbox(image, self.image_size)
            boxes = boxes + np.asarray(pad * 2, dtype=np.float32)
        else:
            rng = np.random.default_rng(sample_seed(self.seed, self.epoch, i, stream=0))
            self.augmentation.reseed(sample_seed(self.seed, self.epoch, i, stream=1))
            partners = None
            if self.mosaic_enabled and self.mosaic > 0 and rng.random() < self.mosaic:
                partners = [self.load_resized(int(j))[:3] for j in rng.integers(0, len(self), size=3)]
            image, boxes, labels = self.augmentation(image, boxes, labels, partners)
            pad = (0, 0)
        return {
            "image": _to_chw_tensor(image),
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "image_id": int(self.index.image_ids[i]),
            "orig_size": tuple(int(v) for v in self.index.sizes[i]),
            "scale": ratio,
            "pad": pad,
        }


class ImageFolderDataset(Dataset):
    """Letterboxed images for prediction; ``path`` is the file.

    ``image_ids`` (default: the running index) and ``exif_oriented`` (default: all True, the EXIF-oriented
    view, as a viewer shows it) come from an annotation file's ``CocoIndex`` when one is given.
    """

    def __init__(
        self,
        paths: list[Path],
        image_size: int,
        image_ids: list[int] | None = None,
        exif_oriented: list[bool] | None = None,
    ) -> None:
        self.paths = paths
        self.image_size = image_size
        self.image_ids = list(range(len(paths))) if image_ids is None else [int(i) for i in image_ids]
        self.exif_oriented = (
            [True] * len(paths) if exif_oriented is None else [bool(e) for e in exif_oriented]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        image = read_image(self.paths[i], apply_exif_orientation=self.exif_oriented[i])
        orig_size = image.shape[:2]
        image, ratio = resize_long_side(image, self.image_size)
        image, pad = letterbox(image, self.image_size)
        return {
            "image": _to_chw_tensor(image),
            "boxes": torch.zeros((0, 4), dtype=torch.float32),
            "labels": torch.zeros((0,), dtype=torch.int64),
            "image_id": self.image_ids[i],
            "orig_size": orig_size,
            "scale": ratio,
            "pad": pad,
            "path": str(self.paths[i]),
        }


def list_image_files(source: str | Path | list[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand an image path, a folder (its image files, sorted) or a list of paths; split off unusable files.

    Returns (usable paths, [(path, reason)] of the unusable ones: missing, unreadable or not an image, a
    missing path given directly included). Raises ValueError when no image file is found.
    """
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    paths: list[Path] = []
    for item in map(Path, sources):
        if item.is_dir():
            paths.extend(sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            paths.append(item)
    if not paths:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found in {source}")
    reasons = {p: check_image_file(p) for p in paths}
    good = [p for p in paths if reasons[p] is None]
    bad = [(str(p), reasons[p]) for p in paths if reasons[p] is not None]
    return good, bad


def collate_detection(samples: list[dict]) -> dict:
    """Stack samples into the batch of the shared contract.

    ``images`` (B, 3, S, S) uint8; ``batch_idx`` (M,) int64, ``cls`` (M,) int64, ``bboxes`` (M, 4) float32
    xyxy input pixels; ``image_ids`` (B,) int64; ``orig_sizes`` (B, 2) int64 (h, w); ``scales`` (B,) float32;
    ``pads`` (B, 2) float32 (x, y); plus ``paths`` (list of str) for prediction samples.
    """
    counts = [len(s["labels"]) for s in samples]
    batch = {
        "images": torch.stack([s["image"] for s in samples]),
        "batch_idx": torch.repeat_interleave(
            torch.arange(len(samples)), torch.tensor(counts, dtype=torch.int64)
        ),
        "cls": torch.cat([s["labels"] for s in samples]).long(),
        "bboxes": torch.cat([s["boxes"] for s in samples]).float().reshape(-1, 4),
        "image_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
        "orig_sizes": torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64),
        "scales": torch.tensor([s["scale"] for s in samples], dtype=torch.float32),
        "pads": torch.tensor([s["pad"] for s in samples], dtype=torch.float32),
    }
    if "path" in samples[0]:
        batch["paths"] = [s["path"] for s in samples]
    return batch


def sample_seed(base: int, epoch: int, index: int, stream: int) -> int:
    """A 32-bit seed of one random stream (0: mosaic choice and partners, 1: the augmentation) of training
    sample ``index`` in ``epoch`` under the base seed ``base``."""
    return int(np.random.SeedSequence([base % 2**63, epoch, index, stream]).generate_state(1)[0])
