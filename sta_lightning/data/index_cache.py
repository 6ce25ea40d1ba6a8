"""The cache folder: the arrays of a checked and scanned ``COCOIndex`` in a small ``.npz`` file, so that a
large dataset starts fast the second time, and other derived files (``keyed_cache_file``, written with
``write_atomically``; ``cached_json``: the COCO json of a YOLO or Pascal VOC split).

Files live under ``$STA_LIGHTNING_CACHE_DIR`` (default ``~/.cache/sta_lightning``; data folders may be
read-only), keyed by the annotation file's path, mtime and size and the image folder's path and mtime.
Replacing an image in place without touching the folder is not noticed: delete the cache then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "STA_LIGHTNING_CACHE_DIR"
_CACHE_FORMAT = 3


def cache_dir() -> Path:
    """Folder for scan caches: $STA_LIGHTNING_CACHE_DIR, else ~/.cache/sta_lightning."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "sta_lightning")


def keyed_cache_file(kind: str, stem: str, key: list, suffix: str) -> Path:
    """``cache_dir() / kind / <stem>-<digest><suffix>``, the digest naming ``key`` (JSON-able: the inputs'
    paths and modification times) and the cache format."""
    digest = hashlib.sha1(json.dumps([_CACHE_FORMAT, *key]).encode()).hexdigest()[:20]
    return cache_dir() / kind / f"{stem}-{digest}{suffix}"


def cache_file_for(annotation_file: Path, image_dir: Path) -> Path:
    """The scan cache of an annotation file and image folder, named by their paths and modification."""
    annotation_stat, dir_stat = annotation_file.stat(), image_dir.stat()
    key = [str(annotation_file), annotation_stat.st_mtime_ns, annotation_stat.st_size]
    key += [str(image_dir), dir_stat.st_mtime_ns]
    return keyed_cache_file("coco_index", annotation_file.stem, key, ".npz")


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Run ``write`` on a temporary file beside ``path``, then rename it to ``path``: readers (other ranks,
    other runs) see the whole file or none. The temporary file is removed if ``write`` fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as file:
        try:
            write(file)
        except BaseException:
            file.close()
            os.unlink(file.name)
            raise
    os.replace(file.name, path)


def modification_key(paths: list[Path]) -> list:
    """A cache key part per path: [path, modification time in ns] (-1 for a missing file)."""
    return [[str(path), path.stat().st_mtime_ns if path.exists() else -1] for path in paths]


def cached_json(kind: str, stem: str, key: list, build: Callable[[], dict]) -> Path:
    """The file ``cache_dir() / kind / <stem>-<digest>.json`` holding ``build()``, the digest naming ``key``;
    ``build`` runs only when no such file is cached."""
    target = keyed_cache_file(kind, stem, key, ".json")
    if not target.is_file():
        document = json.dumps(build()).encode()
        write_atomically(target, lambda file: file.write(document))
    return target


def write_cache(cache_file: Path, arrays: dict[str, np.ndarray], report: dict) -> None:
    """Store ``arrays`` and a JSON-able ``report``. Best effort: an unwritable cache folder only costs the
    scan next time."""
    try:
        write_atomically(
            cache_file, lambda file: np.savez(file, report=np.asarray(json.dumps(report)), **arrays)
        )
    except OSError as error:
        log.info("could not write the dataset cache %s: %s", cache_file, error)


def read_cache(cache_file: Path, array_names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict] | None:
    """The arrays and report of a cache file, or None when it is missing or unreadable."""
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in array_names}
            report = json.loads(str(stored["report"]))
    except (OSError, ValueError, KeyError) as error:
        log.info("ignoring an unreadable dataset cache %s: %s", cache_file, error)
        return None
    return arrays, report
