"""After each validation, the dashboards of its COCO evaluation: precision-recall curves, the F1-confidence
curve, the confusion matrix and per-class AP."""

from __future__ import annotations

from types import ModuleType

import numpy as np
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from sta_lightning.callbacks.chart_logging import log_chart, log_numbers
from sta_lightning.callbacks.charts import bar_chart, confusion_chart, curves_chart
from sta_lightning.metrics.confusion import CONFIDENCE, IOU, normalize_rows
from sta_lightning.metrics.curves import F1Curve, IoUChoice, PrecisionRecallCurves, f1_confidence_curve
from sta_lightning.training.module import DetectionModule

# (IoU choice, key suffix, COCO statistic it averages to)
PR_CURVES: tuple[tuple[IoUChoice, str, str], ...] = (
    ("0.5", "iou50", "map_50"),
    ("0.5:0.95", "iou50_95", "map"),
)
BACKGROUND = "background"


class EvaluationPlotsCallback(Callback):
    """Dashboards of each validation's COCO evaluation, logged by global rank 0 under ``<key>/...``:

    - ``pr_curve_iou50``, ``pr_curve_iou50_95``: precision against recall per class and over the classes
      (COCOeval's interpolated precision at its 101 recall thresholds, at IoU 0.5 and averaged over IoU
      0.5:0.95: the very numbers whose means are the logged mAP50 and mAP);
    - ``f1_curve``: F1 against the confidence threshold per class and over the classes, read off the IoU-0.5
      PR curve, the best point marked; ``best_f1`` and ``best_f1_confidence`` logged as numbers;
    - ``confusion_matrix``, ``confusion_matrix_normalized``: true against predicted class plus background,
      detections above confidence 0.25 matched at IoU 0.45, counts and shares of each true class;
    - ``ap_per_class``: AP 0.5:0.95 and AP50 of each class with objects.

    Each goes to W&B as a native chart (line series, confusion matrix, bar chart), to TensorBoard as an
    image, and to ``<run folder>/plots/`` as PNG and CSV (the latest validation's). Reads what the module's
    evaluation computed (``DetectionModule.evaluation.metrics``: "curves", "confusion_matrix"), no second
    evaluation.

    Args:
        every_n_epochs: plot after the validation of every n-th training epoch (always under ``validate``).
        key: logging key prefix.
    """

    def __init__(self, every_n_epochs: int = 1, key: str = "val") -> None:
        if every_n_epochs < 1:
            raise ValueError(f"EvaluationPlotsCallback: every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.key = key

    def on_validation_end(self, trainer: Trainer, pl_module: DetectionModule) -> None:
        metrics = pl_module.evaluation.metrics
        if trainer.sanity_checking or not trainer.is_global_zero or not metrics or "curves" not in metrics:
            return
        if trainer.state.fn == TrainerFn.FITTING and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        curves: PrecisionRecallCurves = metrics["curves"]
        classes = pl_module.classes
        name_of = dict(zip(classes.category_ids, classes.names, strict=True))
        names = [name_of.get(int(category_id), str(category_id)) for category_id in curves.category_ids]
        for iou, suffix, stat in PR_CURVES:
            self._log_pr_curve(trainer, curves, names, iou, f"{self.key}/pr_curve_{suffix}", metrics[stat])
        f1 = f1_confidence_curve(curves)
        self._log_f1_curve(trainer, f1, names)
        log_numbers(
            trainer, {f"{self.key}/best_f1": f1.best_f1, f"{self.key}/best_f1_confidence": f1.best_confidence}
        )
        if "confusion_matrix" in metrics:
            for normalized in (False, True):
                self._log_confusion_matrix(trainer, metrics["confusion_matrix"], names, normalized)
        self._log_ap_per_class(trainer, curves, names)

    def _log_pr_curve(
        self,
        trainer: Trainer,
        curves: PrecisionRecallCurves,
        names: list[str],
        iou: IoUChoice,
        key: str,
        average: float,
    ) -> None:
        recall = curves.recall_thresholds
        per_class, mean = curves.precision_per_class(iou), curves.mean_precision(iou)
        ap = curves.average_precision(iou)
        labels = [f"{name} {value:.3f}" for name, value in zip(names, ap, strict=True)]
        title = f"Precision-recall, IoU {iou}"
        image = curves_chart(
            recall, per_class, labels, mean, f"all classes {average:.3f}", "recall", "precision", title
        )
        columns = ["recall", *names, "all"]
        rows = np.column_stack([recall, per_class, mean]).tolist()
        log_chart(
            trainer,
            key,
            columns,
            rows,
            image,
            lambda wandb: {key: _line_series(wandb, recall, per_class, mean, names, title, "recall")},
        )

    def _log_f1_curve(self, trainer: Trainer, f1: F1Curve, names: list[str]) -> None:
        key = f"{self.key}/f1_curve"
        marker = (f1.best_confidence, f1.best_f1, f"best F1 {f1.best_f1:.3f} at {f1.best_confidence:.2f}")
        title = "F1 against confidence, IoU 0.5"
        image = curves_chart(
            f1.confidences, f1.f1, names, f1.mean_f1, "all classes", "confidence", "F1", title, marker
        )
        rows = np.column_stack([f1.confidences, f1.f1, f1.mean_f1]).tolist()
        log_chart(
            trainer,
            key,
            ["confidence", *names, "all"],
            rows,
            image,
            lambda wandb: {
                key: _line_series(wandb, f1.confidences, f1.f1, f1.mean_f1, names, title, "confidence")
            },
        )

    def _log_confusion_matrix(
        self, trainer: Trainer, matrix: np.ndarray, names: list[str], normalized: bool
    ) -> None:
        key = f"{self.key}/confusion_matrix" + ("_normalized" if normalized else "")
        values = normalize_rows(matrix) if normalized else matrix
        labels = [*names, BACKGROUND]
        shares = " (shares of each true class)" if normalized else ""
        title = f"Confusion matrix{shares}, confidence > {CONFIDENCE:g}, IoU > {IOU:g}"
        image = confusion_chart(values, labels, title, normalized)
        rows = [[label, *row] for label, row in zip(labels, values.tolist(), strict=True)]

        def wandb_values(wandb: ModuleType) -> dict:
            cells = [
                [truth, predicted, values[row, column]]
                for row, truth in enumerate(labels)
                for column, predicted in enumerate(labels)
            ]
            table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=cells)
            fields = {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"}
            return {key: wandb.plot_table("wandb/confusion_matrix/v1", table, fields)}

        log_chart(trainer, key, ["true \\ predicted", *labels], rows, image, wandb_values)

    def _log_ap_per_class(self, trainer: Trainer, curves: PrecisionRecallCurves, names: list[str]) -> None:
        key = f"{self.key}/ap_per_class"
        ap, ap50 = curves.average_precision("0.5:0.95"), curves.average_precision("0.5")
        shown = curves.has_ground_truth
        shown_names = [name for name, keep in zip(names, shown, strict=True) if keep]
        series = {"AP 0.5:0.95": ap[shown], "AP50": ap50[shown]}
        image = bar_chart(shown_names, series, "AP", "Average precision per class", ylim=1.0)
        rows = [
            [name, int(category_id), *((value, value50) if keep else (np.nan, np.nan))]
            for name, category_id, value, value50, keep in zip(
                names, curves.category_ids, ap, ap50, shown, strict=True
            )
        ]
        columns = ["class", "category_id", "AP50_95", "AP50"]

        def wandb_values(wandb: ModuleType) -> dict:
            kept = [row for row, keep in zip(rows, shown, strict=True) if keep]
            table = wandb.Table(columns=columns, data=kept)
            return {key: wandb.plot.bar(table, "class", "AP50_95", title="AP 0.5:0.95 per class")}

        log_chart(trainer, key, columns, rows, image, wandb_values)


def _line_series(
    wandb: ModuleType,
    x: np.ndarray,
    per_class: np.ndarray,
    mean: np.ndarray,
    names: list[str],
    title: str,
    xname: str,
) -> object:
    """W&B's native line chart of the classes with values (columns of ``per_class`` not all NaN) and the
    mean ("all")."""
    shown = [k for k in range(per_class.shape[1]) if not np.isnan(per_class[:, k]).all()]
    ys = [per_class[:, k].tolist() for k in shown] + [mean.tolist()]
    keys = [names[k] for k in shown] + ["all"]
    return wandb.plot.line_series(x.tolist(), ys, keys=keys, title=title, xname=xname)
