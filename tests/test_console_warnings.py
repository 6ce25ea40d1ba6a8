"""No upstream deprecation warning floods the console: the FutureWarning that Lightning's pytree helper
triggers under torch >= 2.14 is filtered once ``sta_lightning.training`` is imported, and only that one."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import warnings
from lightning.pytorch.utilities._pytree import _tree_flatten

_tree_flatten(1)  # warns (the command line shows every FutureWarning)
import sta_lightning.training

_tree_flatten(1)
_tree_flatten([1, 2])
warnings.warn("another future change", FutureWarning)
"""


def test_lightning_pytree_deprecation_is_filtered_narrowly():
    result = subprocess.run(
        [sys.executable, "-W", "always::FutureWarning", "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shown = result.stderr.count("isinstance(treespec, LeafSpec)")
    if shown == 0:
        pytest.skip("this torch does not deprecate LeafSpec")
    assert shown == 1, result.stderr  # before the import only
    assert "another future change" in result.stderr
