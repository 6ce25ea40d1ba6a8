"""The GPU checks on a machine without a GPU.

benchmarks/gpu.py refuses to run, checks its arguments, and its dry run (CPU, tiny sizes) goes through every
row, printing each as it is measured; a row that raises is printed as an error row and the others still run;
--time-limit ends the run with the rows left printed as skipped. benchmarks/gpu_check.sh parses, skips every
step without CUDA and prints its summary, runs the CPU dry variants of its steps, skips a step whose package
is missing and goes on past a step that fails. The command lines of its fits are accepted by the CLI.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
CHECK = ROOT / "benchmarks" / "gpu_check.sh"
GPU_CHECK_DIR = ROOT / "benchmarks" / "gpu_check"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *arguments],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def table(stdout: str) -> dict[str, list[str]]:
    """Row label -> the row's cells after the label."""
    rows = [line.strip("| ").split(" | ") for line in stdout.splitlines() if line.startswith("| ")]
    return {cells[0]: [cell.strip() for cell in cells[1:]] for cells in rows[1:]}  # rows[0]: the header


@no_gpu
def test_refuses_to_run_without_a_gpu():
    result = run_script()
    assert result.returncode == 1
    assert "needs a CUDA GPU" in result.stderr and "--dry-run" in result.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--size", "100"], "--size must be a multiple of 32"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--time-limit", "0"], "--time-limit must be > 0"),
    ],
)
def test_bad_arguments_are_refused_naming_them(arguments, message):
    result = run_script(*arguments)
    assert result.returncode == 2 and message in result.stderr


def test_quick_mode_drops_the_float32_compiles_and_the_compiled_plain_fit_step():
    full = run_script("--list").stdout.splitlines()
    quick = run_script("--list", "--quick").stdout.splitlines()
    assert len(full) == 15 and len(quick) == 12 and set(quick) < set(full)
    assert set(full) - set(quick) == {
        "STA 160x160 b16 float32 official compiled",
        "STA 160x160 b16 float32 ours compiled",
        "fit step yolov8s plain compiled",
    }
    assert [label.endswith("compiled") for label in quick] == [False] * 9 + [True] * 3  # cheapest first
    assert {label for label in quick if "triton" in label} == {
        "fit step yolov8s default STA triton",
        "STA 160x160 b16 float32 ours triton",
        "STA 160x160 b16 float16 ours triton",
    }
    assert quick[-1] == "fit step yolov8s default STA compiled"


def test_dry_run_measures_every_variant_and_prints_the_table():
    result = run_script("--dry-run", "--no-compile")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("GPU: none (dry run on CPU)")
    rows = table(result.stdout)
    assert list(rows)[:2] == ["fit step yolov8n plain", "fit step yolov8n default STA"]
    for dtype in ("float32", "bfloat16"):
        assert rows[f"STA 16x16 b2 {dtype} ours"][1].endswith("x vs official")
        assert f"STA 16x16 b2 {dtype} official" in rows
    assert re.fullmatch(
        r"\d+\.\d img/s \(\d+\.\d\dx the plain step\)", rows["fit step yolov8n default STA"][1]
    )
    assert lines[-1].startswith("6 rows measured, 0 failed, 0 skipped")


