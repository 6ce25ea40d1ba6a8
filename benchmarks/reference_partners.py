"""The reference YOLOv8 (Ultralytics 8.2.103) drawing a mosaic's 3 partners uniformly over the dataset, as
this project does, instead of from its buffer of recently loaded images: its own
``Mosaic.get_indexes(buffer=False)``. Imported only by the reference-side scripts (reference_*.py), which run
in the reference's venv."""

import functools

from ultralytics.data.augment import Mosaic

PARTNERS = ("buffer", "dataset")  # where the reference draws a mosaic's partners: its default, or as ours


def draw_partners_from(partners: str) -> None:
    """Make the reference's mosaics draw their partners from ``partners`` (one of ``PARTNERS``)."""
    if partners not in PARTNERS:
        raise ValueError(f"mosaic partners must be one of {PARTNERS}, got {partners!r}")
    if partners == "dataset":
        Mosaic.get_indexes = functools.partialmethod(Mosaic.get_indexes, buffer=False)
