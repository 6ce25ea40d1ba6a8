"""Pascal VOC datasets (a ``VOC2007``-style folder: ``Annotations/<id>.xml``, ``ImageSets/Main/<set>.txt``,
``JPEGImages/``) read and converted to COCO instances dicts for ``COCODataModule`` and ``convert``.

An image set file lists image ids, one per line (the first field of a line). Each id's XML gives its
``size`` and its ``object``s: ``name``, ``difficult`` (0 or 1, default 0) and ``bndbox`` (``xmin``,
``ymin``, ``xmax``, ``ymax``). Its image is ``JPEGImages/<filename>`` (the XML's ``filename``), else
``JPEGImages/<id>.jpg``.

VOC coordinates are 1-based pixel indices, both ends included: a box with ``xmin`` 1 and ``xmax`` W covers
the whole image. In COCO pixels that box is x from ``xmin - 1`` to ``xmax`` (Detectron2's reading), so
``bbox`` is ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``.

``difficult`` objects become COCO crowd regions (``iscrowd: 1``): never training targets, and detections
on them are ignored by the COCO evaluation, as the VOC protocol ignores them.

Classes: the names given, else the 20 VOC classes in their usual order when every name found is one of
them, else the names found in the XMLs of all image sets, sorted. Category ids are 0..K-1. Images whose XML
is missing, malformed or has a field that is not a number, or whose image is missing or unreadable, or of
another size than the XML says (in neither the stored nor the EXIF-rotated view), are left out; objects of
a class outside the classes and boxes of zero size are removed; all of it is reported in one
``DataWarning`` per image set with counts and the first examples.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from sta_lightning.data.errors import EXAMPLES_SHOWN, AnnotationError, warn_data
from sta_lightning.data.exif import stored_and_oriented_sizes
from sta_lightning.data.index_cache import cached_json, modification_key

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
STANDARD_SETS = ("train", "val", "trainval", "test")  # the image sets ``convert`` writes when present


@dataclass
class VOCObject:
    """One ``object`` of an XML: class ``name``, ``box`` (x1, y1, x2, y2) in COCO pixels, ``difficult``."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool


@dataclass
class VOCAnnotation:
    """The content of one XML: ``filename``, ``size`` (width, height; None when absent or 0), ``objects``;
    or, when the image must be left out, ``fault`` (kind, ``file: why``)."""

    filename: str | None = None
    size: tuple[int, int] | None = None
    objects: list[VOCObject] = field(default_factory=list)
    fault: tuple[str, str] | None = None


@dataclass
class VOCDataset:
    """A VOC root: ``sets`` image set name -> image ids in file order, and the class ``names``."""

    root: Path
    sets: dict[str, list[str]]
    names: list[str]

    def xml_file(self, image_id: str) -> Path:
        return self.root / "Annotations" / f"{image_id}.xml"

    @property
    def image_dir(self) -> Path:
        return self.root / "JPEGImages"


def _number(element: ET.Element, tag: str, xml_file: Path) -> float:
    text = element.findtext(tag)
    if text is None:
        raise ValueError(f"{xml_file}: no <{tag}>")
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{xml_file}: <{tag}> is {text.strip()!r:.30}, not a number") from None


def read_annotation(xml_file: Path) -> VOCAnnotation:
    """Parse one VOC XML (rules in the module docstring); a fault leaves its image out."""
    if not xml_file.is_file():
        return VOCAnnotation(fault=("missing XML", f"{xml_file}: missing"))
    try:
        root = ET.parse(xml_file).getroot()
    except ET.ParseError as error:
        return VOCAnnotation(fault=("malformed XML", f"{xml_file}: {error}"))
    try:
        size = root.find("size")
        width, height = (
            (int(_number(size, "width", xml_file)), int(_number(size, "height", xml_file)))
            if size is not None
            else (0, 0)
        )
        objects = []
        for element in root.iter("object"):
            name = (element.findtext("name") or "").strip()
            box = element.find("bndbox")
            if not name or box is None:
                raise ValueError(f"{xml_file}: an <object> without <name> or <bndbox>")
            xmin, ymin, xmax, ymax = (_number(box, tag, xml_file) for tag in ("xmin", "ymin", "xmax", "ymax"))
            difficult = (
                int(_number(element, "difficult", xml_file)) if element.find("difficult") is not None else 0
            )
            objects.append(VOCObject(name, (xmin - 1, ymin - 1, xmax, ymax), bool(difficult)))
    except ValueError as error:
        return VOCAnnotation(fault=("bad field", str(error)))
    filename = (root.findtext("filename") or "").strip() or None
    return VOCAnnotation(filename, (width, height) if width > 0 and height > 0 else None, objects)


def _read_set(root: Path, name: str) -> list[str]:
    set_file = root / "ImageSets" / "Main" / f"{name}.txt"
    if not set_file.is_file():
        raise AnnotationError(f"{root}: image set '{name}' not found ({set_file} is missing)")
    return [line.split()[0] for line in set_file.read_text(encoding="utf-8").splitlines() if line.split()]


