"""YOLO-format datasets (a ``data.yaml``, ``images/`` and ``labels/*.txt``) read as the reference
(Ultralytics YOLOv8) reads them, and converted to COCO instances dicts for ``COCODataModule``.

data.yaml: ``path`` (absolute, or relative to the YAML's folder; missing: the YAML's folder); ``train``,
``val`` (or ``validation``), ``test``: each a folder of images (searched recursively, hidden files and
folders left out as the reference's glob does), a ``.txt`` file of image paths (absolute; ``./x`` relative
to the .txt's folder, as the reference reads it; other relative paths relative to ``path``) or a list of
those; ``names``: a list, or a dict {index: name} with indices 0..K-1; ``nc``, if given, must equal the
number of names; ``nc`` alone names the classes class_0, class_1, ... as the reference does. The label
file of an image is its path with the last ``/images/`` replaced by ``/labels/`` and the suffix by ``.txt``.

Label lines are ``class cx cy w h`` (normalised) or polygons ``class x1 y1 x2 y2 ...`` (at least 3 points),
whose box is the min / max of the points. As in the reference's ``verify_image_label``:

- a missing or empty label file: an image without objects;
- once a line of a file has more than 6 fields, its lines with an odd field count are polygons (a 3-field
  line is a 1-point polygon, so a zero-size box); otherwise only 5-field lines are valid;
- a line with another field count, a non-number, a class outside 0..K-1, or a box whose normalised
  cx, cy, w, h are not all in [0, 1] (checked in float32, as the reference's rows are, so 1.00000004
  passes): the whole image is dropped (left out of the json);
- duplicate boxes (equal float32 rows class, cx, cy, w, h, polygons by their box): removed, the image
  kept (the first occurrence is kept, in file order; the reference reorders the rows);
- images with a side under 10 pixels are dropped.

Where this differs from the reference (YOLOv8 8.2), deliberately: a 5-field line is a box in every file (the
reference reads it as a 2-point polygon in a file with polygons); a class index equal to the number of
classes, or not an integer, drops the image (the reference checks ``max_cls <= num_cls`` and keeps it);
boxes with zero width or height are left out with a note (the reference keeps them as ground truth that no
prediction can match); an image listed twice in a split is read once; a relative ``path`` is relative to the
YAML's folder (the reference resolves it in its own datasets folder, a user setting). Boxes that pass the
check but overrun the image (cx + w / 2 > 1) are clipped by the COCO reader, as the reference clips them in
training.

Image sizes are those of the EXIF-oriented view, the frame the reference normalises in, so a 90 / 270 degree
EXIF rotation is read as by the reference; a 180 degree rotation or a mirror is read in stored pixels
(``sta_lightning.data.exif``). Images that cannot be opened are dropped. Every skip is reported in one
``DataWarning`` per split, with counts per kind and the first ``file:line`` examples.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from sta_lightning.data.coco_json import read_instances, warn_box_fixes
from sta_lightning.data.errors import EXAMPLES_SHOWN, AnnotationError, warn_data
from sta_lightning.data.exif import stored_and_oriented_sizes
from sta_lightning.data.image_scan import IMAGE_SUFFIXES
from sta_lightning.data.index_cache import cached_json, modification_key

SPLITS = ("train", "val", "test")
MIN_SIDE = 10  # pixels: images with a smaller side are dropped, as the reference drops them


@dataclass
class YOLODataset:
    """A parsed data.yaml: ``root`` (its ``path``), ``splits`` name -> sorted image paths, class ``names``."""

    yaml_file: Path
    root: Path
    splits: dict[str, list[Path]]
    names: list[str]


@dataclass
class Labels:
    """The objects of one label file: ``boxes`` (n, 5) float64 rows class, cx, cy, w, h (normalised) and
    per row the polygon (k, 2) normalised points, or None for a box line; ``dropped`` (kind, ``file:line:
    why``) when the image is dropped, else None; ``notes`` (kind, ``file:line: what``) of lines removed from a
    kept image."""

    boxes: np.ndarray
    polygons: list[np.ndarray | None] = field(default_factory=list)
    dropped: tuple[str, str] | None = None
    notes: list[tuple[str, str]] = field(default_factory=list)


def _names(yaml_file: Path, names: object) -> list[str]:
    if isinstance(names, list) and names:
        return [str(name) for name in names]
    if isinstance(names, dict) and names:
        keys = sorted(names, key=lambda k: int(k) if str(k).lstrip("-").isdigit() else -1)
        if [str(k) for k in keys] != [str(i) for i in range(len(names))]:
            raise AnnotationError(
                f"{yaml_file}: key 'names' as a dict needs the indices 0..{len(names) - 1}, got {list(names)}"
            )
        return [str(names[k]) for k in keys]
    raise AnnotationError(f"{yaml_file}: key 'names' must be a non-empty list or dict, got {names!r:.80}")


def _split_images(yaml_file: Path, root: Path, key: str, value: object) -> list[Path]:
    """The images of a split entry (folder, .txt list, or a list of those), sorted."""
    items = value if isinstance(value, list) else [value]
    files: list[Path] = []
    for item in items:
        path = Path(str(item))
        path = path if path.is_absolute() else root / path
        if path.is_dir():
            files.extend(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and p.is_file()
            )
        elif path.is_file() and path.suffix == ".txt":
            for line in path.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line.startswith("./"):
                    files.append(path.parent / line[2:])
                elif line:
                    files.append(Path(line) if Path(line).is_absolute() else root / line)
        elif path.exists():
            raise AnnotationError(f"{yaml_file}: key '{key}': {path} is neither a folder nor a .txt list")
        else:
            raise AnnotationError(f"{yaml_file}: key '{key}': {path} does not exist")
    return sorted(set(files))


def read_data_yaml(path: str | Path) -> YOLODataset:
    """Parse a data.yaml (rules in the module docstring); errors name the file and the key at fault."""
    yaml_file = Path(path).resolve()
    if not yaml_file.is_file():
        raise FileNotFoundError(f"data.yaml not found: {yaml_file}")
    try:
        data = yaml.safe_load(yaml_file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise AnnotationError(f"{yaml_file}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise AnnotationError(f"{yaml_file}: expected a mapping with 'names' and 'train' / 'val'")
    if "names" not in data and isinstance(data.get("nc"), int) and data["nc"] > 0:
        data["names"] = [f"class_{i}" for i in range(data["nc"])]
    if "names" not in data:
        raise AnnotationError(f"{yaml_file}: missing the key 'names' (or 'nc')")
    if "val" not in data and "validation" in data:
        data["val"] = data.pop("validation")
    names = _names(yaml_file, data["names"])
    if "nc" in data and data["nc"] != len(names):
        raise AnnotationError(f"{yaml_file}: key 'nc' is {data['nc']!r} but 'names' has {len(names)} names")
    root = Path(str(data.get("path") or "."))
    root = (root if root.is_absolute() else yaml_file.parent / root).resolve()
    splits = {
        key: _split_images(yaml_file, root, key, data[key]) for key in SPLITS if data.get(key) is not None
    }
    if not splits:
        raise AnnotationError(f"{yaml_file}: missing the keys 'train' and 'val' (the image splits)")
    return YOLODataset(yaml_file, root, splits, names)


def label_path(image: Path) -> Path:
    """The label file of an image: the last '/images/' of its path replaced by '/labels/', suffix '.txt'."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    head, sep, tail = str(image).rpartition(sa)
    return Path((head + sb + tail) if sep else str(image)).with_suffix(".txt")


