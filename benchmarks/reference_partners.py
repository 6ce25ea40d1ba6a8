"""Where the reference YOLOv8 (Ultralytics 8.2.103) draws a mosaic's 3 partners: from its buffer of recently
loaded images (its default) or uniformly over the dataset, as this project does (its own
``Mosaic.get_indexes(buffer=False)``). The benchmarks take the choice with ``add_partners_option``; the
reference-side scripts (reference_*.py, in the reference's venv) apply it with ``draw_partners_from``."""

import argparse
import functools

PARTNERS = ("buffer", "dataset")


def add_partners_option(parser: argparse.ArgumentParser) -> None:
    """``--reference-partners`` (one of ``PARTNERS``, default "buffer") on a benchmark's parser."""
    parser.add_argument(
        "--reference-partners",
        choices=PARTNERS,
        default="buffer",
        help="where the reference draws a mosaic's partners: its buffer of recent images (its default) or "
        "the whole dataset (as this project does)",
    )


def draw_partners_from(partners: str) -> None:
    """Make the reference's mosaics draw their partners from ``partners`` (one of ``PARTNERS``); imports
    ultralytics, so only in the reference's venv."""
    from ultralytics.data.augment import Mosaic

    if partners not in PARTNERS:
        raise ValueError(f"mosaic partners must be one of {PARTNERS}, got {partners!r}")
    if partners == "dataset":
        Mosaic.get_indexes = functools.partialmethod(Mosaic.get_indexes, buffer=False)
