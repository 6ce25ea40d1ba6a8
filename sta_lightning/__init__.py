"""sta_lightning: YOLOv8 detectors with Super Token Attention, trained with PyTorch Lightning.

``DetectionModule`` and ``ModelEMA`` import Lightning, so they load on first access (PEP 562): the parts
without Lightning (``nn``, ``models``, ``geometry``, ``export``, ``deploy``) import without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sta_lightning.training import DetectionModule, ModelEMA

__all__ = ["DetectionModule", "ModelEMA"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("sta_lightning.training"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