def _dropped(kind: str, where: str, why: str) -> Labels:
    """The Labels of an image dropped for a ``kind`` of fault at ``where`` (file:line)."""
    return Labels(np.zeros((0, 5)), dropped=(kind, f"{where}: {why}"))


def read_labels(label_file: Path, num_classes: int) -> Labels:
    """The objects of a label file, or the reason to drop its image (rules in the module docstring)."""
    if not label_file.is_file():
        return Labels(np.zeros((0, 5)))
    rows: list[np.ndarray] = []
    polygons: list[np.ndarray | None] = []
    seen: dict[tuple, int] = {}
    notes: list[tuple[str, str]] = []
    lines = [
        (number, line.split())
        for number, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), 1)
    ]
    lines = [(number, fields) for number, fields in lines if fields]
    polygon_file = any(len(fields) > 6 for _, fields in lines)  # the reference's switch to polygons
    for number, fields in lines:
        where = f"{label_file}:{number}"
        try:
            values = np.array([float(v) for v in fields])
        except ValueError:
            return _dropped("non-number", where, f"not a number in {' '.join(fields)!r:.60}")
        polygon = None
        if len(values) == 5:
            row = values
        elif polygon_file and len(values) >= 3 and len(values) % 2 == 1:
            polygon = values[1:].reshape(-1, 2)
            (x1, y1), (x2, y2) = polygon.min(axis=0), polygon.max(axis=0)
            row = np.array([values[0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        else:
            return _dropped(
                "wrong field count", where, f"{len(values)} fields (5: a box; 7, 9, ...: a polygon)"
            )
        checked = row.astype(np.float32)  # the reference checks its float32 rows
        if not np.isfinite(checked).all() or (checked < 0).any():
            return _dropped("negative value", where, "negative or non-finite values")
        if row[0] != int(row[0]) or row[0] >= num_classes:
            return _dropped("class out of range", where, f"class {fields[0]} outside 0..{num_classes - 1}")
        if (checked[1:] > 1).any():
            return _dropped("coordinates beyond 1", where, f"box {row[1:].tolist()} not normalised to [0, 1]")
        key = tuple(checked.tolist())
        if key in seen:
            notes.append(("duplicate line", f"{where}: duplicate of line {seen[key]} removed"))
            continue
        seen[key] = number
        if row[3] <= 0 or row[4] <= 0:
            notes.append(("zero-size box", f"{where}: zero-size box removed"))
            continue
        rows.append(row)
        polygons.append(polygon)
    return Labels(np.array(rows).reshape(-1, 5), polygons, None, notes)


def _oriented_size(image: Path) -> tuple[int, int] | None:
    """(width, height) of the EXIF-oriented view of an image, or None when it cannot be read."""
    try:
        with Image.open(image) as opened:
            _, (height, width) = stored_and_oriented_sizes(opened)
    except (OSError, ValueError, SyntaxError):
        return None
    return width, height


def to_coco(dataset: YOLODataset, split: str) -> dict:
    """A COCO instances dict of one split: image ids 1..N in sorted path order, file names relative to the
    root (absolute outside it), category ids 0..K-1, boxes [x, y, w, h] and polygons in pixels. Images whose
    labels are bad are left out; all skips are summed up in one ``DataWarning``."""
    images, annotations = [], []
    dropped: list[str] = []
    removed: list[str] = []
    kinds: Counter[str] = Counter()
    for image in dataset.splits[split]:
        size = _oriented_size(image)
        fault = "unreadable image" if size is None else "image under 10 px" if min(size) < MIN_SIDE else None
        if fault:
            dropped.append(f"{image}: {fault}")
            kinds[fault] += 1
            continue
        labels = read_labels(label_path(image), len(dataset.names))
        if labels.dropped:
            kinds[labels.dropped[0]] += 1
            dropped.append(labels.dropped[1])
            continue
        for kind, note in labels.notes:
            kinds[kind] += 1
            removed.append(note)
        width, height = size
        image_id = len(images) + 1
        file_name = os.path.relpath(image, dataset.root) if image.is_relative_to(dataset.root) else str(image)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        scale = np.array([width, height])
        for row, polygon in zip(labels.boxes, labels.polygons, strict=True):
            w, h = row[3] * width, row[4] * height
            annotation = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(row[0]),
                "bbox": [row[1] * width - w / 2, row[2] * height - h / 2, w, h],
                "area": w * h,
                "iscrowd": 0,
            }
            if polygon is not None:
                annotation["segmentation"] = [(polygon * scale).reshape(-1).tolist()]
            annotations.append(annotation)
    if dropped or removed:
        examples = (dropped + removed)[:EXAMPLES_SHOWN]
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
        warn_data(
            f"{dataset.yaml_file} split '{split}': {len(dropped)} of {len(dataset.splits[split])} "
            f"images dropped and {len(removed)} label lines removed ({counts}). "
            f"First: {'; '.join(examples)}"
        )
    categories = [{"id": k, "name": name} for k, name in enumerate(dataset.names)]
    return {"images": images, "annotations": annotations, "categories": categories}


_COCO_JSON_FORMAT = 1  # the version of the converted json (part of its cache key)


def cached_coco_json(dataset: YOLODataset, split: str) -> Path:
    """The COCO instances json of ``split`` (``to_coco``) in the cache folder, keyed by the YAML and the
    split's image and label files (paths and modification times); converted only when none is cached."""

    images = dataset.splits[split]
    key = [_COCO_JSON_FORMAT, split, *modification_key([dataset.yaml_file, *images])]
    key += modification_key([label_path(image) for image in images])
    return cached_json("yolo", f"{dataset.yaml_file.stem}-{split}", key, lambda: to_coco(dataset, split))


@dataclass
class WrittenSplit:
    """What ``write_split`` wrote: the split's key in data.yaml, its image and box counts, the crowd regions
    left out (YOLO labels have none) and ``paths``, image id -> the image's path in the YOLO dataset."""

    split: str
    images: int
    boxes: int
    crowd_left_out: int
    paths: dict[int, Path] = field(default_factory=dict)


def _checked_names(data_yaml: Path, names: list[str]) -> dict:
    """The data.yaml content to extend: the existing file's (whose names must equal ``names``), or new."""
    if not data_yaml.is_file():
        return {}
    existing = yaml.safe_load(data_yaml.read_text(encoding="utf-8")) or {}
    if _names(data_yaml, existing.get("names")) != names:
        raise AnnotationError(
            f"{data_yaml}: its names {existing.get('names')} differ from the converted split's {names}; "
            "write into another folder"
        )
    return existing


def _place_image(source: Path, target: Path, copy: bool) -> None:
    """``target`` as a copy of ``source``, or a symbolic link to it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    if copy:
        shutil.copy2(source, target)
    else:
        target.symlink_to(source.resolve())


def join_polygons(polygons: list[np.ndarray]) -> np.ndarray:
    """An object's polygons ((k_i, 2) xy each) as one outline (k, 2), as a YOLO polygon line holds one:
    consecutive polygons are bridged between their closest points, and the outline runs once around each
    polygon, crossing each bridge there and back (so it encloses what the polygons do, plus zero-width
    bridges). A single polygon is returned as it is."""
    if len(polygons) == 1:
        return polygons[0]
    links = []  # per consecutive pair, (index in the first, index in the second) of their closest points
    for first, second in zip(polygons, polygons[1:], strict=False):
        distances = ((first[:, None, :] - second[None, :, :]) ** 2).sum(axis=-1)
        links.append(np.unravel_index(distances.argmin(), distances.shape))

    def tour(k: int, start: int) -> np.ndarray:
        """Polygon k from point ``start`` around to it again, with polygon k + 1's tour at the bridge."""
        ring = np.roll(polygons[k], -start, axis=0)
        ring = np.concatenate([ring, ring[:1]])
        if k == len(polygons) - 1:
            return ring
        out, into = links[k]
        at = (out - start) % len(polygons[k])
        return np.concatenate([ring[: at + 1], tour(k + 1, into), ring[at:]])

    return tour(0, links[0][0])


def _label_line(
    box: tuple[float, float, float, float, int], polygons: list[np.ndarray] | None, width: int, height: int
) -> str:
    """One object's YOLO label line at full float precision: ``class cx cy w h`` for ``polygons`` None, else
    ``class x1 y1 x2 y2 ...`` (``join_polygons``, the box's 4 corners for an object without polygons),
    normalised by the image's width and height (points clipped to the image)."""
    x1, y1, x2, y2, k = box
    if polygons is None:
        values = np.array(
            [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]
        )
    else:
        points = join_polygons(polygons) if polygons else np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])
        values = (np.clip(np.asarray(points, dtype=np.float64), 0, (width, height)) / (width, height)).ravel()
    return " ".join([str(k), *(repr(float(v)) for v in values)])


