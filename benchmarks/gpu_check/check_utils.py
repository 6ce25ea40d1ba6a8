"""Helpers shared by the GPU check scripts of benchmarks/gpu_check.sh: result lines, relative errors, TF32."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "RESULT "  # gpu_check.sh copies the lines that start with it into its summary


def say(line: str = "") -> None:
    print(line, flush=True)


def result(line: str) -> None:
    """A line for the check's summary (also printed in this step's log)."""
    say(RESULT_PREFIX + line)


def has_wandb() -> bool:
    """Whether wandb imports (a wandb that is there but broken raises)."""
    try:
        import wandb  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name != "wandb":
            raise
        return False
    return True


def demo_config(folder: Path) -> tuple[Path, bool]:
    """configs/demo.yaml, or without wandb a copy in ``folder`` without its W&B logger (the CLI checks every
    class path of a config file, so an override cannot leave it out); and whether W&B logs."""
    config = ROOT / "configs" / "demo.yaml"
    if has_wandb():
        return config, True
    import yaml

    content = yaml.safe_load(config.read_text())
    loggers = content["trainer"]["logger"]
    content["trainer"]["logger"] = [logger for logger in loggers if "Wandb" not in logger["class_path"]]
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / "demo-without-wandb.yaml"
    copy.write_text(yaml.safe_dump(content, sort_keys=False))
    say(f"wandb is not installed: the fit runs {copy}, configs/demo.yaml without its W&B logger")
    return copy, False


def first_line(error: BaseException) -> str:
    """``Type: first line of the message``, as the check's result lines report an exception."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def relative_errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(||a - e|| / ||e||, max |a - e| / max |e|), computed in float64 on the CPU."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    difference = a - e
    norm = e.norm().item()
    peak = e.abs().max().item()
    return difference.norm().item() / (norm or 1.0), difference.abs().max().item() / (peak or 1.0)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA float32 matrix products and cuDNN convolutions on or off, restored afterwards."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch >= 2.9 deprecates these flags in favour of fp32_precision
        before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def tf32_defaults() -> str:
    """torch's own TF32 settings in this process, as text."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    return f"matmul TF32 {'on' if matmul else 'off'}, cuDNN TF32 {'on' if cudnn else 'off'}"


def require_cuda(dry_run: bool, script: str) -> torch.device:
    """The device to check: CUDA, or the CPU for a dry run; exits naming --dry-run without CUDA."""
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run runs on CPU")
    return torch.device("cuda")