def test_quick_dry_run_prints_each_row_while_it_runs_the_compiled_ones():
    """Rows come out as they are measured: the first arrives while the process still has compiles to do."""
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--dry-run", "--quick"],
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    running_at_row = []
    try:
        for line in process.stdout:
            if line.startswith("| fit step") or line.startswith("| STA"):
                running_at_row.append(process.poll() is None)
        process.wait(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 0, process.stderr.read()
    assert len(running_at_row) == 9 and running_at_row[0]


def test_a_failing_row_is_printed_as_an_error_and_the_others_still_run():
    result = run_script("--dry-run", "--no-compile", "--fail", "float32 official", "--fail", "yolov8n plain")
    assert result.returncode == 1
    rows = table(result.stdout)
    assert len(rows) == 6
    for label in ("STA 16x16 b2 float32 official", "fit step yolov8n plain"):
        assert rows[label][:2] == ["error", f"RuntimeError: injected failure (--fail) in {label}"]
    assert "second line" not in result.stdout  # the first line of the message only
    assert rows["STA 16x16 b2 float32 ours"][1] == "official failed"
    assert rows["STA 16x16 b2 bfloat16 ours"][1].endswith("x vs official")
    assert float(rows["fit step yolov8n default STA"][1].removesuffix(" img/s")) > 0
    assert result.stdout.splitlines()[-1].startswith("4 rows measured, 2 failed, 0 skipped")


def test_the_time_limit_interrupts_the_running_row_and_skips_the_rest():
    result = run_script("--dry-run", "--no-compile", "--time-limit", "0.05")
    assert result.returncode == 1
    rows = table(result.stdout)
    assert len(rows) == 6
    assert rows["fit step yolov8n plain"][:2] == [
        "error",
        "TimeoutError: the --time-limit ran out during this row (0.05 s were left for it)",
    ]
    assert all(cells[0] == "skipped" for label, cells in rows.items() if label != "fit step yolov8n plain")


def run_check(tmp_path: Path, **settings: str) -> tuple[subprocess.CompletedProcess, str]:
    results = tmp_path / "results"
    env = environment(GPU_CHECK_WORK=str(tmp_path / "work"), PYTHON=sys.executable, **settings)
    env.pop("OUT", None)
    result = subprocess.run(
        ["bash", str(CHECK), str(results)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    console = (results / "gpu_check.txt").read_text()
    return result, console


def test_the_check_script_parses():
    result = subprocess.run(["bash", "-n", str(CHECK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@no_gpu
def test_without_cuda_every_step_is_skipped_and_the_summary_printed(tmp_path):
    result, console = run_check(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.split("== summary")[1].splitlines()[1:]
    steps = ["numerics", "export", "fit-16-mixed", "fit-bf16-mixed", "resume", "benchmark"]
    assert [line.split()[0] for line in summary] == steps
    assert all(line.split(None, 1)[1] == "skipped: needs a CUDA GPU" for line in summary)
    assert console == result.stdout
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["env.txt", "gpu_check.txt"]


def test_dry_run_of_the_check_runs_the_steps_on_the_cpu(tmp_path):
    start = time.monotonic()
    settings = {"GPU_CHECK_STEPS": "numerics benchmark", "GPU_CHECK_BENCHMARK_ARGS": "--quick --no-compile"}
    result, console = run_check(tmp_path, GPU_CHECK_DRY_RUN="1", **settings)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = console.split("== summary")[1]
    assert "numerics        ok" in summary and "benchmark       ok" in summary
    assert "STA cpu cells bfloat16 autocast vs float64" in summary
    assert "| STA 16x16 b2 bfloat16 ours |" in summary and "6 rows measured" in summary
    # the benchmark's rows reached the console as they were measured, before its end line
    assert console.index("| fit step yolov8n plain |") < console.index("benchmark: ok in")
    logs = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert logs == ["benchmark.log", "env.txt", "gpu_check.txt", "numerics.log"]
    assert time.monotonic() - start < 120


@pytest.mark.parametrize(
    ("raised", "status"),
    [("ModuleNotFoundError", "skipped: needs onnxruntime"), ("RuntimeError", "FAILED (exit status 1)")],
)
def test_a_missing_package_skips_its_step_and_a_failing_step_stops_no_other(tmp_path, raised, status):
    # An onnxruntime that is missing (ModuleNotFoundError on import) or there but broken (another error)
    fake = tmp_path / "fake" / "onnxruntime"
    fake.mkdir(parents=True)
    error = (
        "ModuleNotFoundError('simulated', name='onnxruntime')"
        if raised == "ModuleNotFoundError"
        else ("RuntimeError('simulated broken onnxruntime')")
    )
    (fake / "__init__.py").write_text(f"raise {error}\n")
    settings = {"GPU_CHECK_STEPS": "numerics export", "PYTHONPATH": f"{tmp_path / 'fake'}{os.pathsep}{ROOT}"}
    result, console = run_check(tmp_path, GPU_CHECK_DRY_RUN="1", **settings)
    assert result.returncode == (0 if raised == "ModuleNotFoundError" else 1), console
    summary = console.split("== summary")[1].splitlines()
    assert summary[1].startswith("numerics        ok")
    assert summary[-1].startswith(f"export          {status}")
    if raised == "RuntimeError":
        assert "simulated broken onnxruntime" in console  # the failed step's last log lines


@pytest.mark.parametrize("script", ["demo_fit", "resume"])
def test_the_check_fit_command_lines_are_accepted_by_the_cli(tmp_path, script):
    sys.path.insert(0, str(GPU_CHECK_DIR))
    try:
        module = __import__(script)
    finally:
        sys.path.remove(str(GPU_CHECK_DIR))
    if script == "demo_fit":
        command = module.fit_command(tmp_path / "demo", "16-mixed", 4, dry_run=False)
    else:
        command = [*module.fit_command(tmp_path / "demo", tmp_path / "run", "gpu", "16-mixed")]
        command.append(module.kill_callback())
    path = os.pathsep.join([str(ROOT / "tests"), str(GPU_CHECK_DIR), str(ROOT)])
    result = subprocess.run(
        [*command, "--print_config"],
        cwd=tmp_path,
        env=environment(PYTHONPATH=path, NO_ALBUMENTATIONS_UPDATE="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision: 16-mixed" in result.stdout and "accelerator: gpu" in result.stdout
