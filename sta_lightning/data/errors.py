"""The two kinds of bad input: an ``AnnotationError`` stops the run, a ``DataWarning`` reports a skip.

Data parsing warns through Python's ``warnings``; the Lightning layer (the datamodules) shows a process's
data warnings on global rank 0 only.
"""

from __future__ import annotations

import warnings

EXAMPLES_SHOWN = 5  # examples of skipped items named in a warning


class DataWarning(UserWarning):
    """Bad input that was skipped so that training and evaluation can go on."""


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and the record and field at fault."""


def warn_data(message: str) -> None:
    """Emit a ``DataWarning``."""
    warnings.warn(message, DataWarning, stacklevel=2)
