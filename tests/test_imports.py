"""The layers below Lightning import without it: checked in a fresh interpreter."""

import subprocess
import sys

import pytest

LIGHTNING = ("lightning", "pytorch_lightning")
HEAVY = (*LIGHTNING, "albumentations", "wandb", "faster_coco_eval")


# Each package that must load without Lightning -> the heavy packages its import must not load.
FORBIDDEN = {
    "sta_lightning": HEAVY,
    "sta_lightning.nn": HEAVY,
    "sta_lightning.models": HEAVY,
    "sta_lightning.export": HEAVY,
    "sta_lightning.deploy": HEAVY,
    # faster_coco_eval is the metrics' COCO backend.
    "sta_lightning.metrics": (*LIGHTNING, "albumentations", "wandb"),
    # The package: its datamodules (which need Lightning) load on first access.
    "sta_lightning.data": HEAVY,
    "sta_lightning.data.coco_index": HEAVY,
    # The dataset formats and the converter read files only.
    "sta_lightning.data.yolo_format": HEAVY,
    "sta_lightning.data.voc_format": HEAVY,
    "sta_lightning.convert": HEAVY,
    # An ablation's plan and statistics: files and numbers (its runs are CLI subprocesses).
    "sta_lightning.ablation": HEAVY,
    # The training augmentation is built on albumentations.
    "sta_lightning.data.dataset": (*LIGHTNING, "wandb", "faster_coco_eval"),
}


@pytest.mark.parametrize("module", list(FORBIDDEN))
def test_layers_import_without_lightning(module):
    forbidden = FORBIDDEN[module]
    script = f"import sys, {module}\nprint([m for m in {forbidden!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", f"import {module} loaded {result.stdout.strip()}"
