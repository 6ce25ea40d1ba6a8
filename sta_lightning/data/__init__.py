"""sta_lightning.data: detection data, from annotation files to batches.

Parsing, image checks, the scan cache, datasets and transforms import without Lightning. The datamodules
(``COCODataModule``, ``DemoDataModule``, ``YOLODataModule``, ``VOCDataModule``) import Lightning, so they
load on first access (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sta_lightning.data.config import AugmentConfig, LoaderConfig, PredictSource, Split
from sta_lightning.data.errors import AnnotationError, DataWarning

if TYPE_CHECKING:
    from sta_lightning.data.datamodule import COCODataModule, DemoDataModule, VOCDataModule, YOLODataModule

_DATAMODULES = ("COCODataModule", "DemoDataModule", "VOCDataModule", "YOLODataModule")
__all__ = [
    "AnnotationError",
    "AugmentConfig",
    "COCODataModule",
    "DataWarning",
    "DemoDataModule",
    "LoaderConfig",
    "PredictSource",
    "Split",
    "VOCDataModule",
    "YOLODataModule",
]


def __getattr__(name: str) -> Any:
    if name in _DATAMODULES:
        return getattr(importlib.import_module("sta_lightning.data.datamodule"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
