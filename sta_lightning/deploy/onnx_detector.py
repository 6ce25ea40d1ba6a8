"""OnnxDetector: an exported ONNX detector on onnxruntime: images in, detections in original pixels out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sta_lightning.deploy.contract import INPUT_NAME, PREDICT_NMS, read_metadata
from sta_lightning.geometry import PAD_VALUE, boxes_to_original, letterbox, read_image, resize_long_side
from sta_lightning.models.postprocess import non_max_suppression

Image = str | Path | np.ndarray


class OnnxDetector:
    """Run a model written by ``python -m sta_lightning export --format onnx`` with onnxruntime.

    Each image (a path, read with its EXIF orientation, or an (H, W, 3) uint8 RGB array) is resized to the
    model's input size on its long side and letterboxed; the model's output goes through NMS (unless the
    model has it built in) and the boxes are mapped back to the original image.

    Args:
        path: the ``.onnx`` file; its JSON sidecar (``<path>.json``) gives the input size and the classes.
        conf_threshold, iou_threshold, max_det, multi_label: NMS for a model exported without ``--nms``
            (default: ``PREDICT_NMS``); a model with NMS built in keeps the thresholds stored in it, and
            giving any of these is a ValueError.
        batch_size: images per run when the model's batch is free; a fixed-batch model runs its own batch.
        providers: onnxruntime execution providers, in order of preference.
    """

    def __init__(
        self,
        path: str | Path,
        conf_threshold: float | None = None,
        iou_threshold: float | None = None,
        max_det: int | None = None,
        multi_label: bool | None = None,
        batch_size: int = 8,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError(
                f"OnnxDetector needs onnxruntime: pip install -e '.[export]' ({error})"
            ) from error
        self.metadata = read_metadata(path)
        self.session = onnxruntime.InferenceSession(str(path), providers=list(providers))
        model_input = self.session.get_inputs()[0]
        self.image_size = int(self.metadata["image_size"])
        self.input_dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
        model_batch = model_input.shape[0]  # an int, or the name of a free batch dimension
        self.fixed_batch = isinstance(model_batch, int)
        self.batch_size = model_batch if self.fixed_batch else batch_size
        self.class_names: list[str] = self.metadata["class_names"]
        self.category_ids: list[int] = self.metadata["category_ids"]
        requested = {
            "conf_threshold": conf_threshold,
            "iou_threshold": iou_threshold,
            "max_det": max_det,
            "multi_label": multi_label,
        }
        given = {name: value for name, value in requested.items() if value is not None}
        if self.metadata["nms"] is not None and given:
            raise ValueError(
                f"{path} has NMS built in with {self.metadata['nms']}; {sorted(given)} cannot change it "
                "(export without --nms to choose thresholds at run time)"
            )
        self.nms: dict[str, Any] | None = None if self.metadata["nms"] else {**asdict(PREDICT_NMS), **given}

    def __call__(self, image: Image) -> np.ndarray:
        """Detections of one image, as ``predict`` gives them."""
        return self.predict([image])[0]

    def predict(self, images: Sequence[Image]) -> list[np.ndarray]:
        """Per image an (n, 6) float32 array: x1, y1, x2, y2 in original pixels, score, class index (as a
        float; ``class_names`` and ``category_ids`` name it), by descending score."""
        detections = []
        for start in range(0, len(images), self.batch_size):
            originals = [self._read(image) for image in images[start : start + self.batch_size]]
            prepared = [self._letterboxed(original) for original in originals]
            inputs = np.stack([model_input for model_input, _, _ in prepared])
            if self.fixed_batch and len(inputs) < self.batch_size:  # fill the fixed batch with grey images
                filler = np.full((self.batch_size - len(inputs), *inputs.shape[1:]), PAD_VALUE / 255)
                inputs = np.concatenate((inputs, filler.astype(self.input_dtype)))
            output = self.session.run(None, {INPUT_NAME: inputs})[0][: len(prepared)]
            for found, original, (_, scale, pad) in zip(
                self._select(output), originals, prepared, strict=True
            ):
                boxes = boxes_to_original(found[:, :4], scale, pad, original.shape[:2])
                detections.append(np.concatenate((boxes, found[:, 4:]), 1).astype(np.float32))
        return detections

    @staticmethod
    def _read(image: Image) -> np.ndarray:
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"OnnxDetector: expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}"
                )
            return image
        return read_image(image, apply_exif_orientation=True)

    def _letterboxed(self, image: np.ndarray) -> tuple[np.ndarray, float, tuple[int, int]]:
        """(H, W, 3) uint8 -> model input (3, S, S) in [0, 1], resize ratio, (pad_x, pad_y)."""
        resized, scale = resize_long_side(image, self.image_size)
        padded, pad = letterbox(resized, self.image_size)
        model_input = (padded.transpose(2, 0, 1).astype(np.float32) / 255).astype(self.input_dtype)
        return model_input, scale, pad

    def _select(self, output: np.ndarray) -> list[np.ndarray]:
        """Model output of a batch -> per image (n, 6) detections in input pixels."""
        if self.nms is None:  # built in: (B, max_det, 6), zero rows pad
            return [rows[rows[:, 4] > 0] for rows in output]
        kept = non_max_suppression(torch.from_numpy(output).float(), **self.nms)
        return [found.numpy() for found in kept]
