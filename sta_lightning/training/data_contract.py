"""DetectionData: what the DetectionModule needs of its datamodule (``COCODataModule`` and its kin).

The classes of the data are not part of it: the CLI links them to the module's ``classes`` argument.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class DetectionData(Protocol):
    """A datamodule the DetectionModule can train on, evaluate and record in checkpoints."""

    image_size: int  # the square input size S in pixels

    def annotation_file(self, stage: str) -> str | os.PathLike | None:
        """The COCO instances json that evaluation of ``stage`` ('fit', 'validate', 'test') scores against,
        or None when the stage has no annotations."""
        ...

    def input_size(self, iteration: int) -> int:
        """The square input size of training iteration ``iteration`` (``image_size``, or another under
        multi-scale training); the same on every process."""
        ...

    def class_counts(self) -> np.ndarray:
        """(C,) int64: the objects of each class in the training split (for class weights "auto")."""
        ...

    def set_epoch(self, epoch: int, max_epochs: int | None) -> None:
        """At each training epoch start: the epoch of the augmentation draws and the mosaic switch."""
        ...
