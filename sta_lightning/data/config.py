"""The config groups of the datamodules: splits, loader settings and training augmentation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Literal

DEFAULT_IMAGE_SIZE = 640  # input size S without a config or a checkpoint that says otherwise


@dataclass(frozen=True)
class Split:
    """One annotated split: a folder of ``images`` and the COCO instances json (``annotations``) that
    lists them (file names relative to the folder)."""

    images: str
    annotations: str


@dataclass(frozen=True)
class PredictSource:
    """What ``predict`` reads: ``images``, an image file, a folder of images or a list of files; or, with
    ``annotations`` (a COCO json listing the images to predict: ``images`` and ``categories``, its
    ``annotations`` may be empty), the folder of that file's images. With annotations, predictions carry its
    image and category ids and are in its pixel frame; listed images missing from the folder are skipped
    with a DataWarning."""

    images: str | list[str]
    annotations: str | None = None


@dataclass(frozen=True)
class LoaderConfig:
    """The loader group (``data.loader``).

    batch_size: images per batch and per device.
    num_workers: DataLoader processes; None picks min(8, CPU count).
    pin_memory: pin batches in page-locked memory (for GPU training).
    persistent_workers: keep the DataLoader workers from one epoch (and validation) to the next instead of
        starting them anew (with num_workers > 0).
    cache: "ram": decode the training images once, resized to the input size, into shared memory that all
        workers read (its size is logged; the samples stay the same; under DDP each process holds a copy);
        null: decode them for every sample.
    reduced_decoding: decode training JPEGs at least twice the size they need at 1/2, 1/4 or 1/8
        (``COCODetectionDataset``): faster for photos many times the input size, but training pixels then
        differ slightly from what evaluation and deployment decode.
    rect: validate and test in rect batches, as the reference validates: images sorted by aspect ratio, each
        batch (of batch_size x processes) letterboxed to its own (h, w), multiples of 32 with the long side
        S + 32 (the reference's pad of half a stride); false: every image letterboxed to S x S.
    """

    batch_size: int = 16
    num_workers: int | None = None
    pin_memory: bool = False
    persistent_workers: bool = True
    cache: Literal["ram"] | None = None
    reduced_decoding: bool = False
    rect: bool = False


@dataclass(frozen=True)
class AugmentConfig:
    """The training augmentation group (``data.augment``), with the reference's names and defaults.

    mosaic: probability of a 4-image mosaic per training sample; close_mosaic: no mosaic (nor mixup) in the
        last this many epochs.
    mixup: probability of blending a sample with a second one (mosaic and affine of its own), ratio from
        Beta(32, 32), the boxes of both kept.
    copy_paste: on the mosaic canvas (or the single image), before the warp, objects are mirrored left-right
        and pasted by their segmentation polygons where the mirror image covers less than 30 % of every
        object's box; this fraction of those candidates (rounded) is pasted. Objects without polygons (boxes
        only, RLE masks) are not pasted. Off with mosaic in the last ``close_mosaic`` epochs.
    polygon_boxes: an object with polygons gets its box after the warp from them, as the reference does on
        polygon labels: the enclosing box of the warped polygon's points (1000 per polygon) inside the output,
        kept down to 1 % of its scaled area (10 % for boxes). Off: every box is warped by its corners.
    degrees, translate, scale, shear, perspective: the random warp: rotation (+-degrees), translation
        (+-fraction of S), zoom (factor U[1 - scale, 1 + scale]), shear (+-degrees in x and in y) and
        perspective (+-this coefficient of the projective row, in 1/pixels: 0.0001 to 0.001 is mild at 640).
    hsv_h, hsv_s, hsv_v: colour gains of hue (fraction of a turn), saturation and value (factor ranges).
    flipud, fliplr: vertical and horizontal flip probabilities.
    multi_scale: a new square input size for each training batch (``COCODataModule.input_size``): a
        multiple of 32 in [0.5, 1.5] x S, drawn from (seed, iteration), so the same on every process and
        after a resume; the module resizes the batch (bilinear) and its boxes on the device.
    mosaic_group: null: a mosaic's three other images are drawn from the whole
        dataset; L: from the L images of its group, L consecutive positions of the epoch's order (its own
        included). With L dividing ``data.loader.batch_size`` a group lies in one batch, so its images are
        decoded once for the group instead of once per mosaic (about 1 decode per sample against 3.5; the
        reference draws the partners from a buffer of the images its worker loaded recently). The samples
        still depend on (seed, epoch, index) only, not on workers or DDP layout; with N processes of batch b,
        L should divide b.
    albumentations: pixel-level albumentations transforms applied after the warp and mixup, before the HSV
        gains, each as ``{class_path: albumentations.Blur, init_args: {p: 0.01}}`` (the reference applies
        Blur, MedianBlur, ToGray and CLAHE at p 0.01 when albumentations is installed; none by default here).
    """

    mosaic: float = 1.0
    close_mosaic: int = 10
    mixup: float = 0.0
    copy_paste: float = 0.0
    polygon_boxes: bool = False
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    perspective: float = 0.0
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    flipud: float = 0.0
    fliplr: float = 0.5
    multi_scale: bool = False
    mosaic_group: int | None = None
    albumentations: tuple[dict[str, Any], ...] = ()


def plain(value: Any) -> Any:
    """A config value as plain data (dataclasses as dicts) for hyperparameters and checkpoints."""
    return asdict(value) if is_dataclass(value) else value
