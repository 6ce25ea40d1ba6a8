"""The YOLOv8 detector (scales n, s, m, l, x) with optional Super Token Attention blocks placed by config.

Layer indices are the reference ones (yolov8.yaml): backbone 0-9, neck 10-21, the head is the reference's
layer 22. STA blocks refine the output of a chosen layer in place: the refined map feeds both the next layer
and any later skip concatenation, so indices and the plain detector's parameter order are unchanged. The STA
blocks live in their own container registered after the detector, so a reference checkpoint converts by
position (``load_reference_state_dict``) and the STA parameters are the remainder.
"""

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sta_lightning.models.head import DetectHead
from sta_lightning.nn import STABlock, StokenAssociation
from sta_lightning.nn.yolo_blocks import SPPF, C2f, Concat, Conv


@dataclass(frozen=True)
class YOLOScale:
    """Compound scaling of yolov8.yaml: repeats x depth (at least 1), channels x width (capped)."""

    depth: float
    width: float
    max_channels: int

    def channels(self, base: int) -> int:
        """Base channels -> this scale's channels, rounded up to a multiple of 8."""
        return math.ceil(min(base, self.max_channels) * self.width / 8) * 8

    def repeats(self, base: int) -> int:
        return max(round(base * self.depth), 1)


SCALES: dict[str, YOLOScale] = {
    "n": YOLOScale(depth=0.33, width=0.25, max_channels=1024),
    "s": YOLOScale(depth=0.33, width=0.50, max_channels=1024),
    "m": YOLOScale(depth=0.67, width=0.75, max_channels=768),
    "l": YOLOScale(depth=1.00, width=1.00, max_channels=512),
    "x": YOLOScale(depth=1.00, width=1.25, max_channels=512),
}

NUM_LAYERS = 22
# Concat layers: index -> the earlier layer whose output is concatenated after the previous layer's output.
SKIP_SOURCES = {11: 6, 14: 4, 17: 12, 20: 9}
# Layers whose outputs feed the detection head (P3, P4, P5).
OUTPUT_LAYERS = (15, 18, 21)
SAVED_LAYERS = frozenset(SKIP_SOURCES.values()) | frozenset(OUTPUT_LAYERS)
STRIDES = (8, 16, 32)
MAX_STRIDE = 32
STA_PREFIX = "sta."  # the YOLOv8 keeps its STA blocks in ``self.sta``: their parameter names start so
REG_MAX = 16
HEAD_DIM = 32


