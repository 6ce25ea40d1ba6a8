"""Log predicted and ground-truth boxes on a fixed set of validation images (interactive boxes in W&B)."""

from collections.abc import Sequence

import torch
from lightning.pytorch import Trainer
from torchvision.ops import clip_boxes_to_image

from sta_lightning.callbacks.image_logging import log_images
from sta_lightning.callbacks.validation_samples import ValidationSamplesCallback
from sta_lightning.models import NMSConfig
from sta_lightning.training.module import DetectionModule


def wandb_box_group(
    boxes: torch.Tensor, classes: torch.Tensor, scores: torch.Tensor | None, class_names: Sequence[str]
) -> dict:
    """One W&B box group ({"box_data": [...], "class_labels": {...}}) in the "pixel" domain.

    boxes: (n, 4) xyxy pixels; classes: (n,) class indices; scores: (n,) confidences, or None for ground
    truth. Captions are "<class name> <score>" (or just the name).
    """
    box_data = []
    score_list = scores.tolist() if scores is not None else [None] * len(boxes)
    for (x1, y1, x2, y2), class_index, score in zip(
        boxes.tolist(), classes.long().tolist(), score_list, strict=True
    ):
        name = class_names[class_index]
        entry = {
            "position": {"minX": x1, "minY": y1, "maxX": x2, "maxY": y2},
            "domain": "pixel",
            "class_id": class_index,
            "box_caption": name if score is None else f"{name} {score:.2f}",
        }
        if score is not None:
            entry["scores"] = {"conf": score}
        box_data.append(entry)
    return {"box_data": box_data, "class_labels": dict(enumerate(class_names))}


class PredictionImagesCallback(ValidationSamplesCallback):
    """Predicted boxes (score > ``conf_threshold`` after NMS) and ground-truth boxes on validation images.

    W&B gets the letterboxed input images with two interactive box groups, "predictions" (captions with class
    name and score) and "ground_truth"; TensorBoard and PNG files get both drawn in (green: predictions,
    red: ground truth). Logged under ``key``.

    Args:
        num_images: the first ``num_images`` images of the validation set.
        every_n_epochs: log after the validation of every n-th training epoch.
        conf_threshold: lowest score of a shown prediction.
        iou_threshold: NMS IoU threshold.
        max_det: most predictions shown per image.
        key: logging key.
    """

    def __init__(
        self,
        num_images: int = 4,
        every_n_epochs: int = 1,
        conf_threshold: float = 0.25,
        iou_threshold: float = 0.7,
        max_det: int = 100,
        key: str = "val/predictions",
    ) -> None:
        super().__init__(num_images, every_n_epochs)
        if not 0.0 <= conf_threshold <= 1.0:
            raise ValueError(
                f"PredictionImagesCallback: conf_threshold must be in [0, 1], got {conf_threshold}"
            )
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self.max_det = max_det
        self.key = key

    def log_samples(self, trainer: Trainer, pl_module: DetectionModule, samples: dict) -> None:
        nms = NMSConfig(self.conf_threshold, self.iou_threshold, self.max_det, multi_label=False)
        detections = pl_module.predict_batch(samples["images"], nms)
        names = pl_module.classes.names
        images = list(samples["images"].permute(0, 2, 3, 1).cpu().numpy())
        boxes, captions = [], []
        for index, (image_id, predicted) in enumerate(
            zip(samples["image_ids"].tolist(), detections, strict=True)
        ):
            predicted = predicted.float().cpu()
            shown = clip_boxes_to_image(predicted[:, :4], images[index].shape[:2])
            own = samples["batch_idx"] == index
            boxes.append(
                {
                    "predictions": wandb_box_group(shown, predicted[:, 5], predicted[:, 4], names),
                    "ground_truth": wandb_box_group(samples["bboxes"][own], samples["cls"][own], None, names),
                }
            )
            captions.append(
                f"image {image_id}: {len(predicted)} predictions (score > {self.conf_threshold:g}), "
                f"{int(own.sum())} ground-truth boxes"
            )
        log_images(trainer, self.key, images, captions, boxes)
