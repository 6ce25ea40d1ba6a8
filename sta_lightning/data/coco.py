"""A COCO instances annotation file read into a compact, validated index of images and training boxes.

``load_coco_index(annotation_file, image_dir)`` checks the file (clear errors naming file and field), maps the
category ids, sorted, to contiguous indices 0..K-1, turns non-crowd boxes into xyxy training targets (crowd
regions are never targets: evaluation reads them from the json itself), and scans the image files once. Bad
images and bad boxes are skipped with one ``DataWarning`` each. The result of a clean parse + scan is cached
in a small file under ``$STA_LIGHTNING_CACHE_DIR`` (default ``~/.cache/sta_lightning``; data folders may be
read-only), keyed by the annotation file's path, mtime and size and the image folder's path and mtime, so a
full COCO set starts fast the second time. Replacing an image in place without touching the folder is not
noticed: delete the cache then.

The json is parsed with ``json`` rather than pycocotools' ``COCO`` because the checks below must name the
file, record and field of any fault, where ``COCO.createIndex`` stops with a bare KeyError; the evaluator
reads the same file with faster-coco-eval's ``COCO`` (the pycocotools API).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from rich.progress import track

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "STA_LIGHTNING_CACHE_DIR"
_CACHE_FORMAT = 2
_EXAMPLES_SHOWN = 5
_CLIP_TOLERANCE_PX = (
    1.0  # COCO boxes overrun their image by float rounding; only larger overruns are reported
)


_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class DataWarning(UserWarning):
    """Bad input that was skipped so that training and evaluation can go on."""


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and the record and field at fault."""


