"""Datasets turning a COCOIndex (or image files) into letterboxed or augmented samples; the batch collate.

A sample is a dict: ``image`` (3, S, S) uint8 RGB, ``boxes`` (n, 4) float32 xyxy input pixels, ``labels`` (n,)
int64, ``image_id`` int, ``orig_size`` (h, w), ``ratio`` float and ``pad`` (x, y) such that
original = (box - pad) / ratio. For augmented training samples ``ratio`` is the long-side resize ratio and
``pad`` is (0, 0): after mosaic and affine no single mapping back exists, and none is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from sta_lightning.data.coco_index import COCOIndex
from sta_lightning.data.image_cache import SharedImageCache
from sta_lightning.data.image_scan import IMAGE_SUFFIXES, check_image_file
from sta_lightning.data.transforms import TrainAugmentation
from sta_lightning.geometry import letterbox, read_image, read_resized, resize_long_side, resized_shape


def _to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class COCODetectionDataset(Dataset):
    """Images and targets of a COCOIndex at input size S: letterboxed, or augmented by ``augmentation``.

    ``mosaic`` is the probability of a 4-image mosaic for a training sample; ``mosaic_enabled`` (set through
    the datamodule's ``set_epoch``) switches it off for the last epochs. ``epoch`` and ``mosaic_enabled`` live
    in shared memory, so persistent DataLoader workers read what the main process sets.

    The random draws of training sample i (mosaic or not, its partners, the whole augmentation) are a
    function of (``seed``, ``epoch``, i) alone: the same on any process, in any DataLoader worker, whatever
    came before. So a resumed fit, another worker count or another DDP layout see the same samples. They are
    drawn before any image is read; mosaic images of which the augmented sample shows nothing are not read.

    ``reduced_decoding`` (off by default): training samples decode a JPEG at least twice the size they need
    at 1/2, 1/4 or 1/8 (``geometry.read_resized``): the same boxes, but pixels that differ from what
    evaluation, prediction and deployment decode (on coco128 by 1.7 grey levels on average at 320 px, 5 at
    256 px), for a decode 15-25 % faster on COCO-sized photos; worth it for photos many times the input size.
    Evaluation samples (no ``augmentation``) are always decoded in full.
    ``cache``: "ram" decodes every image once, up front, into shared memory that all DataLoader workers read
    (``SharedImageCache``; ``cache.nbytes`` is its size: the resized images' bytes); samples stay the same.
    """

    def __init__(
        self,
        index: COCOIndex,
        image_size: int,
        augmentation: TrainAugmentation | None = None,
        mosaic: float = 1.0,
        cache: Literal["ram"] | None = None,
        reduced_decoding: bool = False,
    ) -> None:
        if cache not in (None, "ram"):
            raise ValueError(f"cache must be None or 'ram', got {cache!r}")
        self.index = index
        self.image_size = image_size
        self.augmentation = augmentation
        self.mosaic = mosaic
        self.reduced_decoding = reduced_decoding and augmentation is not None
        self.seed = 0  # base seed of the training augmentation
        self._epoch_state = torch.tensor([0, 1], dtype=torch.int64).share_memory_()  # epoch, mosaic on
        self.cache = None
        if cache == "ram":
            self.cache = SharedImageCache([self.resized_shape(i) for i in range(len(index))], self._read)

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

    def resized_shape(self, i: int) -> tuple[int, int]:
        """(h, w) of image i at long side S."""
        return resized_shape(self.index.sizes[i], self.image_size)

    def _read(self, i: int) -> np.ndarray:
        return read_resized(
            self.index.image_path(i),
            self.index.sizes[i],
            self.image_size,
            bool(self.index.exif_oriented[i]),
            reduced=self.reduced_decoding,
        )

    def load_image(self, i: int) -> np.ndarray:
        """Image i at long side S: (h, w, 3) uint8 RGB (a read-only view when cached)."""
        return self._read(i) if self.cache is None else self.cache[i]

    def load_targets(self, i: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Boxes (n, 4) float32 xyxy of image i in pixels at long side S, labels (n,) int64, and the ratio."""
        boxes, labels = self.index.targets(i)
        ratio = self.image_size / max(int(v) for v in self.index.sizes[i])
        return boxes * np.float32(ratio), labels.copy(), ratio

    def load_resized(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Image i resized to long side S, its boxes (n, 4) in resized pixels, labels (n,), and the ratio."""
        return self.load_image(i), *self.load_targets(i)

    def __getitem__(self, i: int) -> dict:
        if self.augmentation is None:
            image, boxes, labels, ratio = self.load_resized(i)
            image, pad = letterbox(image, self.image_size)
            boxes = boxes + np.asarray(pad * 2, dtype=np.float32)
        else:
            rng = np.random.default_rng(sample_seed(self.seed, self.epoch, i, stream=0))
            self.augmentation.reseed(sample_seed(self.seed, self.epoch, i, stream=1))
            indices = [i]
            if self.mosaic_enabled and self.mosaic > 0 and rng.random() < self.mosaic:
                indices += [int(j) for j in rng.integers(0, len(self), size=3)]
            plan = self.augmentation.plan([self.resized_shape(j) for j in indices])
            images = [
                self.load_image(j) if shown else None for j, shown in zip(indices, plan.visible, strict=True)
            ]
            boxes, labels, ratios = zip(*(self.load_targets(j) for j in indices), strict=True)
            image, boxes, labels = self.augmentation.apply(plan, images, list(boxes), list(labels))
            ratio, pad = ratios[0], (0, 0)
        return {
            "image": _to_chw_tensor(image),
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "image_id": int(self.index.image_ids[i]),
            "orig_size": tuple(int(v) for v in self.index.sizes[i]),
            "ratio": ratio,
            "pad": pad,
        }


class ImageFolderDataset(Dataset):
    """Letterboxed images for prediction; ``path`` is the file.

    ``image_ids`` (default: the running index) and ``exif_oriented`` (default: all True, the EXIF-oriented
    view, as a viewer shows it) come from an annotation file's ``COCOIndex`` when one is given.
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
            "ratio": ratio,
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
    xyxy input pixels; ``image_ids`` (B,) int64; ``orig_sizes`` (B, 2) int64 (h, w); ``ratios`` (B,) float32;
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
        "ratios": torch.tensor([s["ratio"] for s in samples], dtype=torch.float32),
        "pads": torch.tensor([s["pad"] for s in samples], dtype=torch.float32),
    }
    if "path" in samples[0]:
        batch["paths"] = [s["path"] for s in samples]
    return batch


def sample_seed(base: int, epoch: int, index: int, stream: int) -> int:
    """A 32-bit seed of one random stream (0: mosaic choice and partners, 1: the augmentation) of training
    sample ``index`` in ``epoch`` under the base seed ``base``."""
    return int(np.random.SeedSequence([base % 2**63, epoch, index, stream]).generate_state(1)[0])