def write_split(
    annotation_file: str | Path,
    image_dir: str | Path,
    output: str | Path,
    split: str,
    copy: bool = False,
    polygons: bool = False,
) -> WrittenSplit:
    """Write one COCO split as a YOLO dataset under ``output``: ``images/<split>/<file_name>`` (links to the
    images, or copies), ``labels/<split>/<name>.txt`` (one line per object, ``_label_line``: a box, or with
    ``polygons`` the object's polygons joined into one polygon line, as the reference's segment labels) and
    ``data.yaml`` (the split and ``names``, no ``path``, so that both readers take its folder as the root; a
    data.yaml already there gets the split added when its names agree). Read back, a polygon line's box is
    the enclosing box of its points (clipped to the image), which may differ from the json's ``bbox`` by what
    the polygon and the box disagree.

    The json is read by the COCO reader of training (``read_instances``): class k is the k-th category id in
    ascending order, boxes are clipped to their image (and degenerate ones dropped, with the training's
    warning), crowd regions are left out (counted in the result).
    Images that are missing, unreadable, or EXIF-rotated by 90 / 270 degrees while their annotation is in
    stored pixels (YOLO labels are normalised in the rotated view) are left out with one ``DataWarning``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} (a data.yaml key), got {split!r}")
    annotation_file, image_dir, output = Path(annotation_file), Path(image_dir), Path(output)
    instances = read_instances(annotation_file)
    warn_box_fixes(annotation_file.name, instances.dropped_boxes, instances.clipped_boxes)
    names = list(instances.class_names)
    data_yaml = output / "data.yaml"
    content = _checked_names(data_yaml, names)
    skipped: list[str] = []
    paths: dict[int, Path] = {}
    boxes = 0
    for image_id, (file_name, height, width) in instances.images.items():
        source = image_dir / file_name
        if _oriented_size(source) != (width, height):
            why = "missing or unreadable" if _oriented_size(source) is None else "EXIF-rotated"
            skipped.append(f"{source} ({why})")
            continue
        relative = Path(file_name).name if Path(file_name).is_absolute() else file_name
        target = output / "images" / split / relative
        _place_image(source, target, copy)
        paths[image_id] = target
        shapes = instances.polygons_of[image_id] if polygons else [None] * len(instances.boxes_of[image_id])
        lines = [
            _label_line(box, shape, width, height)
            for box, shape in zip(instances.boxes_of[image_id], shapes, strict=True)
        ]
        label = label_path(target)
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        boxes += len(lines)
    if skipped:
        warn_data(
            f"{annotation_file}: {len(skipped)} of {len(instances.images)} images left out of the YOLO "
            f"split '{split}'. First: {', '.join(skipped[:EXAMPLES_SHOWN])}"
        )
    content[split] = f"images/{split}"
    content["names"] = dict(enumerate(names))
    data_yaml.parent.mkdir(parents=True, exist_ok=True)
    data_yaml.write_text(yaml.safe_dump(content, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return WrittenSplit(split, len(paths), boxes, instances.num_crowd, paths)