def cache_dir() -> Path:
    """Folder for scan caches: $STA_LIGHTNING_CACHE_DIR, else ~/.cache/sta_lightning."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "sta_lightning")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(path: Path, where: str, record: object, key: str, check, expected: str):
    """record[key] if it passes ``check``, else an AnnotationError naming file, record and field."""
    if not isinstance(record, dict):
        raise AnnotationError(f"{path}: {where} must be a JSON object, got {record!r:.80}")
    if key not in record:
        raise AnnotationError(f"{path}: {where} has no '{key}' field")
    value = record[key]
    if not check(value):
        raise AnnotationError(f"{path}: {where} field '{key}' must be {expected}, got {value!r:.80}")
    return value


def load_annotation_json(path: str | Path, annotations_required: bool = True) -> dict:
    """Read an instances json; errors name the file (missing file, invalid JSON, missing top-level list).

    With ``annotations_required=False`` a file without an ``annotations`` list (an image info file, such as
    COCO's test-dev list, that names the images to predict) reads as one with no objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    if not annotations_required:
        data.setdefault("annotations", [])
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise AnnotationError(f"{path}: missing the top-level '{key}' list")
        if not isinstance(data[key], list):
            raise AnnotationError(f"{path}: top-level '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def parse_categories(path: str | Path, data: dict) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(category ids sorted ascending, their names): contiguous class index k is category_ids[k]."""
    path = Path(path)
    names: dict[int, str] = {}
    for i, category in enumerate(data["categories"]):
        where = f"categories[{i}]"
        category_id = _require(path, where, category, "id", _is_int, "an integer")
        name = _require(path, where, category, "name", lambda v: isinstance(v, str), "a string")
        if category_id in names:
            raise AnnotationError(f"{path}: {where} repeats category id {category_id}")
        names[category_id] = name
    if not names:
        raise AnnotationError(f"{path}: the 'categories' list is empty")
    ids = tuple(sorted(names))
    return ids, tuple(names[i] for i in ids)


def read_categories(path: str | Path) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The category ids (sorted) and names of an annotation file."""
    return parse_categories(path, load_annotation_json(path, annotations_required=False))


@dataclass
class CocoIndex:
    """The usable images of one annotation file and their training targets (crowd regions excluded).

    ``image_ids`` (N,) int64, ``file_names`` (N,) str, ``sizes`` (N, 2) int64 (h, w) original pixels (the
    annotation's frame), ``exif_oriented`` (N,) bool: image i is read with its EXIF orientation applied
    (``annotation_frame_is_exif_oriented``);
    ``boxes`` (M, 4) float32 xyxy original pixels and ``labels`` (M,) int64 class indices, image i owning rows
    ``box_starts[i]:box_starts[i + 1]``. The bad-input report (what was skipped) travels with it.
    """

    annotation_file: Path
    image_dir: Path
    category_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    image_ids: np.ndarray
    file_names: np.ndarray
    sizes: np.ndarray
    exif_oriented: np.ndarray
    box_starts: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    num_listed_images: int
    num_crowd: int
    bad_images: list[tuple[str, str]] = field(default_factory=list)
    dropped_boxes: list[str] = field(default_factory=list)
    clipped_boxes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_ids)

    def targets(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, 4) float32 xyxy boxes and (n,) int64 labels of image i, original pixels."""
        start, stop = self.box_starts[i], self.box_starts[i + 1]
        return self.boxes[start:stop], self.labels[start:stop]

    def image_path(self, i: int) -> Path:
        return self.image_dir / str(self.file_names[i])

    def warn_skipped(self) -> None:
        """One DataWarning for excluded images and one for dropped or clipped boxes, when there are any."""
        name = self.annotation_file.name
        if self.bad_images:
            examples = ", ".join(f"{file} ({reason})" for file, reason in self.bad_images[:_EXAMPLES_SHOWN])
            rank_zero_warn(
                f"{name}: {len(self.bad_images)} of {self.num_listed_images} images in {self.image_dir} "
                f"are missing, unreadable or corrupt and are left out of training and evaluation; "
                f"evaluation covers the remaining {len(self)} images. First: {examples}",
                category=DataWarning,
            )
        if self.dropped_boxes or self.clipped_boxes:
            examples = "; ".join((self.dropped_boxes + self.clipped_boxes)[:_EXAMPLES_SHOWN])
            rank_zero_warn(
                f"{name}: {len(self.dropped_boxes)} boxes with non-positive or non-finite sides or "
                f"wholly outside their image were dropped and {len(self.clipped_boxes)} boxes reaching "
                f"outside their image were clipped to it. First: {examples}",
                category=DataWarning,
            )


def load_coco_index(annotation_file: str | Path, image_dir: str | Path, scan_workers: int = 8) -> CocoIndex:
    """Validated index of ``annotation_file`` with images under ``image_dir`` (from the cache if fresh).

    Raises FileNotFoundError / AnnotationError for a missing or malformed file, NotADirectoryError for a
    missing image folder; emits the skip warnings (every call, cached or not).
    """
    annotation_file, image_dir = Path(annotation_file).resolve(), Path(image_dir).resolve()
    if not annotation_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {annotation_file}")
    if not image_dir.is_dir():
        raise NotADirectoryError(f"image folder of {annotation_file.name} not found: {image_dir}")
    cache_file = _cache_file(annotation_file, image_dir)
    index = _read_cache(cache_file, annotation_file, image_dir)
    if index is None:
        index = _build_index(annotation_file, image_dir, scan_workers)
        _write_cache(cache_file, index)
    index.warn_skipped()
    return index


def _build_index(annotation_file: Path, image_dir: Path, scan_workers: int) -> CocoIndex:
    data = load_annotation_json(annotation_file, annotations_required=False)  # image info files too
    category_ids, class_names = parse_categories(annotation_file, data)
    class_of = {category_id: k for k, category_id in enumerate(category_ids)}

    images: dict[int, tuple[str, int, int]] = {}  # id -> (file_name, height, width)
    for i, image in enumerate(data["images"]):
        where = f"images[{i}]"
        image_id = _require(annotation_file, where, image, "id", _is_int, "an integer")
        file_name = _require(
            annotation_file, where, image, "file_name", lambda v: isinstance(v, str) and v, "a file name"
        )
        width = _require(
            annotation_file, where, image, "width", lambda v: _is_int(v) and v > 0, "a positive integer"
        )
        height = _require(
            annotation_file, where, image, "height", lambda v: _is_int(v) and v > 0, "a positive integer"
        )
        if image_id in images:
            raise AnnotationError(f"{annotation_file}: {where} repeats image id {image_id}")
        images[image_id] = (file_name, height, width)

    boxes_of: dict[int, list[tuple[float, float, float, float, int]]] = {image_id: [] for image_id in images}
    num_crowd = 0
    dropped: list[str] = []
    clipped: list[str] = []
    for i, annotation in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        annotation_id = _require(annotation_file, where, annotation, "id", _is_int, "an integer")
        where = f"annotation {annotation_id}"
        image_id = _require(annotation_file, where, annotation, "image_id", _is_int, "an integer")
        category_id = _require(annotation_file, where, annotation, "category_id", _is_int, "an integer")
        bbox = _require(
            annotation_file,
            where,
            annotation,
            "bbox",
            lambda v: isinstance(v, list) and len(v) == 4 and all(_is_number(x) for x in v),
            "a list of 4 numbers [x, y, width, height]",
        )
        iscrowd = annotation.get("iscrowd", 0)
        if iscrowd not in (0, 1) or isinstance(iscrowd, bool):
            raise AnnotationError(
                f"{annotation_file}: {where} field 'iscrowd' must be 0 or 1, got {iscrowd!r:.80}"
            )
        if image_id not in images:
            raise AnnotationError(
                f"{annotation_file}: {where} refers to image_id {image_id}, which the 'images' list lacks"
            )
        if category_id not in class_of:
            raise AnnotationError(
                f"{annotation_file}: {where} has category_id {category_id}, which the 'categories' list "
                f"lacks (known ids: {', '.join(map(str, category_ids))})"
            )
        if iscrowd:
            num_crowd += 1
            continue
        _, height, width = images[image_id]
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            dropped.append(f"annotation {annotation_id} bbox {bbox} has non-positive or non-finite sides")
            continue
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
        if x2 <= x1 or y2 <= y1:
            dropped.append(f"annotation {annotation_id} bbox {bbox} lies outside its {width}x{height} image")
            continue
        overrun = max(x1 - x, y1 - y, x + w - x2, y + h - y2)
        if overrun > _CLIP_TOLERANCE_PX:
            clipped.append(f"annotation {annotation_id} bbox {bbox} clipped to its {width}x{height} image")
        boxes_of[image_id].append((x1, y1, x2, y2, class_of[category_id]))

    bad_images = _scan_images(
        image_dir, images, scan_workers, f"Checking the images of {annotation_file.name}"
    )
    bad_ids = {image_id for image_id, _, _ in bad_images}
    kept = [image_id for image_id in images if image_id not in bad_ids]
    exif_oriented = [
        annotation_frame_is_exif_oriented(image_dir / images[image_id][0], images[image_id][1:])
        for image_id in kept
    ]
    rows = [row for image_id in kept for row in boxes_of[image_id]]
    table = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    counts = np.asarray([len(boxes_of[image_id]) for image_id in kept], dtype=np.int64)
    return CocoIndex(
        annotation_file=annotation_file,
        image_dir=image_dir,
        category_ids=category_ids,
        class_names=class_names,
        image_ids=np.asarray(kept, dtype=np.int64),
        file_names=np.asarray([images[image_id][0] for image_id in kept], dtype=str),
        sizes=np.asarray([images[image_id][1:] for image_id in kept], dtype=np.int64).reshape(-1, 2),
        exif_oriented=np.asarray(exif_oriented, dtype=bool),
        box_starts=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        boxes=table[:, :4].astype(np.float32),
        labels=table[:, 4].astype(np.int64),
        num_listed_images=len(images),
        num_crowd=num_crowd,
        bad_images=[(file_name, reason) for _, file_name, reason in bad_images],
        dropped_boxes=dropped,
        clipped_boxes=clipped,
    )


def _stored_and_oriented_sizes(image: Image.Image) -> tuple[tuple[int, int], tuple[int, int]]:
    """(h, w) of the stored pixels and (h, w) once the EXIF orientation is applied."""
    width, height = image.size
    orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    return (height, width), ((width, height) if orientation in _TRANSPOSING_ORIENTATIONS else (height, width))


def annotation_frame_is_exif_oriented(path: Path, expected_hw: tuple[int, int]) -> bool:
    """Whether an annotation's (h, w) for the image at ``path`` is that of its EXIF-oriented view.

    The rule for EXIF-rotated images: an annotation whose width and height are the stored pixel size
    (COCO's convention) refers to the stored pixels; one whose size only matches the view with the EXIF
    orientation applied (rotated by 90 or 270 degrees) refers to that view. Where both match (no EXIF
    rotation, a 180-degree rotation, a mirror, a square image) the stored pixels win.
    """
    with Image.open(path) as image:
        stored, oriented = _stored_and_oriented_sizes(image)
    return tuple(expected_hw) != stored and tuple(expected_hw) == oriented


def check_image_file(path: Path, expected_hw: tuple[int, int] | None = None) -> str | None:
    """Why an image file is unusable ('missing', 'unreadable: ...', 'corrupt: ...', 'size ...') or None.

    Reads the header (PIL), runs PIL's structural verify, and for JPEGs checks the end-of-image marker; a JPEG
    without it is decoded in full, which fails for a truncated file. ``expected_hw`` must be the stored size
    or the EXIF-oriented one (``annotation_frame_is_exif_oriented``).
    """
    if not path.is_file():
        return "missing"
    try:
        with open(path, "rb") as f:
            with Image.open(f) as image:
                sizes = _stored_and_oriented_sizes(image)
                is_jpeg = image.format == "JPEG"
                image.verify()
            if is_jpeg:
                f.seek(-2, os.SEEK_END)
                if f.read() != b"\xff\xd9":
                    f.seek(0)
                    with Image.open(f) as image:
                        image.load()
    except PermissionError as error:
        return f"unreadable: {error.strerror}"
    except (
        Exception
    ) as error:  # PIL raises many types for damaged files (OSError, SyntaxError, ValueError, ...)
        return f"corrupt: {error}"
    if expected_hw is not None and tuple(expected_hw) not in sizes:
        (height, width), (oriented_height, oriented_width) = sizes
        return (
            f"size {width}x{height} (EXIF-oriented {oriented_width}x{oriented_height}) differs from the "
            f"annotation's {expected_hw[1]}x{expected_hw[0]}"
        )
    return None


def _scan_images(
    image_dir: Path, images: dict[int, tuple[str, int, int]], workers: int, description: str
) -> list[tuple[int, str, str]]:
    """(image id, file name, reason) of every unusable image, in file order (threads: the work is I/O).

    A progress bar shows for large sets (the first scan of COCO train2017 reads 118k file headers)."""
    ids = list(images)

    def check(image_id: int) -> str | None:
        file_name, height, width = images[image_id]
        return check_image_file(image_dir / file_name, (height, width))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        checked = pool.map(check, ids, chunksize=64)
        shown = len(ids) >= _PROGRESS_MIN_IMAGES
        reasons = list(track(checked, description, total=len(ids), disable=not shown, transient=True))
    return [(i, images[i][0], reason) for i, reason in zip(ids, reasons, strict=True) if reason is not None]


_PROGRESS_MIN_IMAGES = 5000


def _cache_file(annotation_file: Path, image_dir: Path) -> Path:
    annotation_stat, dir_stat = annotation_file.stat(), image_dir.stat()
    key = json.dumps(
        [
            _CACHE_FORMAT,
            str(annotation_file),
            annotation_stat.st_mtime_ns,
            annotation_stat.st_size,
            str(image_dir),
            dir_stat.st_mtime_ns,
        ]
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:20]
    return cache_dir() / "coco_index" / f"{annotation_file.stem}-{digest}.npz"


_ARRAY_FIELDS = ("image_ids", "file_names", "sizes", "exif_oriented", "box_starts", "boxes", "labels")
_REPORT_FIELDS = (
    "category_ids",
    "class_names",
    "num_listed_images",
    "num_crowd",
    "bad_images",
    "dropped_boxes",
    "clipped_boxes",
)


def _write_cache(cache_file: Path, index: CocoIndex) -> None:
    """Best effort: an unwritable cache folder only costs the scan next time."""
    report = json.dumps({name: getattr(index, name) for name in _REPORT_FIELDS})
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_file.parent, suffix=".tmp", delete=False) as f:
            np.savez(f, report=np.asarray(report), **{name: getattr(index, name) for name in _ARRAY_FIELDS})
        os.replace(f.name, cache_file)
    except OSError as error:
        log.info("could not write the dataset cache %s: %s", cache_file, error)


def _read_cache(cache_file: Path, annotation_file: Path, image_dir: Path) -> CocoIndex | None:
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in _ARRAY_FIELDS}
            report = json.loads(str(stored["report"]))
    except (OSError, ValueError, KeyError) as error:
        log.info("ignoring an unreadable dataset cache %s: %s", cache_file, error)
        return None
    return CocoIndex(
        annotation_file=annotation_file,
        image_dir=image_dir,
        category_ids=tuple(report["category_ids"]),
        class_names=tuple(report["class_names"]),
        num_listed_images=report["num_listed_images"],
        num_crowd=report["num_crowd"],
        bad_images=[tuple(item) for item in report["bad_images"]],
        dropped_boxes=report["dropped_boxes"],
        clipped_boxes=report["clipped_boxes"],
        **arrays,
    )
