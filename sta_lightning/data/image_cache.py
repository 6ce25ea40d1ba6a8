"""An opt-in cache of a dataset's images, decoded and resized once into shared memory for all its workers.

``SharedImageCache`` decodes every image up front (a thread pool: OpenCV releases the GIL while it decodes)
into one buffer of torch shared memory, which DataLoader workers map instead of copying it: inherited when
they are forked, passed by handle when they are spawned. It holds exactly what the dataset would decode, so
a sample is the same with the cache or without it. Its memory is the images' bytes, h x w x 3 each at their
resized (h, w), allocated at once; a buffer larger than the memory available is refused with that size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch


def available_memory() -> int | None:
    """Bytes a new shared-memory buffer can take on this machine: the smaller of the memory available
    (``MemAvailable`` of /proc/meminfo) and the free space of /dev/shm, where shared memory lives; None
    where neither is known."""
    limits = []
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    if os.path.isdir("/dev/shm"):
        stat = os.statvfs("/dev/shm")
        limits.append(stat.f_bavail * stat.f_frsize)
    return min(limits) if limits else None


class SharedImageCache:
    """N images of (h_i, w_i, 3) uint8, filled up front by ``load`` (i -> image i) with ``threads`` threads.

    ``cache[i]`` is a read-only (h_i, w_i, 3) view of the shared buffer; ``nbytes`` is its size.
    """

    def __init__(
        self, shapes: list[tuple[int, int]], load: Callable[[int], np.ndarray], threads: int | None = None
    ) -> None:
        self.shapes = [(int(h), int(w)) for h, w in shapes]
        self.offsets = np.concatenate([[0], np.cumsum([h * w * 3 for h, w in self.shapes], dtype=np.int64)])
        self.nbytes = int(self.offsets[-1])
        available = available_memory()
        if available is not None and self.nbytes > available:
            raise MemoryError(
                f"caching {len(self.shapes)} images takes {self.nbytes / 2**30:.1f} GiB of shared memory, "
                f"but only {available / 2**30:.1f} GiB are available (free memory and /dev/shm): train "
                "without the image cache, or at a smaller image size"
            )
        self._buffer = torch.empty(self.nbytes, dtype=torch.uint8).share_memory_()
        flat = self._buffer.numpy()

        def fill(i: int) -> None:
            image = load(i)
            if image.shape != (*self.shapes[i], 3):
                raise ValueError(
                    f"image {i} loaded as {image.shape}, the cache expects {(*self.shapes[i], 3)}"
                )
            flat[self.offsets[i] : self.offsets[i + 1]] = image.reshape(-1)

        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(fill, range(len(self.shapes))))

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> np.ndarray:
        image = self._buffer.numpy()[self.offsets[i] : self.offsets[i + 1]].reshape(*self.shapes[i], 3)
        image.flags.writeable = False
        return image
