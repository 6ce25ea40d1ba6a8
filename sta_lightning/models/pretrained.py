"""Start a YOLOv8 (+ STA) detector from pretrained weights: reference ``.pt``, our ``.ckpt``, state dicts.

Reference (Ultralytics) checkpoints pickle their model objects. They are read with
``torch.load(weights_only=True)`` and inert stand-ins (``PickledObject``) for the classes of the allow-list
(the reference's and torch's module classes, the reference's argument namespaces, ``pathlib`` paths): a
stand-in keeps the pickled state and runs no code of the class it stands for, so no pickled code runs and the
reference package is never imported. A file that needs any other global is refused before unpickling
(``UnsafeCheckpointError`` names the global and the file).

Transfer is by structure: the reference's tensors (parameters and buffers in registration order) map by
position onto the detector's, with shapes checked; our own checkpoints and state dicts map by name. Class
branch tensors whose shapes differ (another class count) keep the model's fresh reference initialisation;
STA blocks absent from the file start as the identity (``STABlock.zero_residuals``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from sta_lightning.checkpoint_file import read_checkpoint
from sta_lightning.models.checkpoint import MODEL_PREFIX, is_training_checkpoint, read_trained
from sta_lightning.models.yolo import SCALES, STA_PREFIX, YOLOv8, is_sta_parameter, shape_without_unit_dims

# Globals that become inert stand-ins: module classes of the reference and of torch, the reference's
# argument namespaces and loss objects, paths.
STAND_IN_PREFIXES = ("ultralytics.", "torch.nn.modules.", "pathlib.")
CLASS_BRANCH_PREFIX = "head.class_branches."
_REFERENCE_KEY = re.compile(r"^model\.\d+\.")


class UnsafeCheckpointError(ValueError):
    """A checkpoint needs a global outside the allow-list: it is refused without being unpickled."""


class PickledObject:
    """Inert stand-in for a pickled object of an allow-listed class: it stores the pickled state and
    arguments and runs no code of the class it stands for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.pickled_args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.pickled_state = state


def _unresolved_attribute(owner: Any, name: str) -> PickledObject:
    """Stand-in for ``builtins.getattr`` in a pickle: records the lookup, performs none."""
    return PickledObject(owner, name)


def _stand_in(global_name: str) -> Any | None:
    if global_name.startswith(STAND_IN_PREFIXES):
        return PickledObject
    if global_name == "builtins.getattr":
        return _unresolved_attribute
    return None


