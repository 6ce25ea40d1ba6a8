"""Shared test settings: offline W&B, no albumentations update check, and the optional real COCO data."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STA_LIGHTNING_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The small real COCO data beside the checkout (../shared/data); tests that need it skip without it."""
    if not (SHARED_DATA / "coco128").is_dir():
        pytest.skip(f"real COCO data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def run_in_temporary_folder(tmp_path, monkeypatch):
    """Each test runs in its own empty folder: whatever a test writes to relative paths (Lightning's default
    root dir, a saved config.yaml, lightning_logs/) stays out of the checkout."""
    monkeypatch.chdir(tmp_path)
