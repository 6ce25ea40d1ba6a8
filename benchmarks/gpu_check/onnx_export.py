"""ONNX export on CUDA and onnxruntime parity, one line printed per result.

Run: ``python benchmarks/gpu_check/onnx_export.py [--out DIR]`` (CUDA, onnx, onnxscript, onnxruntime; about a
minute) or ``--dry-run`` (CPU, 64 px).

YOLOv8n with the default STA blocks, 80 classes, BatchNorm statistics calibrated on the input (BN weights
0.3, as tests/test_export.py's demo checkpoint: the output depends on the image without being chaotic), is
written by ``export_detector(..., device="cuda")`` (the code behind ``python -m sta_lightning export``) as
ONNX at 640 px with a free batch, then run by onnxruntime (every execution provider it offers among CUDA and
CPU) on 2 random images and compared with the PyTorch model on CUDA in float32 with TF32 off: boxes within
1e-4 of the largest box coordinate, class probabilities within 1e-3 (absolute; tests/test_export.py's
tolerance), batch 1 and 2. Exit status 1 when a comparison fails.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_utils import first_line, relative_errors, require_cuda, result, say, tf32  # noqa: E402

from sta_lightning.models import DEFAULT_STA, YOLOv8  # noqa: E402

BOX_TOLERANCE, SCORE_TOLERANCE = 1e-4, 1e-3


def build_detector(images: torch.Tensor) -> YOLOv8:
    """The detector under test (construction kept in one place): seeded, BN calibrated on ``images``."""
    torch.manual_seed(0)
    model = YOLOv8("n", 80, DEFAULT_STA)
    for norm in model.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.reset_running_stats()
            norm.momentum = None
            norm.weight.data.fill_(0.3)
    with torch.no_grad():
        model.train()(images)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="folder of the ONNX file (default: a temp)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU at 64 px (script check)")
    args = parser.parse_args(argv)
    device = require_cuda(args.dry_run, "benchmarks/gpu_check/onnx_export.py")
    import onnxruntime

    from sta_lightning.export import export_detector

    folder = args.out or Path(tempfile.mkdtemp(prefix="sta_onnx_check_"))
    folder.mkdir(parents=True, exist_ok=True)
    size = 64 if args.dry_run else 640
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    say(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, device {device}, {size} px")
    detector = build_detector(images)
    path = folder / "yolov8n_sta.onnx"
    start = time.monotonic()
    export_detector(detector, path, image_size=size, dynamic_batch=True, device=device.type)
    result(f"exported yolov8n+STA on {device.type} at {size} px in {time.monotonic() - start:.0f} s")
    with torch.no_grad(), tf32(False):
        expected, _ = copy.deepcopy(detector).to(device)(images.to(device))
    available = onnxruntime.get_available_providers()
    wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    outcomes = []
    for provider in wanted:
        try:
            session = onnxruntime.InferenceSession(str(path), providers=[provider])
            for batch in (1, 2):
                (decoded,) = session.run(None, {"images": images[:batch].numpy()})
                decoded = torch.from_numpy(decoded)
                _, boxes = relative_errors(decoded[:, :4], expected[:batch, :4])
                scores = (decoded[:, 4:] - expected[:batch, 4:].cpu()).abs().max().item()
                ok = boxes <= BOX_TOLERANCE and scores <= SCORE_TOLERANCE
                result(
                    f"onnxruntime {provider.removesuffix('ExecutionProvider')} batch {batch} vs torch "
                    f"{device.type} float32: boxes max rel {boxes:.1e} (tol {BOX_TOLERANCE:.0e}), scores max "
                    f"abs {scores:.1e} (tol {SCORE_TOLERANCE:.0e}): {'ok' if ok else 'FAILED'}"
                )
                outcomes.append(ok)
        except Exception as error:  # the other provider still runs
            result(f"onnxruntime {provider}: error {first_line(error)}")
            outcomes.append(False)
    if not outcomes or not all(outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
