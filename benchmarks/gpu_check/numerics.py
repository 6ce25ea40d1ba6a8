"""Numerics on CUDA against float64 references, one row printed as each is measured.

Run: ``python benchmarks/gpu_check/numerics.py`` (CUDA; about 30 s) or ``--dry-run`` (CPU, tiny sizes).

1. STA: ``StokenAttention`` on CUDA in its "cells" layout and in its "triton" layout (the fused kernels)
   (C=128, 4 heads, 4x4 super tokens as the default preset's P4 block, qkv_bias, a 37x45 map so that the map
   is padded, batch 2, random weights N(0, 0.3) and a smooth-plus-noise input so that the association is far
   from uniform) against its float64 copy on the CPU
   (the "rows" layout, itself checked against a dense float64 reference in tests/test_sta.py): outputs and
   input gradients in float32 (TF32 off), under float16 autocast and under bfloat16 autocast.
2. YOLOv8n with the default STA at 640 px, batch 2, eval: float32 on CUDA against float64 on the CPU, the
   decoded output's boxes and class scores. Twice: with the BatchNorm statistics as initialised (the signal
   fades through the layers, so every anchor gets about the same output) and with them calibrated on the
   input (statistics of the batch, BN weights 0.3, as tests/test_export.py does), where the output depends
   on the image. CUDA float32 with TF32 off, and once more with torch's default TF32 settings.

Relative errors: ||a - e|| / ||e|| ("norm") and max |a - e| / max |e| ("max"); a row passes when "max" is
within its tolerance: STA the CPU autocast tolerances of tests/test_sta.py (float32 1e-5, float16 5e-3,
bfloat16 3e-2; input gradients 4x), yolov8n 1e-4 with TF32 off and 2e-2 with torch's defaults. Reported
earlier on an H200: STA float32 4e-7, float16 6e-4, bfloat16 5e-3; yolov8n float32 1.6e-7.
Exit status 1 when a row fails or errors.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_utils import first_line, relative_errors, require_cuda, result, say, tf32, tf32_defaults  # noqa: E402

from sta_lightning.models import DEFAULT_STA, YOLOv8  # noqa: E402
from sta_lightning.nn import StokenAttention  # noqa: E402

# (max relative error of the output, of the input gradient)
STA_TOLERANCE = {"float32": (1e-5, 4e-5), "float16": (5e-3, 2e-2), "bfloat16": (3e-2, 1.2e-1)}
YOLO_TOLERANCE = {"tf32 off": 1e-4, "torch defaults": 2e-2}


def build_sta(channels: int) -> StokenAttention:
    """The STA module under test, in float64 (construction kept in one place)."""
    torch.manual_seed(0)
    module = StokenAttention(channels, (4, 4), n_iter=1, num_heads=4, qkv_bias=True, pixel_layout="cells")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module.double()


def build_yolo() -> YOLOv8:
    """YOLOv8n with the default STA blocks, 80 classes, seeded, float64 (construction kept in one place)."""
    torch.manual_seed(0)
    return YOLOv8("n", 80, DEFAULT_STA).double().eval()


def structured_input(b: int, c: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    base = F.interpolate(torch.randn(b, c, 3, 3, generator=g, dtype=torch.float64), (h, w), mode="bilinear")
    return 2.0 * base + 0.5 * torch.randn(b, c, h, w, generator=g, dtype=torch.float64)


def row(name: str, errors: list[tuple[str, tuple[float, float], float]]) -> bool:
    """Print one row: for each quantity its norm and max relative errors against the tolerance."""
    ok = all(max_error <= tolerance for _, (_, max_error), tolerance in errors)
    cells = [
        f"{what} norm {norm:.1e} max {max_error:.1e} (tol {tolerance:.0e})"
        for what, (norm, max_error), tolerance in errors
    ]
    result(f"{name}: {'; '.join(cells)}: {'ok' if ok else 'FAILED'}")
    return ok


def sta_rows(device: torch.device, size: tuple[int, int, int, int]) -> list[bool]:
    b, c, h, w = size
    reference = build_sta(c)
    x64 = structured_input(b, c, h, w).requires_grad_()
    upstream64 = torch.randn(b, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = reference(x64)
    (expected * upstream64).sum().backward()
    upstream = upstream64.float().to(device)
    outcomes = []
    # the fused Triton kernels run on CUDA only
    layouts = ("cells", "triton") if device.type == "cuda" else ("cells",)
    for layout, dtype in itertools.product(layouts, (torch.float32, torch.float16, torch.bfloat16)):
        name = str(dtype).removeprefix("torch.")
        try:
            module = copy.deepcopy(reference).float().to(device)
            module.pixel_layout = layout
            x = x64.detach().float().to(device).requires_grad_()
            with tf32(False), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = module(x)
                (out.float() * upstream).sum().backward()
            out_tolerance, grad_tolerance = STA_TOLERANCE[name]
            label = f"STA {device.type} {layout} {name}" + (" autocast" if dtype != torch.float32 else "")
            errors = [
                ("output", relative_errors(out, expected), out_tolerance),
                ("input grad", relative_errors(x.grad, x64.grad), grad_tolerance),
            ]
            outcomes.append(row(f"{label} vs float64", errors))
        except Exception as error:  # one failing row does not stop the others
            result(f"STA {layout} {name}: error {first_line(error)}")
            outcomes.append(False)
    return outcomes


def calibrate(model: YOLOv8, images: torch.Tensor) -> None:
    """BatchNorm statistics of ``images`` and BN weights 0.3 (as tests/test_export.py's demo checkpoint)."""
    for norm in model.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.reset_running_stats()
            norm.momentum = None  # a plain average of the batches seen
            norm.weight.data.fill_(0.3)
    with torch.no_grad():
        model.train()(images)
    model.eval()


def yolo_rows(device: torch.device, size: int) -> list[bool]:
    images64 = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outcomes = []
    for statistics in ("initial BN", "calibrated BN"):
        model = build_yolo()
        if statistics == "calibrated BN":
            calibrate(model, images64)
        with torch.no_grad():
            expected, _ = model(images64)
        candidate = copy.deepcopy(model).float().to(device)
        settings = ("tf32 off", "torch defaults") if device.type == "cuda" else ("tf32 off",)
        for setting in settings:
            try:
                with torch.no_grad(), tf32(False) if setting == "tf32 off" else nullcontext():
                    decoded, _ = candidate(images64.float().to(device))
                tolerance = YOLO_TOLERANCE[setting]
                label = f"yolov8n+STA {size} px {statistics} {device.type} float32 ({setting}"
                label += f": {tf32_defaults()})" if setting == "torch defaults" else ")"
                errors = [
                    ("boxes", relative_errors(decoded[:, :4], expected[:, :4]), tolerance),
                    ("scores", relative_errors(decoded[:, 4:], expected[:, 4:]), tolerance),
                ]
                outcomes.append(row(f"{label} vs CPU float64", errors))
            except Exception as error:
                result(f"yolov8n+STA {statistics} {setting}: error {first_line(error)}")
                outcomes.append(False)
    return outcomes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="on the CPU at tiny sizes (script check)")
    args = parser.parse_args(argv)
    device = require_cuda(args.dry_run, "benchmarks/gpu_check/numerics.py")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "none (dry run on CPU)"
    say(f"GPU: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); {tf32_defaults()}")
    start = time.monotonic()
    sta_size = (1, 16, 11, 13) if args.dry_run else (2, 128, 37, 45)
    outcomes = sta_rows(device, sta_size) + yolo_rows(device, 64 if args.dry_run else 640)
    say(f"{sum(outcomes)} of {len(outcomes)} rows within tolerance, in {time.monotonic() - start:.0f} s")
    if not all(outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
