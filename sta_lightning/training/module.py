"""DetectionModule: the YOLOv8 (+ STA) detector, its loss, NMS and COCO evaluation as a LightningModule.

Training reproduces the reference YOLOv8 recipe with manual optimization, because the number of accumulated
batches ramps up during warmup (which Lightning's fixed ``accumulate_grad_batches`` cannot do): the loss is
the per-batch loss times the batch size (under DDP each process's share of the loss of all processes' batches,
times the world size because DDP averages gradients: see ``YOLOv8Loss(all_processes=True)``), gradients are
summed until ``accumulate`` iterations have passed since the last step (the count runs across
epochs), clipped to norm 10, and every optimizer step is followed by an EMA update (``ModelEMA``, added by
``configure_callbacks``). Validation and checkpoints use the EMA weights. Steps with a non-finite loss or
gradients are skipped (``sta_lightning.training.nonfinite``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from sta_lightning.data import boxes_to_original
from sta_lightning.metrics import COCO_STATS, COCOEvaluator
from sta_lightning.models import (
    DEFAULT_STA,
    STAPlacement,
    YOLOv8,
    YOLOv8Loss,
    load_pretrained,
    non_max_suppression,
)
from sta_lightning.training.ema import ModelEMA
from sta_lightning.training.nonfinite import NonFiniteStepGuard, gradients_are_finite
from sta_lightning.training.optim import (
    GROUP_NAMES,
    OptimizerName,
    ScheduleName,
    TrainingSchedule,
    apply_step_settings,
    build_optimizer,
    scaled_weight_decay,
    warmup_iterations,
)
from sta_lightning.training.random_state import RandomStateCheckpoint
from sta_lightning.training.requeue import SLURMRequeue

LOSS_NAMES = ("box_loss", "cls_loss", "dfl_loss")
NMS_ARGUMENTS = (
    "conf_threshold",
    "iou_threshold",
    "max_det",
    "multi_label",
    "predict_conf_threshold",
    "predict_multi_label",
)


@contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block and give it back its previous train/eval mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def sta_placements(
    sta: Sequence[STAPlacement | dict] | Literal["default"] | None,
) -> tuple[STAPlacement, ...]:
    """STA placements from config: "default" (``DEFAULT_STA``), None (none), or placements / dicts."""
    if sta is None:
        return ()
    if isinstance(sta, str):
        if sta != "default":
            raise ValueError(f"sta must be 'default', null or a list of placements, got {sta!r}")
        return tuple(DEFAULT_STA)
    return tuple(p if isinstance(p, STAPlacement) else STAPlacement(**p) for p in sta)


class DetectionModule(L.LightningModule):
    """YOLOv8 detector with optional STA blocks, trained with the YOLOv8 recipe and evaluated with COCO mAP.

    Args:
        model_scale: YOLOv8 scale, one of n, s, m, l, x (named so to differ from the datamodule's augmentation
            ``scale``: Lightning refuses to log two hyperparameters of one name with different values).
        sta: STA placements: "default" (``sta_lightning.models.DEFAULT_STA``), null, or a list of
            ``STAPlacement`` fields (layer, stoken_size, n_iter, num_heads, mlp_ratio, layer_scale, drop_path,
            depth).
        num_classes, class_names, category_ids: the classes (linked from the datamodule by the CLI);
            ``category_ids`` maps class index -> COCO category id for evaluation and prediction output.
        optimizer: "SGD" (nesterov, momentum ``momentum``) or "AdamW" (betas (``momentum``, 0.999)).
        lr0: initial learning rate, reached at the end of warmup.
        lrf: final learning rate as a fraction of ``lr0`` (at ``max_epochs``).
        lr_schedule: per-epoch decay, "linear" or "cosine".
        momentum: SGD momentum / Adam beta1.
        weight_decay: decay of the conv/linear weights for a batch of ``nominal_batch_size`` images; scaled by
            batch x devices x accumulate / nominal_batch_size.
        nominal_batch_size: images per optimizer step that the recipe assumes (64); gradients of
            round(nominal / (batch x devices)) batches are summed per step.
        warmup_epochs, warmup_min_iterations: warmup length, max(round(warmup_epochs x batches per epoch),
            warmup_min_iterations) iterations; warmup_epochs 0 disables warmup.
        warmup_bias_lr: bias lr at the start of warmup; warmup_momentum: momentum at the start of warmup.
        gradient_clip_norm: max total gradient norm per step (0 disables clipping).
        max_nonfinite_steps: training steps skipped for a NaN or inf loss or gradients, with no optimizer step
            in between, after which the fit stops (``sta_lightning.training.nonfinite``).
        ema: keep an exponential moving average of the weights for validation and checkpoints.
        ema_decay, ema_tau: EMA decay d = ema_decay (1 - exp(-updates / ema_tau)).
        pretrained: weights to start from (``load_pretrained``): a reference YOLOv8 ``.pt`` (8.0-8.4,
            released or training format), a ``.ckpt`` of this project or a state dict. The file's scale
            must be ``model_scale``; another class count re-initialises the class branch; STA blocks that
            the file lacks start as the identity. Not a hyperparameter: a checkpoint holds the weights, so
            it validates and resumes without the file.
        freeze: layers whose parameters stay fixed: a count of leading reference layers (10 = the backbone)
            or a list of layer indices (0-21, 22 = the head). Their parameters get no updates and stay out of
            the optimizer, and their BatchNorm layers stay in eval mode. STA blocks are never frozen.
        sta_lr_scale: learning-rate multiplier of the STA parameters (the new ones when fine-tuning).
        box_gain, cls_gain, dfl_gain: loss gains.
        assigner_topk, assigner_alpha, assigner_beta: task-aligned assigner (candidates per GT, exponents of
            the classification score and the CIoU in the alignment metric).
        min_box_side: pixels; GT sides shorter than this count as this long in the assigner's inside test
            (16 is what Ultralytics 8.4 does); null keeps the classic YOLOv8 behaviour.
        conf_threshold, iou_threshold, max_det, multi_label: NMS for validation and test.
        predict_conf_threshold, predict_multi_label: NMS for ``predict``.
        compile: run the train step's forward through ``torch.compile`` (mode "default": Inductor's fused
            kernels; not "reduce-overhead", whose CUDA graphs need static buffers and pay off for small,
            launch-bound steps rather than a detector's, nor "max-autotune", which spends minutes tuning
            each shape). The first step compiles (minutes on CPU); validation, test, predict and the EMA copy
            run the eager model. STA blocks run their one-pass "cells" layout under compile.
        compile_backend: the ``torch.compile`` backend: "inductor" generates the kernels; "aot_eager" only
            traces forward and backward (fast: checks that the step compiles, without speed-up).

    The NMS settings are evaluation choices, not part of the model: they are left out of the checkpoint's
    hyperparameters, so ``validate|test|predict --ckpt_path`` take them from the command line / config.
    """

    def __init__(
        self,
        model_scale: Literal["n", "s", "m", "l", "x"] = "n",
        sta: list[STAPlacement] | Literal["default"] | None = None,
        num_classes: int = 80,
        class_names: list[str] | None = None,
        category_ids: list[int] | None = None,
        optimizer: OptimizerName = "SGD",
        lr0: float = 0.01,
        lrf: float = 0.01,
        lr_schedule: ScheduleName = "linear",
        momentum: float = 0.937,
        weight_decay: float = 5e-4,
        nominal_batch_size: int = 64,
        warmup_epochs: float = 3.0,
        warmup_min_iterations: int = 100,
        warmup_bias_lr: float = 0.1,
        warmup_momentum: float = 0.8,
        gradient_clip_norm: float = 10.0,
        max_nonfinite_steps: int = 10,
        ema: bool = True,
        ema_decay: float = 0.9999,
        ema_tau: float = 2000.0,
        pretrained: str | None = None,
        freeze: int | list[int] | None = None,
        sta_lr_scale: float = 1.0,
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        dfl_gain: float = 1.5,
        assigner_topk: int = 10,
        assigner_alpha: float = 0.5,
        assigner_beta: float = 6.0,
        min_box_side: float | None = None,
        conf_threshold: float = 0.001,
        iou_threshold: float = 0.7,
        max_det: int = 300,
        multi_label: bool = True,
        predict_conf_threshold: float = 0.25,
        predict_multi_label: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=[*NMS_ARGUMENTS, "pretrained"])
        # NMS settings of validation / test and of predict.
        self.nms = dict(
            conf_threshold=conf_threshold,
            iou_threshold=iou_threshold,
            max_det=max_det,
            multi_label=multi_label,
        )
        self.predict_nms = {
            **self.nms,
            "conf_threshold": predict_conf_threshold,
            "multi_label": predict_multi_label,
        }
        placements = sta_placements(sta)
        if placements:
            # Resolved plain values in the checkpoint: it loads with torch.load(weights_only=True) and
            # rebuilds the same model even if DEFAULT_STA changes later.
            self.hparams["sta"] = [asdict(p) for p in placements]
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        if category_ids is not None and len(category_ids) != num_classes:
            raise ValueError(f"category_ids has {len(category_ids)} ids for num_classes={num_classes}")
        if compile and compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(
                f"compile_backend {compile_backend!r} is not a torch.compile backend; "
                f"known: {', '.join(torch._dynamo.list_backends(exclude_tags=()))}"
            )
        self.automatic_optimization = False
        self.model = YOLOv8(model_scale, num_classes, placements)
        self.pretrained_summary: str | None = None
        if pretrained is not None:
            self.pretrained_summary = load_pretrained(self.model, pretrained).summary()
            rank_zero_info(self.pretrained_summary)
        self.frozen_layers = self.model.freeze(freeze)
        self.loss = YOLOv8Loss(
            num_classes,
            self.model.reg_max,
            self.model.strides,
            box_gain=box_gain,
            cls_gain=cls_gain,
            dfl_gain=dfl_gain,
            topk=assigner_topk,
            alpha=assigner_alpha,
            beta=assigner_beta,
            min_box_side=min_box_side,
        )
        self.class_names = (
            list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        )
        self.category_ids = list(category_ids) if category_ids is not None else list(range(num_classes))
        self.evaluator: COCOEvaluator | None = None
        self.coco_metrics: dict[str, Any] | None = None  # the last validation/test metrics, for callbacks
        self.schedule: TrainingSchedule | None = None
        self.last_optimizer_step = -1  # iteration (over all epochs) of the last optimizer step
        self._restored_gradients: dict[str, Tensor] = {}  # pending gradients read from a checkpoint
        self.nonfinite_guard = NonFiniteStepGuard(max_nonfinite_steps)
        # The compiled train-step forward (``compile``), made at the first step: after the strategy's model
        # changes (SyncBatchNorm) and after the EMA callback copied this module, so the copy holds none.
        self._compiled_model: nn.Module | None = None

    def forward(self, images: Tensor) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """float images (B, 3, S, S) in [0, 1] -> the detector's output (see ``YOLOv8``)."""
        return self.model(images)

    def model_input(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, S, S) -> float [0, 1] in the parameters' dtype, on this module's device."""
        return images.to(self.device, self.dtype, non_blocking=True) / 255

    def _fitting(self) -> bool:
        return self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING

    def configure_callbacks(self) -> list[L.Callback]:
        """While fitting: the EMA, the random states in checkpoints and, under SLURM, the requeue on
        pre-emption (what an exact resume needs)."""
        if not self._fitting():
            return []
        callbacks: list[L.Callback] = [RandomStateCheckpoint()]
        if self.hparams.ema:
            callbacks.append(ModelEMA(decay=self.hparams.ema_decay, tau=self.hparams.ema_tau))
        if SLURMEnvironment.detect():
            callbacks.append(SLURMRequeue())
        return callbacks

    @property
    def ema(self) -> AveragedModel | None:
        """The EMA copy of this module while fitting (its ``.module`` is a DetectionModule), else None."""
        if self._trainer is None:
            return None
        for callback in self.trainer.callbacks:
            if isinstance(callback, ModelEMA):
                return callback.averaged_model
        return None

    # ---------------------------------------------------------------- training
    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The weight decay is rescaled in on_train_start, once the batch size and device count are known.
        hp = self.hparams
        frozen = [p for index in self.frozen_layers for p in self.model.layer(index).parameters()]
        return build_optimizer(
            self.model,
            hp.optimizer,
            hp.lr0,
            hp.momentum,
            hp.weight_decay,
            sta_lr_scale=hp.sta_lr_scale,
            exclude=frozen,
        )

    def train(self, mode: bool = True) -> DetectionModule:
        """Lightning's train/eval switch, except that frozen layers (``freeze``) always stay in eval mode."""
        super().train(mode)
        for index in self.frozen_layers:
            self.model.layer(index).eval()
        return self

    def on_train_start(self) -> None:
        hp = self.hparams
        trainer = self.trainer
        if trainer.max_epochs is None or trainer.max_epochs < 1:
            raise ValueError(
                "DetectionModule needs trainer.max_epochs >= 1: the lr schedule decays over the epochs"
            )
        total_batch_size = trainer.train_dataloader.batch_size * trainer.world_size
        self.schedule = TrainingSchedule(
            lr0=hp.lr0,
            lrf=hp.lrf,
            epochs=trainer.max_epochs,
            schedule=hp.lr_schedule,
            warmup_iters=warmup_iterations(
                hp.warmup_epochs, trainer.num_training_batches, hp.warmup_min_iterations
            ),
            warmup_bias_lr=hp.warmup_bias_lr,
            warmup_momentum=hp.warmup_momentum,
            momentum=hp.momentum,
            nominal_batch_size=hp.nominal_batch_size,
            total_batch_size=total_batch_size,
        )
        decay = scaled_weight_decay(hp.weight_decay, hp.nominal_batch_size, total_batch_size)
        for group in self.optimizers().optimizer.param_groups:
            if group["name"] == "weight":
                group["weight_decay"] = decay
        parameters = dict(self.named_parameters())
        for name, gradient in self._restored_gradients.items():
            parameters[name].grad = gradient.to(parameters[name].device)
        self._restored_gradients = {}

    def on_train_epoch_start(self) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch, self.trainer.max_epochs)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        iteration = batch_idx + self.trainer.num_training_batches * self.current_epoch
        settings = self.schedule.at(iteration, self.current_epoch)
        apply_step_settings(optimizer.optimizer, settings)

        predictions = self._train_forward(self.model_input(batch["images"]))
        targets = {key: batch[key] for key in ("batch_idx", "cls", "bboxes")}
        total, items = self.loss(predictions, targets, all_processes=True)
        where = (iteration, self.current_epoch, self.trainer.global_step)
        # Every rank must agree: backward is collective under DDP.
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(total)), all=True):
            self.nonfinite_guard.skipped("loss", *where)
            self.last_optimizer_step += 1  # so that the skipped batch does not count towards the accumulation
            return None
        # DDP averages gradients over processes; the recipe sums them.
        self.manual_backward(total * self.trainer.world_size)
        if iteration - self.last_optimizer_step >= settings.accumulate:
            # Gradients are synchronised across ranks by now, so every rank decides alike. Under a GradScaler
            # (fp16) the scaler checks the unscaled gradients and skips the step itself.
            if self._gradient_scaler_active() or gradients_are_finite(list(self.parameters())):
                optimizer.step()  # gradients are clipped in on_before_optimizer_step (after AMP unscaling)
                self.nonfinite_guard.passed()
            else:
                self.nonfinite_guard.skipped("gradients", *where)
            optimizer.zero_grad(set_to_none=True)
            self.last_optimizer_step = iteration

        batch_size = batch["images"].shape[0]
        losses = {f"train/{name}": value for name, value in zip(LOSS_NAMES, items, strict=True)}
        self.log_dict(
            losses, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size, sync_dist=True
        )
        lrs = {f"lr/{name}": lr for name, lr in zip(GROUP_NAMES, settings.lrs, strict=True)}
        self.log_dict(lrs, on_step=True, on_epoch=False, batch_size=batch_size)
        return total.detach()

    def _train_forward(self, images: Tensor) -> list[Tensor]:
        """The detector's train-mode forward, through ``torch.compile`` when ``compile`` is on. The compiled
        wrapper is kept out of the module tree, so state dicts and checkpoints are unchanged."""
        if not self.hparams.compile:
            return self.model(images)
        if self._compiled_model is None:
            backend = self.hparams.compile_backend
            mode = "default" if backend == "inductor" else None  # modes are Inductor's
            self.__dict__["_compiled_model"] = torch.compile(self.model, mode=mode, backend=backend)
        return self._compiled_model(images)

    def _gradient_scaler_active(self) -> bool:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler is not None and scaler.is_enabled()

    def on_validation_model_zero_grad(self) -> None:
        """Keep the gradients summed since the last optimizer step (Lightning would free them before
        validating): accumulation runs across epoch ends, hence across validations."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.hparams.gradient_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm=self.hparams.gradient_clip_norm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Gradients summed since the last optimizer step carry over epoch ends (as in the reference), so an
        # exact resume needs them too.
        pending = {
            name: parameter.grad.detach().clone()
            for name, parameter in self.named_parameters()
            if parameter.grad is not None
        }
        if self.pretrained_summary is not None:
            checkpoint["pretrained"] = self.pretrained_summary  # where the weights came from, for the record
        checkpoint["gradient_accumulation"] = {
            "last_optimizer_step": self.last_optimizer_step,
            "pending_gradients": pending,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self._fitting():
            # validate/test/predict use the EMA weights of state_dict; the EMA and random-state callbacks
            # exist only in fit, so their states have no taker (Lightning would warn to add the callbacks).
            for fit_only in (ModelEMA(), RandomStateCheckpoint()):
                checkpoint.get("callbacks", {}).pop(fit_only.state_key, None)
        state = checkpoint.get("gradient_accumulation")
        if state is None:
            return
        self.last_optimizer_step = state["last_optimizer_step"]
        # Lightning zeroes the gradients after restoring, before the fit loop: on_train_start puts them back.
        self._restored_gradients = state["pending_gradients"]

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict_batch(
        self,
        images: Tensor,
        conf_threshold: float | None = None,
        iou_threshold: float | None = None,
        max_det: int | None = None,
        multi_label: bool | None = None,
    ) -> list[Tensor]:
        """Eval-mode forward + NMS of uint8 images (B, 3, S, S) with the current weights (the EMA ones
        during validation). Thresholds default to the validation ones. Returns per image (n, 6): x1, y1, x2,
        y2 (input pixels), score, class index. The detector's train/eval mode is restored afterwards."""
        with evaluation_mode(self.model):
            decoded, _ = self.model(self.model_input(images))
        return non_max_suppression(
            decoded,
            conf_threshold=self.nms["conf_threshold"] if conf_threshold is None else conf_threshold,
            iou_threshold=self.nms["iou_threshold"] if iou_threshold is None else iou_threshold,
            max_det=self.nms["max_det"] if max_det is None else max_det,
            multi_label=self.nms["multi_label"] if multi_label is None else multi_label,
        )

    @staticmethod
    def detections_to_original(detections: list[Tensor], batch: dict[str, Tensor]) -> list[Tensor]:
        """Map each image's (n, 6) detections from input pixels back to original pixels (undo letterbox)."""
        return [
            torch.cat([boxes_to_original(found[:, :4], scale, pad, size), found[:, 4:]], dim=1)
            for found, scale, pad, size in zip(
                detections, batch["scales"], batch["pads"], batch["orig_sizes"], strict=True
            )
        ]

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate", "test"):
            self.evaluator = self._make_evaluator(stage)
        image_size = getattr(self.trainer.datamodule, "image_size", None)
        if image_size is not None:
            # One input image: Lightning's model summary runs it to count the FLOPs at the data's size.
            self.example_input_array = torch.zeros(1, 3, image_size, image_size)

    def _make_evaluator(self, stage: str) -> COCOEvaluator | None:
        datamodule = self.trainer.datamodule
        annotation_file = None
        if datamodule is not None and hasattr(datamodule, "annotation_file"):
            annotation_file = datamodule.annotation_file(stage)
        if annotation_file is None:
            rank_zero_warn(
                f"DetectionModule: no annotation file for '{stage}', so no COCO metrics are computed"
            )
            return None
        category_ids = getattr(datamodule, "category_ids", None) or self.category_ids
        return COCOEvaluator(annotation_file, category_ids, per_class=True, curves=True, confusion=True)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.evaluator is not None:
            detections = self.detections_to_original(self.predict_batch(batch["images"]), batch)
            self.evaluator.update(batch["image_ids"], detections)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self._log_coco_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_coco_metrics("test")

    def _log_coco_metrics(self, prefix: str) -> None:
        """Compute the epoch's COCO metrics (collective under DDP: every rank gets them all), log them and
        reset the metric for the next epoch."""
        if self.evaluator is None:
            return
        try:
            self.coco_metrics = self.evaluator.compute()
        finally:
            self.evaluator.reset()
        for stat in COCO_STATS:
            # Identical on every rank already: the sync (a mean of equal values) only tells Lightning so.
            value = float(self.coco_metrics[stat.key])
            self.log(f"{prefix}/{stat.logged}", value, prog_bar=stat.key in ("map", "map_50"), sync_dist=True)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per image: {"image_id", "path", "orig_size" (h, w), "detections" (n, 6): x1, y1, x2, y2 in
        original pixels, score, class index}."""
        found = self.predict_batch(batch["images"], **self.predict_nms)
        originals = self.detections_to_original(found, batch)
        paths = batch.get("paths", [None] * len(originals))
        return [
            {
                "image_id": int(image_id),
                "path": path,
                "orig_size": tuple(size.tolist()),
                "detections": dets.cpu(),
            }
            for image_id, path, size, dets in zip(
                batch["image_ids"], paths, batch["orig_sizes"], originals, strict=True
            )
        ]
