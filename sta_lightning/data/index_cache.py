"""The scan cache: the arrays of a checked and scanned ``COCOIndex`` in a small ``.npz`` file, so that a
large dataset starts fast the second time.

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
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "STA_LIGHTNING_CACHE_DIR"
_CACHE_FORMAT = 2


def cache_dir() -> Path:
    """Folder for scan caches: $STA_LIGHTNING_CACHE_DIR, else ~/.cache/sta_lightning."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "sta_lightning")


def cache_file_for(annotation_file: Path, image_dir: Path) -> Path:
    """The cache file of an annotation file and image folder, named by their paths and modification."""
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


def write_cache(cache_file: Path, arrays: dict[str, np.ndarray], report: dict) -> None:
    """Store ``arrays`` and a JSON-able ``report``. Best effort: an unwritable cache folder only costs the
    scan next time."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_file.parent, suffix=".tmp", delete=False) as f:
            np.savez(f, report=np.asarray(json.dumps(report)), **arrays)
        os.replace(f.name, cache_file)
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
