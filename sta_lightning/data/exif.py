"""The EXIF frame rule: which view of an EXIF-rotated image an annotation's width and height refer to."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def stored_and_oriented_sizes(image: Image.Image) -> tuple[tuple[int, int], tuple[int, int]]:
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
        stored, oriented = stored_and_oriented_sizes(image)
    return tuple(expected_hw) != stored and tuple(expected_hw) == oriented