def read_voc(root: str | Path, sets: list[str] | None = None, names: list[str] | None = None) -> VOCDataset:
    """Read a VOC root's image sets (default: those of ``STANDARD_SETS`` present) and settle its classes
    (module docstring). Errors name the folder or file missing."""
    root = Path(root).resolve()
    for folder in ("Annotations", "ImageSets/Main", "JPEGImages"):
        if not (root / folder).is_dir():
            raise AnnotationError(f"{root}: not a Pascal VOC root, the folder {folder}/ is missing")
    if sets is None:
        sets = [name for name in STANDARD_SETS if (root / "ImageSets" / "Main" / f"{name}.txt").is_file()]
        if not sets:
            raise AnnotationError(
                f"{root}: ImageSets/Main has none of {', '.join(f'{s}.txt' for s in STANDARD_SETS)}"
            )
    image_sets = {name: _read_set(root, name) for name in sets}
    if names is None:
        found = {
            obj.name
            for ids in image_sets.values()
            for image_id in ids
            for obj in read_annotation(root / "Annotations" / f"{image_id}.xml").objects
        }
        names = list(VOC_CLASSES) if found <= set(VOC_CLASSES) else sorted(found)
    return VOCDataset(root, image_sets, list(names))


def _image_file(dataset: VOCDataset, image_id: str, annotation: VOCAnnotation) -> Path:
    named = dataset.image_dir / annotation.filename if annotation.filename else None
    return named if named is not None and named.is_file() else dataset.image_dir / f"{image_id}.jpg"


def _frame_size(image: Path, annotated: tuple[int, int] | None) -> tuple[int, int] | None:
    """(width, height) of the frame the XML's boxes are in: the XML size when it is the stored or the
    EXIF-rotated view of the image, the stored size without one; None when the image is unreadable or of
    another size."""
    try:
        with Image.open(image) as opened:
            (sh, sw), (oh, ow) = stored_and_oriented_sizes(opened)
    except (OSError, ValueError, SyntaxError):
        return None
    if annotated is None:
        return sw, sh
    return annotated if annotated in ((sw, sh), (ow, oh)) else None


def to_coco(dataset: VOCDataset, image_set: str) -> dict:
    """A COCO instances dict of one image set: image ids 1..N in set order, file names relative to
    ``JPEGImages``, category ids 0..K-1, difficult objects as crowd regions; skips in one ``DataWarning``."""
    class_of = {name: k for k, name in enumerate(dataset.names)}
    images, annotations = [], []
    dropped: list[str] = []
    removed: list[str] = []
    kinds: Counter[str] = Counter()
    for image_id in dataset.sets[image_set]:
        annotation = read_annotation(dataset.xml_file(image_id))
        if annotation.fault:
            kinds[annotation.fault[0]] += 1
            dropped.append(annotation.fault[1])
            continue
        image = _image_file(dataset, image_id, annotation)
        size = _frame_size(image, annotation.size)
        if size is None:
            kind = "image size differs from the XML" if image.is_file() else "missing image"
            kinds[kind] += 1
            dropped.append(f"{image}: {kind}")
            continue
        number = len(images) + 1
        images.append({"id": number, "file_name": image.name, "width": size[0], "height": size[1]})
        for obj in annotation.objects:
            where = f"{dataset.xml_file(image_id)}: object {obj.name!r} {obj.box}"
            x1, y1, x2, y2 = obj.box
            if obj.name not in class_of:
                kinds["unknown class"] += 1
                removed.append(f"{where} not among the classes")
                continue
            if x2 <= x1 or y2 <= y1:
                kinds["zero-size box"] += 1
                removed.append(f"{where} has zero size")
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": number,
                    "category_id": class_of[obj.name],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(obj.difficult),
                }
            )
    if dropped or removed:
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
        warn_data(
            f"{dataset.root} image set '{image_set}': {len(dropped)} of {len(dataset.sets[image_set])} "
            f"images left out and {len(removed)} objects removed ({counts}). "
            f"First: {'; '.join((dropped + removed)[:EXAMPLES_SHOWN])}"
        )
    categories = [{"id": k, "name": name} for k, name in enumerate(dataset.names)]
    return {"images": images, "annotations": annotations, "categories": categories}


_COCO_JSON_FORMAT = 1  # the version of the converted json (part of its cache key)


def cached_coco_json(dataset: VOCDataset, image_set: str) -> Path:
    """The COCO json of ``image_set`` (``to_coco``) in the cache folder, keyed by the set file, the classes,
    the XML files and the image folder (paths and modification times); converted only when none is cached."""
    ids = dataset.sets[image_set]
    key = [
        _COCO_JSON_FORMAT,
        dataset.names,
        *modification_key([dataset.root / "ImageSets" / "Main" / f"{image_set}.txt"]),
    ]
    key += modification_key([dataset.xml_file(image_id) for image_id in ids])
    key += modification_key([dataset.image_dir])
    return cached_json("voc", f"{dataset.root.name}-{image_set}", key, lambda: to_coco(dataset, image_set))