def load_checkpoint_safely(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` with stand-ins for the allow-listed globals (module docstring).

    Raises FileNotFoundError for a missing file, UnsafeCheckpointError naming the first global outside the
    allow-list, and ``CheckpointError`` (a ValueError) naming a damaged file or one that is not a torch
    checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights: no such file {path}")

    def stand_ins(needed: list[str]) -> list[tuple[Any, str]]:
        allowed = []
        for name in needed:
            stand_in = _stand_in(name)
            if stand_in is None:
                raise UnsafeCheckpointError(
                    f"pretrained weights: {path} is refused: unpickling it needs the global {name!r}, which "
                    f"is outside the allow-list (classes under {', '.join(STAND_IN_PREFIXES)} and "
                    "builtins.getattr, read as inert stand-ins)"
                )
            allowed.append((stand_in, name))
        return allowed

    return read_checkpoint(path, allowed_globals=stand_ins)


def module_tensors(module: PickledObject, prefix: str = "") -> dict[str, Tensor]:
    """The state dict of a pickled module tree (stand-ins): parameters, persistent buffers, then children."""
    state = module.__dict__
    tensors: dict[str, Tensor] = {}
    for name, value in state.get("_parameters", {}).items():
        if value is not None:
            tensors[prefix + name] = value.detach()
    skipped = state.get("_non_persistent_buffers_set", set())
    for name, value in state.get("_buffers", {}).items():
        if value is not None and name not in skipped:
            tensors[prefix + name] = value
    for name, child in state.get("_modules", {}).items():
        if child is not None:
            tensors.update(module_tensors(child, f"{prefix}{name}."))
    return tensors


@dataclass
class WeightsFile:
    """Tensors read from a weights file: ``by_position`` (reference order, to map by position) or named as
    our YOLOv8's state dict; where they come from, and the scale when the file says it."""

    tensors: dict[str, Tensor]
    by_position: bool
    origin: str
    scale: str | None = None


def read_weights(path: str | Path) -> WeightsFile:
    """Read a reference ``.pt`` (its ``ema`` entry, else ``model``), a ``.ckpt`` of this project (its
    averaged ``state_dict``) or a plain state dict (reference or our key names)."""
    content = load_checkpoint_safely(path)
    if not isinstance(content, Mapping):
        raise ValueError(
            f"pretrained weights: {path} holds a {type(content).__name__}, not a checkpoint dict"
        )
    for entry in ("ema", "model"):
        pickled = content.get(entry)
        if isinstance(pickled, PickledObject):
            version = content.get("version")
            origin = f"ultralytics {version}" if version else "ultralytics"
            return WeightsFile(module_tensors(pickled), by_position=True, origin=f"{origin}, '{entry}' entry")
    if is_training_checkpoint(content):
        trained = read_trained(content, path)
        return WeightsFile(trained.weights, False, origin="sta_lightning checkpoint", scale=trained.scale)
    tensors = {key: value for key, value in content.items() if isinstance(value, Tensor)}
    if not tensors or len(tensors) != len(content):
        raise ValueError(
            f"pretrained weights: {path} is neither a reference checkpoint (no 'model' or 'ema' module), "
            "a checkpoint of this project (no 'state_dict') nor a state dict of tensors"
        )
    if all(_REFERENCE_KEY.match(key) for key in tensors):
        return WeightsFile(tensors, by_position=True, origin="reference state dict")
    return WeightsFile(
        {key.removeprefix(MODEL_PREFIX): value for key, value in tensors.items()},
        by_position=False,
        origin="state dict",
    )


@dataclass
class PretrainedReport:
    """What ``load_pretrained`` did: tensors loaded / in the detector, class-branch tensors left at their
    fresh initialisation, STA tensors taken from the file or new (identity-initialised blocks)."""

    path: str
    origin: str
    scale: str
    file_classes: int
    model_classes: int
    loaded: int
    detector_tensors: int
    reinitialised: list[str] = field(default_factory=list)
    sta_loaded: int = 0
    sta_new: int = 0

    def summary(self) -> str:
        """One line, e.g. ``pretrained: 355/355 YOLOv8n tensors from x.pt (ultralytics 8.2.103, 80 classes);
        class branch re-initialised for 5 classes; 72 new STA tensors``."""
        parts = [
            f"pretrained: {self.loaded}/{self.detector_tensors} YOLOv8{self.scale} tensors from "
            f"{Path(self.path).name} ({self.origin}, {self.file_classes} classes)"
        ]
        if self.reinitialised:
            parts.append(
                f"class branch re-initialised for {self.model_classes} classes "
                f"({len(self.reinitialised)} tensors)"
            )
        if self.sta_loaded:
            parts.append(f"{self.sta_loaded} STA tensors loaded")
        if self.sta_new:
            parts.append(f"{self.sta_new} new STA tensors (blocks start as the identity)")
        return "; ".join(parts)


def _scale_of(first_conv_weight: Tensor) -> str | None:
    """The scale whose first conv has this many output channels (16 n, 32 s, 48 m, 64 l, 80 x)."""
    for name, scale in SCALES.items():
        if scale.channels(64) == first_conv_weight.shape[0]:
            return name
    return None


def load_pretrained(model: YOLOv8, path: str | Path) -> PretrainedReport:
    """Load pretrained weights into ``model`` (in place) and return the report.

    The file's scale must be the model's (ValueError naming both). Detector tensors are all taken, shapes
    checked; class-branch tensors of another shape (another class count) keep the model's initialisation.
    STA tensors are taken by name from a checkpoint of this project with the same placements; blocks that get
    none from the file start as the identity.
    """
    weights = read_weights(path)
    own = model.state_dict()
    detector_keys = [key for key in own if not is_sta_parameter(key)]
    if weights.by_position:
        values = list(weights.tensors.values())
        file_scale = _scale_of(values[0]) if values else None
        if file_scale not in (None, model.scale):
            raise _scale_error(path, file_scale, model.scale)
        if file_scale is None or len(values) != len(detector_keys):
            raise ValueError(
                f"pretrained weights {path}: {len(values)} tensors, but a YOLOv8{model.scale} detector has "
                f"{len(detector_keys)}: not a plain YOLOv8 detection model of this scale"
            )
        incoming = dict(zip(detector_keys, values, strict=True))
    else:
        incoming = weights.tensors
        first = incoming.get("layers.0.conv.weight")
        file_scale = weights.scale or (_scale_of(first) if first is not None else None)
    if file_scale != model.scale:
        raise _scale_error(path, file_scale, model.scale)

    state = dict(own)
    last_class_conv = incoming.get(f"{CLASS_BRANCH_PREFIX}0.2.weight")
    report = PretrainedReport(
        path=str(path),
        origin=weights.origin,
        scale=model.scale,
        file_classes=0 if last_class_conv is None else last_class_conv.shape[0],
        model_classes=model.num_classes,
        loaded=0,
        detector_tensors=len(detector_keys),
    )
    for key in detector_keys:
        tensor = incoming.get(key)
        if tensor is not None and shape_without_unit_dims(tensor.shape) == shape_without_unit_dims(
            own[key].shape
        ):
            state[key] = tensor.reshape(own[key].shape).to(own[key].dtype)
            report.loaded += 1
        elif tensor is not None and key.startswith(CLASS_BRANCH_PREFIX):
            report.reinitialised.append(key)
        else:
            found = "is missing" if tensor is None else f"has shape {tuple(tensor.shape)}"
            expected = tuple(own[key].shape)
            raise ValueError(
                f"pretrained weights {path}: detector tensor {key!r} {found}, expected {expected}"
            )
    new_blocks = []
    for name, blocks in model.sta.items():
        keys = [key for key in own if key.startswith(f"{STA_PREFIX}{name}.")]
        if all(key in incoming and incoming[key].shape == own[key].shape for key in keys):
            state.update({key: incoming[key].to(own[key].dtype) for key in keys})
            report.sta_loaded += len(keys)
        else:
            new_blocks.extend(blocks)
            report.sta_new += len(keys)
    model.load_state_dict(state)
    for block in new_blocks:
        block.zero_residuals()
    return report


def _scale_error(path: str | Path, file_scale: str | None, scale: str) -> ValueError:
    return ValueError(
        f"pretrained weights {path}: a YOLOv8{file_scale or ' (unknown scale)'} file, but the model is "
        f"YOLOv8{scale} (detector.scale: {scale}); set detector.scale to the file's scale"
    )
