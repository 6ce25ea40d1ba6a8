"""DetectionModule: the YOLOv8 (+ STA) detector as a LightningModule, trained with the reference recipe.

The module keeps Lightning's hooks and delegates each job to its own room: the detector is built by
``models.build_detector``, the loss is ``models.YOLOv8Loss``, the optimizer and its per-iteration schedule
come from ``training.optim``, the manual optimisation step (accumulation, non-finite policy, clipping) is
``training.step``, the EMA is the ``training.ema`` callback and COCO evaluation is ``training.evaluation``.
Validation and checkpoints use the EMA weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from sta_lightning.classes import Classes
from sta_lightning.models import (
    PREDICT_NMS,
    AssignerConfig,
    DetectorConfig,
    LossGains,
    NMSConfig,
    YOLOv8Loss,
    build_detector,
    non_max_suppression,
)
from sta_lightning.models.loss import class_weights_from_counts
from sta_lightning.nn import PixelLayout, set_pixel_layout
from sta_lightning.plugins.random_state import RandomStateCheckpoint
from sta_lightning.plugins.requeue import SLURMRequeue
from sta_lightning.training.compile import CompileConfig
from sta_lightning.training.data_contract import DetectionData
from sta_lightning.training.ema import EMAConfig, ModelEMA
from sta_lightning.training.evaluation import COCOEvaluation, detections_to_original
from sta_lightning.training.multi_scale import resized_batch
from sta_lightning.training.optim import (
    GROUP_NAMES,
    OptimizerConfig,
    TrainingSchedule,
    WarmupConfig,
    apply_step_settings,
    build_optimizer,
    scaled_weight_decay,
    warmup_iterations,
)
from sta_lightning.training.step import GradientAccumulation, StepConfig

LOSS_NAMES = ("box_loss", "cls_loss", "dfl_loss")


@contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block and give it back its previous train/eval mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class DetectionModule(L.LightningModule):
    """YOLOv8 detector with optional STA blocks, trained with the YOLOv8 recipe and evaluated with COCO mAP.

    Args (one config group each; the fields are documented on their classes):
        detector: ``DetectorConfig``: scale, STA placements, frozen layers, pretrained weights.
        classes: ``Classes``: names and category ids (the CLI links them from the datamodule); None gives
            80 anonymous classes.
        optimizer: ``OptimizerConfig``: SGD or AdamW, lr0, lrf, decay schedule, momentum, weight decay,
            nominal batch size, STA lr scale.
        warmup: ``WarmupConfig``.
        ema: ``EMAConfig``: the averaged weights used by validation and checkpoints.
        loss: ``LossGains``; assigner: ``AssignerConfig``.
        step: ``StepConfig``: gradient clipping and the non-finite policy.
        nms: ``NMSConfig`` of validation and test; predict_nms: that of ``predict``.
        compile: ``CompileConfig``: the train step's forward through ``torch.compile``.
        channels_last: keep the detector's weights and inputs in the channels-last memory format (NHWC),
            which the GPU's convolution kernels (cuDNN, Tensor Cores) prefer; off by default until measured on
            a GPU (``benchmarks/gpu.py``). Numerically the same model.
        sta_pixel_layout: how the STA blocks run their pixel-level work (``StokenAttention``'s
            ``pixel_layout``): auto, rows, cells or triton (fused Triton kernels for CUDA, opt-in until
            measured on a GPU). The same function in each.

    The checkpoint's hyperparameters are what defines the trained model (detector, classes, the recipe);
    ``nms``, ``predict_nms``, ``compile``, ``channels_last`` and ``sta_pixel_layout`` are run settings, left
    out, so ``validate|test|predict --ckpt_path`` take them from the command line or config.
    """

    def __init__(
        self,
        detector: DetectorConfig = DetectorConfig(),
        classes: Classes | None = None,
        optimizer: OptimizerConfig = OptimizerConfig(),
        warmup: WarmupConfig = WarmupConfig(),
        ema: EMAConfig = EMAConfig(),
        loss: LossGains = LossGains(),
        assigner: AssignerConfig = AssignerConfig(),
        step: StepConfig = StepConfig(),
        nms: NMSConfig = NMSConfig(),
        predict_nms: NMSConfig = PREDICT_NMS,
        compile: CompileConfig = CompileConfig(),
        channels_last: bool = False,
        sta_pixel_layout: PixelLayout = "auto",
    ) -> None:
        super().__init__()
        # ``load_from_checkpoint`` passes the groups back as the plain dicts the checkpoint stores.
        detector, optimizer, warmup, ema, loss, assigner, step = (
            group if isinstance(group, kind) else kind(**group)
            for group, kind in (
                (detector, DetectorConfig),
                (optimizer, OptimizerConfig),
                (warmup, WarmupConfig),
                (ema, EMAConfig),
                (loss, LossGains),
                (assigner, AssignerConfig),
                (step, StepConfig),
            )
        )
        if isinstance(classes, dict):
            classes = Classes(**classes)
        classes = classes or Classes.anonymous(80)
        recipe = dict(optimizer=optimizer, warmup=warmup, ema=ema, loss=loss, assigner=assigner, step=step)
        self.save_hyperparameters(
            {
                "detector": detector.to_checkpoint(),
                "classes": asdict(classes),
                **{name: asdict(group) for name, group in recipe.items()},
            }
        )
        self.automatic_optimization = False
        self.classes = classes
        self.optimizer_config, self.warmup_config, self.ema_config = optimizer, warmup, ema
        self.nms, self.predict_nms, self.compile_config = nms, predict_nms, compile
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        built = build_detector(detector, classes.num_classes)
        self.model = set_pixel_layout(built.model, sta_pixel_layout).to(memory_format=self.memory_format)
        self.frozen_layers = built.frozen_layers
        self.pretrained_summary = built.pretrained_summary
        if self.pretrained_summary is not None:
            rank_zero_info(self.pretrained_summary)
        self.loss = YOLOv8Loss(classes.num_classes, self.model.reg_max, self.model.strides, loss, assigner)
        self.loss_config = loss
        self.accumulation = GradientAccumulation(step)
        self.evaluation = COCOEvaluation()
        self.schedule: TrainingSchedule | None = None
        # The compiled train-step forward, made at the first step: after the strategy's model changes
        # (SyncBatchNorm) and after the EMA callback copied this module, so the copy holds none. Kept out of
        # the module tree, so state dicts and checkpoints are unchanged.
        self._compiled_model: nn.Module | None = None

    def forward(self, images: Tensor) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """float images (B, 3, S, S) in [0, 1] -> the detector's output (see ``YOLOv8``)."""
        return self.model(images)

    def model_input(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, S, S) -> float [0, 1] in the parameters' dtype and memory format, on this module's
        device."""
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return images.to(self.dtype) / 255

    @property
    def data(self) -> DetectionData | None:
        """The trainer's datamodule when it is one the module knows (``DetectionData``), else None."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return datamodule if isinstance(datamodule, DetectionData) else None

    def _fitting(self) -> bool:
        return self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING

    def configure_callbacks(self) -> list[L.Callback]:
        """While fitting: the EMA, the random states in checkpoints and, under SLURM, the requeue on
        pre-emption (what an exact resume needs)."""
        if not self._fitting():
            return []
        callbacks: list[L.Callback] = [RandomStateCheckpoint()]
        if self.ema_config.enabled:
            callbacks.append(ModelEMA(self.ema_config.decay, self.ema_config.tau))
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
        frozen = [p for index in self.frozen_layers for p in self.model.layer(index).parameters()]
        return build_optimizer(self.model, self.optimizer_config, exclude=frozen)

    def train(self, mode: bool = True) -> DetectionModule:
        """Lightning's train/eval switch, except that frozen layers (``freeze``) always stay in eval mode."""
        super().train(mode)
        for index in self.frozen_layers:
            self.model.layer(index).eval()
        return self

    def on_train_start(self) -> None:
        trainer = self.trainer
        if trainer.max_epochs is None or trainer.max_epochs < 1:
            raise ValueError(
                "DetectionModule needs trainer.max_epochs >= 1: the lr schedule decays over the epochs"
            )
        total_batch_size = trainer.train_dataloader.batch_size * trainer.world_size
        self.schedule = TrainingSchedule(
            optimizer=self.optimizer_config,
            warmup=self.warmup_config,
            epochs=trainer.max_epochs,
            warmup_iters=warmup_iterations(self.warmup_config, trainer.num_training_batches),
            total_batch_size=total_batch_size,
        )
        optimizer = self.optimizer_config
        decay = scaled_weight_decay(optimizer.weight_decay, optimizer.nominal_batch_size, total_batch_size)
        for group in self.optimizers().optimizer.param_groups:
            if group["name"] == "weight":
                group["weight_decay"] = decay
        self.accumulation.restore_gradients(self)
        self._set_class_weights()

    def _set_class_weights(self) -> None:
        """The loss's class weights: the config's, or "auto" from the training split's object counts (told
        once, on global rank 0)."""
        weights = self.loss_config.class_weights
        if weights == "auto":
            if self.data is None:
                raise ValueError(
                    "model.loss.class_weights: auto needs the project's datamodule (class counts)"
                )
            counts = self.data.class_counts()
            weights = class_weights_from_counts(counts, self.loss_config.class_weight_power)
            listed = ", ".join(
                f"{name} {weight:.2f} ({count})"
                for name, weight, count in zip(self.classes.names, weights, counts, strict=True)
            )
            rank_zero_info(
                f"Class weights (auto, power {self.loss_config.class_weight_power}), as weight (objects): "
                + listed
            )
        self.loss.set_class_weights(weights, self.device)

    def on_train_epoch_start(self) -> None:
        if self.data is not None:
            self.data.set_epoch(self.current_epoch, self.trainer.max_epochs)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        iteration = batch_idx + self.trainer.num_training_batches * self.current_epoch
        settings = self.schedule.at(iteration, self.current_epoch)
        apply_step_settings(self.optimizers().optimizer, settings)

        images = self.model_input(batch["images"])
        targets = {key: batch[key] for key in ("batch_idx", "cls", "bboxes")}
        if self.data is not None and (size := self.data.input_size(iteration)) != images.shape[-1]:
            images, targets["bboxes"] = resized_batch(images, targets["bboxes"], size, self.memory_format)
        predictions = self._train_forward(images)
        total, items = self.loss(predictions, targets, all_processes=True)
        self.accumulation.step(self, total, iteration, settings.accumulate)

        batch_size = batch["images"].shape[0]
        losses = {f"train/{name}": value for name, value in zip(LOSS_NAMES, items, strict=True)}
        # Not in the progress bar: Lightning reads every progress-bar tensor on the host at every step (a
        # GPU synchronisation each); loggers read them every log_every_n_steps only.
        self.log_dict(losses, on_step=True, on_epoch=True, batch_size=batch_size, sync_dist=True)
        lrs = {f"lr/{name}": lr for name, lr in zip(GROUP_NAMES, settings.lrs, strict=True)}
        self.log_dict(lrs, on_step=True, on_epoch=False, batch_size=batch_size)
        return total.detach()

    def _train_forward(self, images: Tensor) -> list[Tensor]:
        """The detector's train-mode forward, compiled when ``compile.enabled``."""
        if not self.compile_config.enabled:
            return self.model(images)
        if self._compiled_model is None:
            self.__dict__["_compiled_model"] = self.compile_config.wrap(self.model)
        return self._compiled_model(images)

    def on_validation_model_zero_grad(self) -> None:
        """Keep the gradients summed since the last optimizer step (Lightning would free them before
        validating): accumulation runs across epoch ends, hence across validations."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.accumulation.clip_unscaled(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.pretrained_summary is not None:
            checkpoint["pretrained"] = self.pretrained_summary  # where the weights came from, for the record
        if self.data is not None:
            checkpoint["image_size"] = self.data.image_size  # the default input size of predict and export
        checkpoint["gradient_accumulation"] = self.accumulation.state_dict(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self._fitting():
            # validate/test/predict use the EMA weights of state_dict; the EMA and random-state callbacks
            # exist only in fit, so their states have no taker (Lightning would warn to add the callbacks).
            for fit_only in (ModelEMA(), RandomStateCheckpoint()):
                checkpoint.get("callbacks", {}).pop(fit_only.state_key, None)
        if "gradient_accumulation" in checkpoint:
            self.accumulation.load_state_dict(checkpoint["gradient_accumulation"])

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict_batch(self, images: Tensor, nms: NMSConfig | None = None) -> list[Tensor]:
        """Eval-mode forward + NMS (``nms``, default the validation one) of uint8 images (B, 3, S, S) with the
        current weights (the EMA ones during validation). Returns per image (n, 6): x1, y1, x2, y2 (input
        pixels), score, class index. The detector's train/eval mode is restored afterwards."""
        with evaluation_mode(self.model):
            decoded, _ = self.model(self.model_input(images))
        return non_max_suppression(decoded, **asdict(nms or self.nms))

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate", "test"):
            self.evaluation.setup(self.data, stage, self.classes)
        if self.data is not None:
            # One input image: Lightning's model summary runs it to count the FLOPs at the data's size.
            self.example_input_array = torch.zeros(1, 3, self.data.image_size, self.data.image_size)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.evaluation.evaluator is not None:
            self.evaluation.update(batch, self.predict_batch(batch["images"]))

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self.evaluation.log_epoch(self, "val")

    def on_test_epoch_end(self) -> None:
        self.evaluation.log_epoch(self, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per image: {"image_id", "path", "orig_size" (h, w), "detections" (n, 6): x1, y1, x2, y2 in
        original pixels, score, class index}."""
        originals = detections_to_original(self.predict_batch(batch["images"], self.predict_nms), batch)
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
