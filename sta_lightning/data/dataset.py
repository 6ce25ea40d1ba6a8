"""Datasets turning a COCOIndex (or image files) into letterboxed or augmented samples; the batch collate.

A sample is a dict: ``image`` (3, S, S) uint8 RGB, ``boxes`` (n, 4) float32 xyxy input pixels, ``labels`` (n,)
int64, ``image_id`` int, ``orig_size`` (h, w), ``ratio`` float and ``pad`` (x, y) such that
original = (box - pad) / ratio. For augmented training samples ``ratio`` is the long-side resize ratio and
``pad`` is (0, 0): after mosaic and affine no single mapping back exists, and none is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from sta_lightning.data.coco_index import COCOIndex
from sta_lightning.data.image_cache import SharedImageCache
from sta_lightning.data.image_scan import IMAGE_SUFFIXES, check_image_file
from sta_lightning.data.order import epoch_order
from sta_lightning.data.transforms import SamplePlan, TrainAugmentation
from sta_lightning.geometry import letterbox, read_image, read_resized, resize_long_side, resized_shape


def _to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class COCODetectionDataset(Dataset):
    """Images and targets of a COCOIndex at input size S: letterboxed, or augmented by ``augmentation``.

    ``mosaic`` is the probability of a 4-image mosaic for a training sample and ``mixup`` that of blending it
    with a second rendered sample (partner uniform over the dataset, share of the first from Beta(32, 32), the
    boxes of both); the augmentation's copy-paste reads the objects' polygons from the index. A mosaic's three
    other images are uniform over the dataset, or with ``mosaic_group`` L over the L images of its group:
    positions [kL, (k + 1)L) of the epoch's order (``epoch_order``, the sampler's), whose decoded images the
    dataset keeps (the last 2L in each process: about 2L x S x S x 3 bytes) so that a group's images are
    decoded once. ``mosaic_enabled`` (set through the datamodule's ``set_epoch``) switches mosaic, mixup and
    copy-paste off for the last epochs, as the reference's close_mosaic does. ``epoch`` and ``mosaic_enabled``
    live in shared memory, so persistent DataLoader workers read what the main process sets.

    The random draws of training sample i (mosaic or not, its partners, the whole augmentation) are a
    function of (``seed``, ``epoch``, i) alone: the same on any process, in any DataLoader worker, whatever
    came before. So a resumed fit, another worker count or another DDP layout see the same samples. They are
    drawn before any image is read; mosaic images of which the augmented sample shows nothing are not read.

    ``reduced_decoding`` (off by default): training samples decode a JPEG at least twice the size they need
    at 1/2, 1/4 or 1/8 (``geometry.read_resized``): the same boxes, but pixels that differ from what
    evaluation, prediction and deployment decode (on coco128 by 1.7 grey levels on average at 320 px, 5 at
    256 px), for a decode 15-25 % faster on COCO-sized photos; worth it for photos many times the input size.
    Evaluation samples (no ``augmentation``) are always decoded in full and letterboxed to S x S, or to their
    (h, w) in ``letterbox_shapes`` (rect batches, ``COCODataModule``).
    ``cache``: "ram" decodes every image once, up front, into shared memory that all DataLoader workers read
    (``SharedImageCache``; ``cache.nbytes`` is its size: the resized images' bytes); samples stay the same.
    """

    def __init__(
        self,
        index: COCOIndex,
        image_size: int,
        augmentation: TrainAugmentation | None = None,
        mosaic: float = 1.0,
        mixup: float = 0.0,
        cache: Literal["ram"] | None = None,
        reduced_decoding: bool = False,
        mosaic_group: int | None = None,
    ) -> None:
        if cache not in (None, "ram"):
            raise ValueError(f"cache must be None or 'ram', got {cache!r}")
        if mosaic_group is not None and mosaic_group < 1:
            raise ValueError(f"data.augment.mosaic_group must be null or a positive count: {mosaic_group}")
        self.index = index
        self.image_size = image_size
        self.augmentation = augmentation
        self.mosaic = mosaic
        self.mixup = mixup
        self.reduced_decoding = reduced_decoding and augmentation is not None
        self.mosaic_group = mosaic_group
        self.letterbox_shapes: np.ndarray | None = None  # (N, 2) (h, w) per image; None: (S, S)
        self._order: tuple[int, np.ndarray, np.ndarray] | None = None  # epoch, its order, positions
        self._recent: OrderedDict[int, np.ndarray] = OrderedDict()  # decoded images of the latest groups
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
        """Image i at long side S: (h, w, 3) uint8 RGB (read-only when cached or kept for its group)."""
        if self.cache is not None:
            return self.cache[i]
        if self.mosaic_group is None:
            return self._read(i)
        if i in self._recent:
            self._recent.move_to_end(i)
        else:
            self._recent[i] = image = self._read(i)
            image.flags.writeable = False
            if len(self._recent) > 2 * self.mosaic_group:
                self._recent.popitem(last=False)
        return self._recent[i]

    def mosaic_partners(self, i: int, rng: np.random.Generator) -> list[int]:
        """The three other images of image i's mosaic in this epoch, drawn by ``rng``: uniform over the
        dataset, or over the images of i's group (``mosaic_group``)."""
        if self.mosaic_group is None:
            return [int(j) for j in rng.integers(0, len(self), size=3)]
        if self._order is None or self._order[0] != self.epoch:
            order = epoch_order(self.seed, self.epoch, len(self))
            positions = np.empty_like(order)
            positions[order] = np.arange(len(order))
            self._order = (self.epoch, order, positions)
        _, order, positions = self._order
        start = positions[i] // self.mosaic_group * self.mosaic_group
        group = order[start : start + self.mosaic_group]
        return [int(j) for j in group[rng.integers(0, len(group), size=3)]]

    def ratio(self, i: int) -> float:
        """Image i's resize ratio to long side S."""
        return self.image_size / max(int(v) for v in self.index.sizes[i])

    def target_scale(self, i: int) -> np.ndarray:
        """(2,) float32 x and y factors from image i's original pixels to its targets at long side S.

        Training: the resized sides over the original ones, the factors of the pixels themselves (the short
        side, rounded up, is up to one pixel's worth above ``ratio``), as the reference's targets, normalised
        to the resized image, follow them. Evaluation: ``ratio`` on both axes, the one factor by which a
        sample's boxes map back to the original image (``boxes_to_original``), as the reference maps its
        predictions back with one gain."""
        if self.augmentation is None:
            return np.full(2, self.ratio(i), dtype=np.float32)
        (h0, w0), (h, w) = self.index.sizes[i], self.resized_shape(i)
        return np.array([w / int(w0), h / int(h0)], dtype=np.float32)

    def load_targets(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (n, 4) float32 xyxy of image i in pixels at long side S and labels (n,) int64."""
        boxes, labels = self.index.targets(i)
        return boxes * np.tile(self.target_scale(i), 2), labels.copy()

    def load_polygons(self, i: int) -> list[list[np.ndarray]]:
        """Per box of ``load_targets(i)``, its polygons: (k, 2) float32 xy pixels at long side S."""
        scale = self.target_scale(i)
        return [[polygon * scale for polygon in shapes] for shapes in self.index.polygons(i)]

    def load_resized(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image i resized to long side S, its boxes (n, 4) in resized pixels and labels (n,)."""
        return self.load_image(i), *self.load_targets(i)

    def _render(
        self, i: int, streams: tuple[int, int], key: int | None = None
    ) -> tuple[np.random.Generator, SamplePlan, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Mosaic (with probability ``mosaic`` while enabled) and warp of image i, drawn from the random
        streams ``streams`` (mosaic choice and partners, augmentation) of sample ``key`` (default i) in
        this epoch; returns the first stream's generator (for the draws that follow), the plan and the
        rendering."""
        key = i if key is None else key
        rng = np.random.default_rng(sample_seed(self.seed, self.epoch, key, stream=streams[0]))
        self.augmentation.reseed(sample_seed(self.seed, self.epoch, key, stream=streams[1]))
        indices = [i]
        if self.mosaic_enabled and self.mosaic > 0 and rng.random() < self.mosaic:
            indices += self.mosaic_partners(i, rng)
        plan = self.augmentation.plan([self.resized_shape(j) for j in indices], paste=self.mosaic_enabled)
        images = [
            self.load_image(j) if shown else None for j, shown in zip(indices, plan.visible, strict=True)
        ]
        boxes, labels = zip(*(self.load_targets(j) for j in indices), strict=True)
        needed = plan.paste_seed is not None or self.augmentation.augment.polygon_boxes
        polygons = [self.load_polygons(j) for j in indices] if needed else None
        return rng, plan, self.augmentation.render(plan, images, list(boxes), list(labels), polygons)

    def __getitem__(self, i: int) -> dict:
        if self.augmentation is None:
            image, boxes, labels = self.load_resized(i)
            shape = self.image_size if self.letterbox_shapes is None else tuple(self.letterbox_shapes[i])
            image, pad = letterbox(image, shape)
            boxes = boxes + np.asarray(pad * 2, dtype=np.float32)
        else:
            rng, plan, (image, boxes, labels) = self._render(i, streams=(0, 1))
            if self.mosaic_enabled and self.mixup > 0 and rng.random() < self.mixup:
                partner = int(rng.integers(0, len(self)))
                share = rng.beta(32.0, 32.0)
                _, _, (other, other_boxes, other_labels) = self._render(partner, streams=(2, 3), key=i)
                image = (image * share + other * (1 - share)).astype(np.uint8)
                boxes = np.concatenate([boxes, other_boxes])
                labels = np.concatenate([labels, other_labels])
            image, boxes, labels = self.augmentation.finish(plan, image, boxes, labels)
            pad = (0, 0)
        return {
            "image": _to_chw_tensor(image),
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "image_id": int(self.index.image_ids[i]),
            "orig_size": tuple(int(v) for v in self.index.sizes[i]),
            "ratio": self.ratio(i),
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
