"""benchmarks/gpu.py on a machine without a GPU: it refuses to run, checks its arguments, and its dry run
(CPU, tiny sizes) goes through every measurement and prints the table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *arguments],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_refuses_to_run_without_a_gpu():
    result = run_script()
    assert result.returncode == 1
    assert "needs a CUDA GPU" in result.stderr and "--dry-run" in result.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(["--size", "100"], "--size must be a multiple of 32"), (["--repeats", "0"], "--repeats must be >= 1")],
)
def test_bad_arguments_are_refused_naming_them(arguments, message):
    result = run_script(*arguments)
    assert result.returncode == 2 and message in result.stderr


def test_dry_run_measures_every_variant_and_prints_the_table():
    result = run_script("--dry-run", "--no-compile")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("GPU: none (dry run on CPU)")
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in lines if line.startswith("| ")}
    assert "fit step yolov8n plain" in rows and "fit step yolov8n default STA" in rows
    for dtype in ("float32", "bfloat16"):
        assert "x vs official" in rows[f"STA 16x16 b2 {dtype} ours"]
        assert f"STA 16x16 b2 {dtype} official" in rows
    images_per_second = float(rows["fit step yolov8n default STA"].split(" | ")[2].removesuffix(" img/s"))
    assert images_per_second > 0
