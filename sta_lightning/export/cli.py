"""``python -m sta_lightning export``: a checkpoint as ONNX, TorchScript or ExportedProgram, plus sidecar."""

from __future__ import annotations

import argparse
from pathlib import Path

from sta_lightning.deploy.contract import metadata_path
from sta_lightning.export.exporter import FORMATS, export_detector
from sta_lightning.export.nms import MAX_CANDIDATES, PaddedNMS
from sta_lightning.models.checkpoint import detector_from_checkpoint
from sta_lightning.models.postprocess import PREDICT_NMS

NMS_OPTIONS = ("conf_threshold", "iou_threshold", "max_det", "multi_label", "max_candidates")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sta_lightning export",
        description="Export the averaged (EMA) weights of a checkpoint written by fit. The input is "
        "'images', float32 (B, 3, S, S) RGB in [0, 1], letterboxed to S with grey 114; the output is "
        "'decoded' (B, 4 + nc, N), or with --nms 'detections' (B, max_det, 6). A JSON sidecar beside the "
        "model holds the classes, sizes and versions. A model holds one input size (its batch can be free).",
    )
    parser.add_argument(
        "--ckpt_path", required=True, help="checkpoint written by python -m sta_lightning fit"
    )
    parser.add_argument("--format", choices=tuple(FORMATS), default="onnx", help="default: onnx")
    parser.add_argument(
        "--image_size",
        type=int,
        help="input size S, a multiple of 32 (default: the checkpoint's training size)",
    )
    parser.add_argument(
        "--output", help="model file (default: the checkpoint's name with the format's suffix)"
    )
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="fixed batch size (default 1)")
    batch.add_argument("--dynamic_batch", action="store_true", help="any batch size")
    parser.add_argument("--half", action="store_true", help="float16 weights and input")
    parser.add_argument("--nms", action="store_true", help="NMS in the graph: output (B, max_det, 6)")
    nms = parser.add_argument_group("NMS stored in the model (with --nms)")
    nms.add_argument("--conf_threshold", type=float, help=f"default {PREDICT_NMS.conf_threshold}")
    nms.add_argument("--iou_threshold", type=float, help=f"default {PREDICT_NMS.iou_threshold}")
    nms.add_argument("--max_det", type=int, help=f"detections per image, default {PREDICT_NMS.max_det}")
    nms.add_argument("--multi_label", action="store_true", default=None, help="every class above threshold")
    nms.add_argument(
        "--max_candidates", type=int, help=f"candidates per image entering NMS, default {MAX_CANDIDATES}"
    )
    parser.add_argument(
        "--device", default="cpu", help="where the model is traced (cuda for --half torchscript)"
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run the export on ``argv`` (default: the command line); returns the sidecar's content."""
    parser = build_parser()
    args = parser.parse_args(argv)
    nms_settings = {name: getattr(args, name) for name in NMS_OPTIONS if getattr(args, name) is not None}
    if nms_settings and not args.nms:
        parser.error(f"{', '.join('--' + name for name in nms_settings)} only apply with --nms")
    output = Path(args.output or Path(args.ckpt_path).with_suffix(FORMATS[args.format]))
    try:
        detector, trained = detector_from_checkpoint(args.ckpt_path)
        image_size = args.image_size or trained.image_size
        if image_size is None:
            raise ValueError(f"{args.ckpt_path} does not record its training size: give --image_size")
        metadata = export_detector(
            detector,
            output,
            format=args.format,
            image_size=image_size,
            batch=args.batch,
            dynamic_batch=args.dynamic_batch,
            half=args.half,
            nms=PaddedNMS(**nms_settings) if args.nms else None,
            device=args.device,
            classes=trained.classes,
            checkpoint=args.ckpt_path,
        )
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"exported {output} ({args.format}) and {metadata_path(output)}")
    return metadata
