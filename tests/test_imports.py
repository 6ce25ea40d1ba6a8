"""The layers below Lightning import without it: checked in a fresh interpreter."""

import subprocess
import sys

import pytest

HEAVY = ("lightning", "pytorch_lightning", "albumentations", "wandb", "faster_coco_eval")


@pytest.mark.parametrize("module", ["sta_lightning", "sta_lightning.nn", "sta_lightning.models"])
def test_layers_import_without_lightning_albumentations_wandb_or_faster_coco_eval(module):
    script = f"import sys, {module}\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", f"import {module} loaded {result.stdout.strip()}"


def test_the_top_level_package_still_gives_the_lightning_module():
    from sta_lightning import DetectionModule

    assert DetectionModule.__name__ == "DetectionModule"
