"""Checkpoint files on disk: read with a clear error when damaged, written so that a kill never damages one.

Every reader of a checkpoint (``fit|validate|test|predict --ckpt_path``, ``export``, ``model.pretrained``)
goes through ``read_checkpoint``. torch's own errors for a damaged file name neither the file nor the cause
(an empty file gives a bare EOFError, a truncated one "Invalid argument"), and torch does not check the zip
records' CRC32, so bytes changed inside a tensor load silently as wrong weights; ``read_checkpoint``
checks the whole archive first and raises ``CheckpointError`` naming the file.

``write_checkpoint`` writes next to the target and renames (atomic on POSIX within a folder): a kill at any
moment leaves either the previous file or the new one. Lightning's own writer (an fsspec transaction) puts
its temporary file in the system temp folder ($TMPDIR); where that is another file system than the
checkpoints (a local /tmp and a shared cluster disk) the final move is a copy onto the target, and a kill
during that copy was measured to leave a truncated ``last.ckpt`` (and the whole temporary file behind).
Only torch: the Lightning-free layers read checkpoints through this module.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong with it."""


def _damaged(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is damaged or not a torch checkpoint ({reason}). A run killed while writing, or "
        "a full disk, leaves such files: resume or load from an earlier checkpoint (for example the last "
        "epoch's file in the same folder)"
    )


def read_checkpoint(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    weights_only: bool | None = True,
    allowed_globals: Callable[[list[str]], Sequence[Any]] | None = None,
) -> Any:
    """``torch.load`` of a checkpoint file, after checking that the file is whole.

    Args:
        path: the checkpoint file (torch's zip format).
        map_location, weights_only: passed to ``torch.load``.
        allowed_globals: for ``weights_only`` files that pickle classes: called with the names of the
            globals the file needs beyond torch's defaults; returns what ``torch.serialization.safe_globals``
            takes (or raises to refuse the file).

    Raises FileNotFoundError for a missing path and CheckpointError, naming the file, for an empty,
    truncated or corrupt file (CRC32 of every record checked) or one that torch cannot unpickle (a file
    that is no checkpoint at all).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise _damaged(path, "the file is empty")
    _check_archive(path)
    safe_globals = []
    if allowed_globals is not None:
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as error:  # the pickle inside a whole archive is malformed
            raise _damaged(path, f"{type(error).__name__}: {error}") from None
        safe_globals = list(allowed_globals(needed))
    try:
        with torch.serialization.safe_globals(safe_globals):
            return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as error:  # torch raises many types (UnpicklingError, RuntimeError, KeyError, ...)
        raise _damaged(path, f"{type(error).__name__}: {error}") from None


def _check_archive(path: Path) -> None:
    """Raise CheckpointError if ``path`` is a zip archive (torch.save's format) that is cut short or has a
    record failing its CRC32. Files in torch's legacy format (before 1.6) are left to ``torch.load``."""
    with open(path, "rb") as file:
        is_zip = file.read(4) == _ZIP_MAGIC
    if not is_zip:
        return
    if not zipfile.is_zipfile(path):
        raise _damaged(path, "its zip directory is missing: the file was cut short")
    try:
        with zipfile.ZipFile(path) as archive:
            bad_record = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise _damaged(path, f"unreadable zip archive: {error}") from None
    if bad_record is not None:
        raise _damaged(path, f"record {bad_record} fails its CRC check")


def write_checkpoint(checkpoint: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically: into ``.<name>.partial`` in the same folder, flushed to disk,
    then renamed over ``path``. A kill mid-write leaves that partial file, which the next write replaces."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as file:
            file.write(buffer.getbuffer())
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
