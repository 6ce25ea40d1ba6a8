"""``python -m sta_lightning convert SOURCE OUTPUT``: a detection dataset from one format to another, with
the readers the datamodules use (``data.yolo_format``, ``data.voc_format``, ``data.coco_json``).

- SOURCE a YOLO ``data.yaml``: ``OUTPUT/annotations/instances_<split>.json`` per split, file names relative
  to the data.yaml's ``path``, boxes in pixels of the image as stored, category ids 0..K-1.
- SOURCE a Pascal VOC root: ``OUTPUT/annotations/instances_<set>.json`` per image set, file names relative
  to its ``JPEGImages``; difficult objects become crowd regions.
- SOURCE a COCO instances json (with ``--images``): a YOLO dataset in OUTPUT (``data.yaml``, ``images/``
  links or copies, ``labels/`` with box lines, or with ``--polygons`` polygon lines); converting the train and
  val jsons into one OUTPUT gives one data.yaml.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sta_lightning.data import voc_format, yolo_format
from sta_lightning.data.errors import AnnotationError
from sta_lightning.data.index_cache import write_atomically


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sta_lightning convert",
        description="Convert a detection dataset: a YOLO data.yaml or a Pascal VOC root to COCO instances "
        "json files (OUTPUT/annotations/instances_<split>.json), or a COCO instances json to a YOLO dataset "
        "(OUTPUT/data.yaml, images/, labels/). Bad labels are reported as in training, in one warning each.",
    )
    parser.add_argument(
        "source",
        help="a data.yaml, a VOC root (Annotations/, ImageSets/Main/, JPEGImages/) or a COCO instances json",
    )
    parser.add_argument("output", help="the folder to write into")
    coco = parser.add_argument_group("from a COCO json")
    coco.add_argument("--images", help="the folder of the json's images (file names are relative to it)")
    coco.add_argument(
        "--split",
        choices=yolo_format.SPLITS,
        help="the data.yaml key of the split (default: train, val or test, whichever the json's name holds)",
    )
    coco.add_argument("--copy", action="store_true", help="copy the images (default: symbolic links)")
    coco.add_argument(
        "--polygons",
        action="store_true",
        help="write polygon lines (class x1 y1 x2 y2 ..., the reference's segment labels): an object's "
        "polygons joined into one, its box's corners where it has none (default: box lines)",
    )
    voc = parser.add_argument_group("from a Pascal VOC root")
    voc.add_argument(
        "--sets",
        nargs="+",
        help="image sets to convert (default: train, val, trainval, test where ImageSets/Main has them)",
    )
    voc.add_argument(
        "--names",
        nargs="+",
        help="class names in index order (default: the 20 VOC classes "
        "when every object is one of them, else the names found, sorted)",
    )
    return parser


def _write_json(path: Path, document: dict) -> None:
    data = json.dumps(document).encode()
    write_atomically(path, lambda file: file.write(data))
    crowd = sum(a["iscrowd"] for a in document["annotations"])
    print(
        f"wrote {path}: {len(document['images'])} images, {len(document['annotations']) - crowd} boxes"
        + (f", {crowd} crowd regions" if crowd else "")
    )


def _split_of(annotation_file: Path) -> str:
    """The data.yaml key a COCO json's file name implies (instances_val2017.json: val)."""
    found = [split for split in yolo_format.SPLITS if split in annotation_file.stem.lower()]
    if len(found) != 1:
        raise SystemExit(
            f"convert: give --split, the name {annotation_file.name} does not say train, val or test"
        )
    return found[0]


def _coco_datamodule_hint(image_root: Path, files: dict[str, Path]) -> None:
    """Print the image root of the written files and how a COCODataModule split names them."""
    print(f"image root (the folder of every file_name): {image_root}")
    for name, path in files.items():
        print(f"  {name}: --data.<split>.images {image_root} --data.<split>.annotations {path}")


def main(args: list[str] | None = None) -> None:
    """Run the converter on ``args`` (default: the command line); bad input exits with its message."""
    options = build_parser().parse_args(args)
    try:
        convert(options)
    except (AnnotationError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"convert: {error}") from error


def convert(options: argparse.Namespace) -> None:
    """Convert ``options.source`` into ``options.output`` (the rules in the module docstring)."""
    source, output = Path(options.source), Path(options.output)
    if source.suffix.lower() in (".yaml", ".yml"):
        dataset = yolo_format.read_data_yaml(source)
        files = {split: output / "annotations" / f"instances_{split}.json" for split in dataset.splits}
        for split, path in files.items():
            _write_json(path, yolo_format.to_coco(dataset, split))
        _coco_datamodule_hint(dataset.root, files)
    elif source.is_dir():
        dataset = voc_format.read_voc(source, options.sets, options.names)
        files = {name: output / "annotations" / f"instances_{name}.json" for name in dataset.sets}
        for name, path in files.items():
            _write_json(path, voc_format.to_coco(dataset, name))
        _coco_datamodule_hint(dataset.image_dir, files)
    elif source.suffix.lower() == ".json":
        if not options.images:
            raise SystemExit("convert: a COCO json needs --images, the folder its file names are relative to")
        split = options.split or _split_of(source)
        written = yolo_format.write_split(
            source, options.images, output, split, options.copy, options.polygons
        )
        lines = "polygon lines" if options.polygons else "boxes"
        print(
            f"wrote {output / 'labels' / split}: {written.images} images, {written.boxes} {lines}"
            + (f" ({written.crowd_left_out} crowd regions left out)" if written.crowd_left_out else "")
        )
        print(
            f"train on it with: python -m sta_lightning fit --data sta_lightning.data.YOLODataModule "
            f"--data.data_yaml {output / 'data.yaml'}"
        )
    else:
        raise SystemExit(f"convert: {source} is neither a data.yaml, a VOC root folder nor a COCO json")
