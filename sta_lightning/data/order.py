"""The order of the images in a loader, shared by the DDP processes batch by batch.

Training: ``epoch_order``, the permutation of (seed, epoch) (torch's ``randperm`` under seed + epoch, the one
``DistributedSampler`` draws). Rect evaluation: ``rect_order``, the images by aspect ratio, each letterboxed
to its batch's shape (``rect_shapes``), as the reference validates. ``BatchSliceSampler`` pads an order to a
multiple of the process count (repeating its last image) and, instead of dealing the positions out one by
one as ``DistributedSampler`` does, cuts it into global batches of batch_size x world_size images, of which
process r takes the r-th contiguous slice. So N processes of batch b see at each step the images of one
process's batch of N x b (a rect batch's shape included), and a run of consecutive positions (a mosaic group
of ``COCODetectionDataset``) whose length divides b lies in one process's batch, which one DataLoader worker
loads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DistributedSampler


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    """(size,) int64: the order of the ``size`` images in ``epoch``."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(size, generator=generator).numpy()


def rect_order(sizes: np.ndarray, file_names: np.ndarray) -> np.ndarray:
    """(N,) image indices by aspect ratio h / w, ascending, for the (N, 2) (h, w) ``sizes``: as the reference
    sorts, numpy's default argsort of the ratios of the images in file-name order."""
    by_name = np.argsort(np.asarray(file_names, dtype=str), kind="stable")
    aspect = sizes[by_name, 0] / sizes[by_name, 1]
    return by_name[np.argsort(aspect)]


def rect_shapes(
    sizes: np.ndarray, order: np.ndarray, batch_size: int, image_size: int, stride: int = 32, pad: float = 0.5
) -> np.ndarray:
    """(N, 2) int64: the letterbox (h, w) of each image, that of its batch (``batch_size`` consecutive
    images of ``order``), the reference's rect shape: with r the batch's aspect ratios h / w, (max r, 1) when
    all are below 1, (1, 1 / min r) when all are above 1, else (1, 1); times image_size / stride, plus
    ``pad``, rounded up, times stride. So the long side is image_size + stride with the reference's
    validation pad of 0.5."""
    aspect = sizes[order, 0] / sizes[order, 1]
    shapes = np.zeros((len(order), 2), dtype=np.int64)
    for start in range(0, len(order), batch_size):
        ratios = aspect[start : start + batch_size]
        relative = (1.0, 1.0)
        if ratios.max() < 1:
            relative = (ratios.max(), 1.0)
        elif ratios.min() > 1:
            relative = (1.0, 1 / ratios.min())
        shape = np.ceil(np.asarray(relative) * image_size / stride + pad).astype(np.int64) * stride
        shapes[order[start : start + batch_size]] = shape
    return shapes


class BatchSliceSampler(DistributedSampler):
    """The image indices of ``dataset`` that process ``rank`` of ``world_size`` loads, in batches of
    ``batch_size``: slice ``rank`` of each global batch of the padded order, a fixed ``order`` (rect
    evaluation) or, without one, the ``epoch_order`` of the current epoch (``set_epoch``). ``len``:
    ceil(len(dataset) / world_size) on every process (a short last global batch is sliced alike). A
    ``DistributedSampler``, so Lightning uses it as it is under DDP."""

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        order: np.ndarray | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=order is None, seed=seed)
        self.batch_size = batch_size
        self.order = order

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(self.seed, self.epoch, len(self.dataset)) if self.order is None else self.order
        order = np.concatenate([order, np.full(self.total_size - len(order), order[-1])])
        for start in range(0, self.num_samples, self.batch_size):
            length = min(self.batch_size, self.num_samples - start)
            first = start * self.num_replicas + self.rank * length
            yield from order[first : first + length].tolist()
