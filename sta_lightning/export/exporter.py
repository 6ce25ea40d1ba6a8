"""Write a detector as ONNX, TorchScript or a torch.export ExportedProgram, with its JSON sidecar.

The graph is ``DeployModel``: the contract of ``sta_lightning.deploy.contract``. ONNX goes through
``torch.export`` and torch's dynamo ONNX exporter (onnx and onnxscript: the ``export`` extra); TorchScript
is a trace. STA blocks size their work by the map, so every format holds one input size; the batch can stay
free (``dynamic_batch``).
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sta_lightning.classes import Classes
from sta_lightning.deploy.contract import DECODED_OUTPUT, DETECTIONS_OUTPUT, INPUT_NAME, metadata_path
from sta_lightning.export.nms import PaddedNMS
from sta_lightning.geometry import PAD_VALUE
from sta_lightning.models import YOLOv8
from sta_lightning.models.yolo import check_image_size

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript", "exported_program": ".pt2"}
"""Export format -> the usual file suffix."""
BATCH_DIM = "batch"


class DeployModel(nn.Module):
    """images (B, 3, S, S) in [0, 1] -> decoded (B, 4 + nc, N) of the eval-mode detector, or with ``nms``
    its detections (B, max_det, 6)."""

    def __init__(self, detector: YOLOv8, nms: PaddedNMS | None = None) -> None:
        super().__init__()
        self.detector = detector.eval()
        self.nms = nms

    def forward(self, images: Tensor) -> Tensor:
        decoded, _ = self.detector(images)
        return decoded if self.nms is None else self.nms(decoded)


def installed_version(package: str) -> str:
    """The installed version of ``package``, or "not installed" (a checkout run from its folder)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def export_detector(
    detector: YOLOv8,
    output: str | Path,
    format: str = "onnx",
    image_size: int = 640,
    batch: int = 1,
    dynamic_batch: bool = False,
    half: bool = False,
    nms: PaddedNMS | None = None,
    device: str = "cpu",
    classes: Classes | None = None,
    checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``detector`` (a copy: the argument is left as it is) to ``output`` and its sidecar beside it.

    ``batch`` images per call, or any number with ``dynamic_batch``; ``half`` makes weights and input float16
    (ONNX and torch.export trace without running, a TorchScript trace runs once on ``device``). Raises
    ValueError naming an unknown format or an unusable size. Returns the sidecar's content.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}, expected one of {', '.join(FORMATS)}")
    check_image_size(image_size)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    model = DeployModel(copy.deepcopy(detector), nms).to(device, dtype)
    # torch.export specialises a dimension of size 1, so a free batch is traced with 2 images.
    example = torch.zeros(
        2 if dynamic_batch else batch, 3, image_size, image_size, dtype=dtype, device=device
    )
    versions = {
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "sta_lightning": installed_version("sta_lightning"),
    }
    with torch.no_grad(), warnings.catch_warnings():
        # torchvision's NMS shape function calls an API that torch deprecates: nothing to act on here.
        warnings.filterwarnings("ignore", "`create_unbacked_symint` is deprecated", FutureWarning)
        if format == "torchscript":
            _save_torchscript(model, example, output)
        else:
            dynamic_shapes = {INPUT_NAME: {0: torch.export.Dim(BATCH_DIM, min=1)}} if dynamic_batch else None
            program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
            if format == "onnx":
                versions.update(_save_onnx(program, example, output, dynamic_batch, nms is not None))
            else:
                torch.export.save(program, output)
    classes = classes or Classes.anonymous(detector.num_classes)
    metadata = _sidecar(model, output, format, image_size, BATCH_DIM if dynamic_batch else batch, dtype)
    metadata.update(
        class_names=classes.names,
        category_ids=classes.category_ids,
        checkpoint=None if checkpoint is None else str(checkpoint),
        versions=versions,
    )
    metadata_path(output).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def _save_torchscript(model: DeployModel, example: Tensor, output: Path) -> None:
    # The trace records the STA chunking and grids of this input size as constants (TracerWarnings say so):
    # intended, as every format holds one size; the batch stays traced.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(output))


def _save_onnx(
    program: torch.export.ExportedProgram, example: Tensor, output: Path, dynamic_batch: bool, with_nms: bool
) -> dict[str, Any]:
    """Convert to ONNX; returns the versions involved (onnx, onnxscript, opset)."""
    try:
        import onnx  # noqa: F401 (torch's ONNX exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs onnx and onnxscript: pip install -e '.[export]' ({error})"
        ) from error
    onnx_program = torch.onnx.export(
        program,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[DETECTIONS_OUTPUT if with_nms else DECODED_OUTPUT],
        dynamic_shapes={INPUT_NAME: {0: BATCH_DIM}} if dynamic_batch else None,
        external_data=False,
        verbose=False,
    )
    onnx_program.save(str(output))
    return {
        "onnx": version("onnx"),
        "onnxscript": version("onnxscript"),
        "opset": onnx_program.model.opset_imports[""],
    }


def _sidecar(
    model: DeployModel,
    output: Path,
    format: str,
    image_size: int,
    batch: int | str,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """The sidecar's description of the file, its model, input and output."""
    detector, nms = model.detector, model.nms
    anchors = sum((image_size // stride) ** 2 for stride in detector.strides)
    if nms is None:
        output_layout = {
            "name": DECODED_OUTPUT,
            "shape": [batch, 4 + detector.num_classes, anchors],
            "dtype": str(dtype).removeprefix("torch."),
            "layout": "cx, cy, w, h in input pixels, then the class probabilities; anchors of strides 8, 16, "
            "32, row-major",
        }
    else:
        output_layout = {
            "name": DETECTIONS_OUTPUT,
            "shape": [batch, nms.max_det, 6],
            "dtype": "float32",
            "layout": "x1, y1, x2, y2 in input pixels, score, class index; sorted by descending score, "
            "padded with zero rows",
        }
    return {
        "format": format,
        "file": output.name,
        "model": {
            "scale": detector.scale,
            "num_classes": detector.num_classes,
            "sta": [asdict(placement) for placement in detector.sta_placements],
        },
        "image_size": image_size,
        "letterbox_colour": PAD_VALUE,
        "input": {
            "name": INPUT_NAME,
            "shape": [batch, 3, image_size, image_size],
            "dtype": str(dtype).removeprefix("torch."),
            "layout": "RGB in [0, 1]; long side resized to image_size, then padded to a centred square",
        },
        "output": output_layout,
        "nms": None if nms is None else nms.settings(),
    }
