"""A COCO instances annotation file read into a compact, validated index of images and training boxes.

``load_coco_index(annotation_file, image_dir)`` checks the file (``coco_json``), maps the category ids,
sorted, to contiguous indices 0..K-1, scans the image files once (``image_scan``), applies the EXIF frame
rule (``exif``) and caches the result (``index_cache``). Bad images and bad boxes are skipped with one
``DataWarning`` each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sta_lightning.data.coco_json import read_instances, warn_box_fixes
from sta_lightning.data.errors import EXAMPLES_SHOWN, warn_data
from sta_lightning.data.exif import annotation_frame_is_exif_oriented
from sta_lightning.data.image_scan import scan_images
from sta_lightning.data.index_cache import cache_file_for, read_cache, write_cache

# What the scan cache stores of a COCOIndex: its arrays, and the rest as a JSON report.
ARRAY_FIELDS = (
    "image_ids",
    "file_names",
    "sizes",
    "exif_oriented",
    "box_starts",
    "boxes",
    "labels",
    "polygon_starts",
    "point_starts",
    "points",
)
REPORT_FIELDS = (
    "category_ids",
    "class_names",
    "num_listed_images",
    "num_crowd",
    "bad_images",
    "dropped_boxes",
    "clipped_boxes",
    "polygon_issues",
)


@dataclass
class COCOIndex:
    """The usable images of one annotation file and their training targets (crowd regions excluded).

    ``image_ids`` (N,) int64, ``file_names`` (N,) str, ``sizes`` (N, 2) int64 (h, w) original pixels (the
    annotation's frame), ``exif_oriented`` (N,) bool: image i is read with its EXIF orientation applied
    (``annotation_frame_is_exif_oriented``);
    ``boxes`` (M, 4) float32 xyxy original pixels and ``labels`` (M,) int64 class indices, image i owning rows
    ``box_starts[i]:box_starts[i + 1]``; the objects' polygons: box row r owns polygons
    ``polygon_starts[r]:polygon_starts[r + 1]`` (none for an object without), polygon p the ``points`` (Q, 2)
    float32 xy original pixels ``point_starts[p]:point_starts[p + 1]``. The bad-input report (what was
    skipped) travels with it.
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
    polygon_starts: np.ndarray
    point_starts: np.ndarray
    points: np.ndarray
    num_listed_images: int
    num_crowd: int
    bad_images: list[tuple[str, str]] = field(default_factory=list)
    dropped_boxes: list[str] = field(default_factory=list)
    clipped_boxes: list[str] = field(default_factory=list)
    polygon_issues: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_ids)

    def targets(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, 4) float32 xyxy boxes and (n,) int64 labels of image i, original pixels."""
        start, stop = self.box_starts[i], self.box_starts[i + 1]
        return self.boxes[start:stop], self.labels[start:stop]

    def polygons(self, i: int) -> list[list[np.ndarray]]:
        """Per object of image i (the rows of ``targets``), its polygons, (k, 2) float32 xy pixels."""
        rows = range(self.box_starts[i], self.box_starts[i + 1])
        return [
            [
                self.points[self.point_starts[p] : self.point_starts[p + 1]]
                for p in range(self.polygon_starts[r], self.polygon_starts[r + 1])
            ]
            for r in rows
        ]

    def warn_missing_polygons(self) -> None:
        """One DataWarning, when there are any, for the objects that have no polygon to paste by. (The file's
        RLE masks and malformed polygons are counted over all its objects, images left out included.)"""
        missing = int(np.count_nonzero(np.diff(self.polygon_starts) == 0))
        if missing:
            examples = "; ".join(self.polygon_issues[:EXAMPLES_SHOWN])
            warn_data(
                f"{self.annotation_file.name}: copy-paste pastes objects by their segmentation polygons; "
                f"{missing} of {len(self.labels)} objects have none and are not pasted (the file has "
                f"{len(self.polygon_issues)} RLE masks or malformed polygons among its objects)"
                + (f". First: {examples}" if examples else "")
            )

    def image_path(self, i: int) -> Path:
        return self.image_dir / str(self.file_names[i])

    def warn_skipped(self) -> None:
        """One DataWarning for excluded images and one for dropped or clipped boxes, when there are any."""
        name = self.annotation_file.name
        if self.bad_images:
            examples = ", ".join(f"{file} ({reason})" for file, reason in self.bad_images[:EXAMPLES_SHOWN])
            warn_data(
                f"{name}: {len(self.bad_images)} of {self.num_listed_images} images in {self.image_dir} "
                f"are missing, unreadable or corrupt and are left out of training and evaluation; "
                f"evaluation covers the remaining {len(self)} images. First: {examples}"
            )
        warn_box_fixes(name, self.dropped_boxes, self.clipped_boxes)


def load_coco_index(annotation_file: str | Path, image_dir: str | Path, scan_workers: int = 8) -> COCOIndex:
    """Validated index of ``annotation_file`` with images under ``image_dir`` (from the cache if fresh).

    Raises FileNotFoundError / AnnotationError for a missing or malformed file, NotADirectoryError for a
    missing image folder; emits the skip warnings (every call, cached or not).
    """
    annotation_file, image_dir = Path(annotation_file).resolve(), Path(image_dir).resolve()
    if not annotation_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {annotation_file}")
    if not image_dir.is_dir():
        raise NotADirectoryError(f"image folder of {annotation_file.name} not found: {image_dir}")
    cache_file = cache_file_for(annotation_file, image_dir)
    cached = read_cache(cache_file, ARRAY_FIELDS)
    if cached is None:
        index = _build_index(annotation_file, image_dir, scan_workers)
        report = {name: getattr(index, name) for name in REPORT_FIELDS}
        write_cache(cache_file, {name: getattr(index, name) for name in ARRAY_FIELDS}, report)
    else:
        arrays, report = cached
        index = COCOIndex(
            annotation_file=annotation_file,
            image_dir=image_dir,
            category_ids=tuple(report["category_ids"]),
            class_names=tuple(report["class_names"]),
            num_listed_images=report["num_listed_images"],
            num_crowd=report["num_crowd"],
            bad_images=[tuple(item) for item in report["bad_images"]],
            dropped_boxes=report["dropped_boxes"],
            clipped_boxes=report["clipped_boxes"],
            polygon_issues=report["polygon_issues"],
            **arrays,
        )
    index.warn_skipped()
    return index


def _build_index(annotation_file: Path, image_dir: Path, scan_workers: int) -> COCOIndex:
    instances = read_instances(annotation_file)
    images, boxes_of = instances.images, instances.boxes_of
    bad_images = scan_images(
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
    polygons = [polygon for image_id in kept for row in instances.polygons_of[image_id] for polygon in row]
    polygon_counts = [len(row) for image_id in kept for row in instances.polygons_of[image_id]]
    return COCOIndex(
        annotation_file=annotation_file,
        image_dir=image_dir,
        category_ids=instances.category_ids,
        class_names=instances.class_names,
        image_ids=np.asarray(kept, dtype=np.int64),
        file_names=np.asarray([images[image_id][0] for image_id in kept], dtype=str),
        sizes=np.asarray([images[image_id][1:] for image_id in kept], dtype=np.int64).reshape(-1, 2),
        exif_oriented=np.asarray(exif_oriented, dtype=bool),
        box_starts=_starts(counts),
        boxes=table[:, :4].astype(np.float32),
        labels=table[:, 4].astype(np.int64),
        polygon_starts=_starts(polygon_counts),
        point_starts=_starts([len(polygon) for polygon in polygons]),
        points=np.concatenate(polygons or [np.zeros((0, 2))]).astype(np.float32).reshape(-1, 2),
        num_listed_images=len(images),
        num_crowd=instances.num_crowd,
        bad_images=[(file_name, reason) for _, file_name, reason in bad_images],
        dropped_boxes=instances.dropped_boxes,
        clipped_boxes=instances.clipped_boxes,
        polygon_issues=instances.polygon_issues,
    )


def _starts(counts) -> np.ndarray:
    """(n + 1,) int64 offsets of n consecutive runs of the given lengths."""
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
