"""DetectorConfig: which YOLOv8 to build (scale, STA blocks), where its weights start, what stays frozen."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from sta_lightning.models.pretrained import load_pretrained
from sta_lightning.models.yolo import DEFAULT_STA, STAPlacement, YOLOv8

Scale = Literal["n", "s", "m", "l", "x"]


@dataclass(frozen=True)
class DetectorConfig:
    """The detector group of a config (``model.detector``).

    scale: YOLOv8 scale, one of n, s, m, l, x.
    sta: STA placements: "default" (``sta_lightning.models.DEFAULT_STA``), null, or a list of
        ``STAPlacement`` fields (layer, stoken_size, n_iter, num_heads, mlp_ratio, layer_scale, drop_path,
        depth).
    freeze: layers whose parameters stay fixed: a count of leading reference layers (10 = the backbone) or a
        list of layer indices (0-21, 22 = the head). They stay out of the optimizer and their BatchNorm layers
        stay in eval mode. STA blocks are never frozen.
    pretrained: weights to start from (``load_pretrained``): a reference YOLOv8 ``.pt`` (8.0-8.4), a ``.ckpt``
        of this project or a state dict. Its scale must be ``scale``; another class count re-initialises the
        class branch; STA blocks that the file lacks start as the identity. A checkpoint written by ``fit``
        stores null here: it holds the weights, so it validates and resumes without the file.
    """

    scale: Scale = "n"
    sta: list[STAPlacement] | Literal["default"] | None = None
    freeze: int | list[int] | None = None
    pretrained: str | None = None

    def placements(self) -> tuple[STAPlacement, ...]:
        """The STA placements: ``DEFAULT_STA`` for "default", none for null."""
        if self.sta is None:
            return ()
        if isinstance(self.sta, str):
            if self.sta != "default":
                raise ValueError(
                    f"detector.sta must be 'default', null or a list of placements, got {self.sta!r}"
                )
            return tuple(DEFAULT_STA)
        return tuple(p if isinstance(p, STAPlacement) else STAPlacement(**p) for p in self.sta)

    def to_checkpoint(self) -> dict[str, Any]:
        """Plain values for a checkpoint's hyperparameters: the placements resolved (so the checkpoint
        rebuilds the same model if ``DEFAULT_STA`` changes, and loads with ``weights_only``) and no
        ``pretrained`` (the checkpoint holds the weights)."""
        resolved = replace(self, sta=list(self.placements()) or None, pretrained=None)
        return asdict(resolved)


@dataclass
class BuiltDetector:
    """A detector from ``build_detector``: the model, its frozen layer indices, and a line saying where its
    weights came from (None for a fresh initialisation)."""

    model: YOLOv8
    frozen_layers: tuple[int, ...]
    pretrained_summary: str | None


def build_detector(config: DetectorConfig, num_classes: int) -> BuiltDetector:
    """The YOLOv8 of ``config`` for ``num_classes`` classes, its pretrained weights loaded, layers frozen."""
    model = YOLOv8(config.scale, num_classes, config.placements())
    summary = None if config.pretrained is None else load_pretrained(model, config.pretrained).summary()
    return BuiltDetector(model, model.freeze(config.freeze), summary)
