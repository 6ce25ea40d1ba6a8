"""What an exported detector promises its runtimes: tensor names, prediction NMS defaults, the JSON sidecar.

Input ``images``: (B, 3, S, S) RGB in [0, 1] (float32, float16 with ``--half``), letterboxed to S with grey
``PAD_VALUE``. Output ``decoded``: (B, 4 + nc, N), cx, cy, w, h in input pixels then class probabilities; or,
with NMS built in, ``detections``: (B, max_det, 6), x1, y1, x2, y2 in input pixels, score, class index, rows
sorted by descending score and padded with zeros (a real detection has a score > 0). The sidecar beside the
model (its name + ``.json``) states the rest: classes, input size, letterbox colour, NMS thresholds, versions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sta_lightning.models.postprocess import PREDICT_NMS

__all__ = [
    "DECODED_OUTPUT",
    "DETECTIONS_OUTPUT",
    "INPUT_NAME",
    "PREDICT_NMS",
    "metadata_path",
    "read_metadata",
]

INPUT_NAME = "images"
DECODED_OUTPUT = "decoded"
DETECTIONS_OUTPUT = "detections"


def metadata_path(model_path: str | Path) -> Path:
    """The JSON sidecar of an exported model: ``model.onnx`` -> ``model.onnx.json`` (one per file, so the
    formats of one model can share a folder and a name)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def read_metadata(model_path: str | Path) -> dict[str, Any]:
    """The sidecar of ``model_path`` as a dict; FileNotFoundError names the missing file."""
    path = metadata_path(model_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no sidecar {path} beside {model_path}: export the model with python -m sta_lightning export"
        )
    return json.loads(path.read_text())
