"""Image integrity: which image files are missing, unreadable, corrupt or of another size than annotated,
checked by a pool of threads (the work is I/O), with a progress bar for large sets."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from rich.progress import track

from sta_lightning.data.exif import stored_and_oriented_sizes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # image files by name
PROGRESS_MIN_IMAGES = 5000  # a scan of this many images or more shows a progress bar


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
                sizes = stored_and_oriented_sizes(image)
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
    except Exception as error:  # PIL raises many types for damaged files (OSError, SyntaxError, ...)
        return f"corrupt: {error}"
    if expected_hw is not None and tuple(expected_hw) not in sizes:
        (height, width), (oriented_height, oriented_width) = sizes
        return (
            f"size {width}x{height} (EXIF-oriented {oriented_width}x{oriented_height}) differs from the "
            f"annotation's {expected_hw[1]}x{expected_hw[0]}"
        )
    return None


def scan_images(
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
        shown = len(ids) >= PROGRESS_MIN_IMAGES
        reasons = list(track(checked, description, total=len(ids), disable=not shown, transient=True))
    return [(i, images[i][0], reason) for i, reason in zip(ids, reasons, strict=True) if reason is not None]