@dataclass(frozen=True)
class STAPlacement:
    """Where and how to insert Super Token Attention blocks.

    layer: reference layer index (0-21) whose output the blocks refine (e.g. 4 = P3 backbone C2f,
        6 = P4, 8 = P5, 15/18/21 = the neck's P3/P4/P5 outputs).
    stoken_size: super-token cell (h, w) in pixels of that map; (1, 1) means plain global attention.
    n_iter: association iterations.
    num_heads: attention heads; None picks channels // 32 (or the largest divisor of the channels below it),
        so one placement works for every scale.
    mlp_ratio: hidden width of the block's ConvFFN relative to the channels.
    layer_scale: initial value of the per-channel residual scales, None for no layer scale.
    drop_path: stochastic-depth rate of every block of this placement.
    depth: how many STABlocks in a row.
    """

    layer: int
    stoken_size: tuple[int, int] = (8, 8)
    n_iter: int = 1
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    layer_scale: float | None = None
    drop_path: float = 0.0
    depth: int = 1

    def __post_init__(self) -> None:
        stoken_size = self.stoken_size
        if isinstance(stoken_size, int):
            stoken_size = (stoken_size, stoken_size)
        stoken_size = tuple(stoken_size)
        object.__setattr__(self, "stoken_size", stoken_size)
        checks = (
            (0 <= self.layer < NUM_LAYERS, f"layer must be a reference layer index 0-{NUM_LAYERS - 1}"),
            (
                len(stoken_size) == 2 and all(int(s) == s >= 1 for s in stoken_size),
                "stoken_size must be 2 ints >= 1",
            ),
            (self.n_iter >= 1, "n_iter must be >= 1"),
            (self.num_heads is None or self.num_heads >= 1, "num_heads must be >= 1 or None"),
            (self.mlp_ratio > 0, "mlp_ratio must be > 0"),
            (self.layer_scale is None or self.layer_scale > 0, "layer_scale must be > 0 or None"),
            (0.0 <= self.drop_path < 1.0, "drop_path must be in [0, 1)"),
            (self.depth >= 1, "depth must be >= 1"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"STAPlacement: {message}, got {self}")

    def heads_for(self, channels: int) -> int:
        """The number of heads for a map of ``channels`` channels (validated to divide them)."""
        if self.num_heads is None:
            return max(h for h in range(1, max(1, channels // HEAD_DIM) + 1) if channels % h == 0)
        if channels % self.num_heads:
            raise ValueError(
                f"STAPlacement(layer={self.layer}): num_heads={self.num_heads} does not divide the "
                f"{channels} channels of that layer's output"
            )
        return self.num_heads


# Super tokens on the backbone's P4 (layer 6, 4x4 cells: 10x10 super tokens at 640 px) and global attention on
# its P5 (layer 8, 400 tokens at 640 px), STViT's blocks with a 2x wide FFN (STViT: 4x). No block on P3
# (layer 4): on that largest map a block costs about as much as these two together (yolov8n on CPU: train
# step 1.23x the plain one with it, 1.10x without; inference at 640 px 1.25x / 1.13x, benchmarks/model.py),
# and RT-DETR found attention on the lowest levels adds cost rather than accuracy (its encoder attends on
# the highest level only). STAPlacement(layer=4, stoken_size=(8, 8), mlp_ratio=2.0) puts it back.
DEFAULT_STA: tuple[STAPlacement, ...] = (
    STAPlacement(layer=6, stoken_size=(4, 4), mlp_ratio=2.0),
    STAPlacement(layer=8, stoken_size=(1, 1), mlp_ratio=2.0),
)


def _build_layers(scale: YOLOScale) -> tuple[nn.ModuleList, list[int]]:
    """The 22 backbone and neck layers of yolov8.yaml and each layer's output channels."""
    p1, p2, p3, p4, p5 = (scale.channels(c) for c in (64, 128, 256, 512, 1024))
    n3, n6 = scale.repeats(3), scale.repeats(6)
    layers = [
        Conv(3, p1, 3, 2),  # 0  P1/2
        Conv(p1, p2, 3, 2),  # 1  P2/4
        C2f(p2, p2, n3, shortcut=True),  # 2
        Conv(p2, p3, 3, 2),  # 3  P3/8
        C2f(p3, p3, n6, shortcut=True),  # 4
        Conv(p3, p4, 3, 2),  # 5  P4/16
        C2f(p4, p4, n6, shortcut=True),  # 6
        Conv(p4, p5, 3, 2),  # 7  P5/32
        C2f(p5, p5, n3, shortcut=True),  # 8
        SPPF(p5, p5),  # 9
        nn.Upsample(scale_factor=2.0, mode="nearest"),  # 10
        Concat(),  # 11 (10, 6)
        C2f(p5 + p4, p4, n3, shortcut=False),  # 12
        nn.Upsample(scale_factor=2.0, mode="nearest"),  # 13
        Concat(),  # 14 (13, 4)
        C2f(p4 + p3, p3, n3, shortcut=False),  # 15 P3 out
        Conv(p3, p3, 3, 2),  # 16
        Concat(),  # 17 (16, 12)
        C2f(p3 + p4, p4, n3, shortcut=False),  # 18 P4 out
        Conv(p4, p4, 3, 2),  # 19
        Concat(),  # 20 (19, 9)
        C2f(p4 + p5, p5, n3, shortcut=False),  # 21 P5 out
    ]
    channels = [p1, p2, p2, p3, p3, p4, p4, p5, p5, p5, p5, p5 + p4, p4, p4, p4 + p3, p3, p3, p3 + p4, p4, p4]
    channels += [p4 + p5, p5]
    return nn.ModuleList(layers), channels


def _sta_key(layer: int) -> str:
    return f"layer{layer}"


class YOLOv8(nn.Module):
    """YOLOv8 detector, optionally with STA blocks after chosen layers.

    Input: float images (B, 3, H, W) in [0, 1], H and W multiples of 32.
    Train mode: list of 3 maps (B, 4 * 16 + nc, H / s, W / s) for strides 8, 16, 32 (DFL logits, then class
    logits).
    Eval mode: ``(decoded, maps)`` with decoded (B, 4 + nc, N): cx, cy, w, h in input pixels, then class
    probabilities; anchors P3, P4, P5, row-major.
    """

    def __init__(self, scale: str = "n", num_classes: int = 80, sta: Sequence[STAPlacement] | None = None):
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"YOLOv8: unknown scale {scale!r}, expected one of {sorted(SCALES)}")
        if num_classes < 1:
            raise ValueError(f"YOLOv8: num_classes must be >= 1, got {num_classes}")
        self.scale = scale
        self.num_classes = num_classes
        self.strides = STRIDES
        self.reg_max = REG_MAX
        self.layers, self.layer_channels = _build_layers(SCALES[scale])
        self.head = DetectHead(
            num_classes, tuple(self.layer_channels[i] for i in OUTPUT_LAYERS), STRIDES, REG_MAX
        )
        self.sta_placements = tuple(sorted(sta or (), key=lambda placement: placement.layer))
        self.sta = nn.ModuleDict()
        for placement in self.sta_placements:
            if _sta_key(placement.layer) in self.sta:
                raise ValueError(f"YOLOv8: two STA placements after layer {placement.layer}")
            channels = self.layer_channels[placement.layer]
            self.sta[_sta_key(placement.layer)] = nn.ModuleList(
                STABlock(
                    channels,
                    stoken_size=placement.stoken_size,
                    n_iter=placement.n_iter,
                    num_heads=placement.heads_for(channels),
                    mlp_ratio=placement.mlp_ratio,
                    drop_path=placement.drop_path,
                    layer_scale=placement.layer_scale,
                )
                for _ in range(placement.depth)
            )
        self._associations: dict[str, StokenAssociation] | None = None

    def layer(self, index: int) -> nn.Module:
        """Reference layer ``index``: 0-21 the backbone and neck, 22 the detection head."""
        if not 0 <= index <= NUM_LAYERS:
            raise ValueError(f"YOLOv8: layer index must be 0-{NUM_LAYERS} (22 = the head), got {index}")
        return self.head if index == NUM_LAYERS else self.layers[index]

    def freeze(self, layers: int | Sequence[int] | None) -> tuple[int, ...]:
        """Stop gradients of reference layers: ``layers`` leading ones (an int) or these indices (a list).

        Returns the frozen indices. Their BatchNorm layers should also be kept in eval mode by the caller
        (``DetectionModule.train`` does). STA blocks are left trainable.
        """
        if layers is None:
            return ()
        indices = tuple(range(layers)) if isinstance(layers, int) else tuple(sorted(set(layers)))
        if isinstance(layers, int) and not 0 <= layers <= NUM_LAYERS + 1:
            raise ValueError(f"YOLOv8: freeze count must be 0-{NUM_LAYERS + 1}, got {layers}")
        for index in indices:
            self.layer(index).requires_grad_(False)
        return indices

    @contextmanager
    def capture_associations(self) -> Iterator[dict[str, StokenAssociation]]:
        """Within the context, each forward fills the yielded dict (cleared at the start of every forward)
        with block name (e.g. "sta.layer4.0") -> StokenAssociation of every super-token STA block;
        global-attention blocks have no association and are left out. Outside the context nothing extra is
        computed."""
        previous, self._associations = self._associations, {}
        try:
            yield self._associations
        finally:
            self._associations = previous

    def forward(self, images: Tensor) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        maps = self.head(self.features(images))
        if self.training:
            return maps
        return self.head.decode(maps), maps

    def features(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) float images -> the neck outputs P3, P4, P5 (B, C_i, H / s, W / s)."""
        self._check_input(images)
        if self._associations is not None:
            self._associations.clear()
        saved: dict[int, Tensor] = {}
        x = images
        for index, layer in enumerate(self.layers):
            x = layer([x, saved[SKIP_SOURCES[index]]]) if index in SKIP_SOURCES else layer(x)
            key = _sta_key(index)
            if key in self.sta:
                x = self._refine(key, self.sta[key], x)
            if index in SAVED_LAYERS:
                saved[index] = x
        return [saved[i] for i in OUTPUT_LAYERS]

    def _refine(self, key: str, blocks: nn.ModuleList, x: Tensor) -> Tensor:
        for position, block in enumerate(blocks):
            if self._associations is None:
                x = block(x)
                continue
            x, association = block(x, return_association=True)
            if association is not None:
                self._associations[f"{STA_PREFIX}{key}.{position}"] = association
        return x

    @staticmethod
    def _check_input(images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"YOLOv8: expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(
                f"YOLOv8: expected float images in [0, 1] (divide uint8 by 255), got {images.dtype}"
            )
        check_image_size(*images.shape[-2:], owner="YOLOv8")


def check_image_size(*sides: int, owner: str = "image_size") -> None:
    """Raise a ValueError naming ``owner`` unless every side (pixels) is a positive multiple of the largest
    stride, 32: the detector's feature maps must tile the input exactly."""
    if any(side < MAX_STRIDE or side % MAX_STRIDE for side in sides):
        size = "x".join(str(side) for side in sides)
        raise ValueError(f"{owner}: the input size must be a positive multiple of {MAX_STRIDE}, got {size}")


def is_sta_parameter(name: str) -> bool:
    """Whether a state-dict or parameter name of a ``YOLOv8`` belongs to one of its STA blocks."""
    return name.startswith(STA_PREFIX)


def load_reference_state_dict(model: YOLOv8, state_dict: Mapping[str, Tensor]) -> None:
    """Load a reference YOLOv8 state dict (e.g. ``DetectionModel.state_dict()`` of the same scale and
    class count) into ``model`` by position.

    The i-th reference tensor goes to the i-th detector tensor (parameters and buffers in registration order;
    STA blocks are excluded and keep their values). Shapes must agree up to size-1 dimensions (the reference
    DFL conv weight (1, 16, 1, 1) becomes ``head.dfl.bins`` (16,)), otherwise a ValueError names the pair.
    Raises ValueError when the tensor counts differ (wrong scale, or a checkpoint of a model with STA).
    """
    own = model.state_dict()
    detector_keys = [key for key in own if not is_sta_parameter(key)]
    reference = list(state_dict.items())
    if len(reference) != len(detector_keys):
        raise ValueError(
            f"load_reference_state_dict: the reference state dict has {len(reference)} tensors, the YOLOv8-"
            f"{model.scale} detector has {len(detector_keys)}; is it the same scale and a plain YOLOv8?"
        )
    converted = dict(own)
    for position, ((reference_key, tensor), key) in enumerate(zip(reference, detector_keys, strict=True)):
        target_shape = own[key].shape
        if shape_without_unit_dims(tensor.shape) != shape_without_unit_dims(target_shape):
            raise ValueError(
                f"load_reference_state_dict: tensor #{position} {reference_key!r} of shape "
                f"{tuple(tensor.shape)} does not fit {key!r} of shape {tuple(target_shape)}; "
                "check scale and num_classes"
            )
        converted[key] = tensor.reshape(target_shape)
    model.load_state_dict(converted)


def shape_without_unit_dims(shape: torch.Size) -> tuple[int, ...]:
    return tuple(size for size in shape if size != 1)
