"""Base for callbacks that run a fixed set of validation images through the detector and log what they see.

During a validation run (every ``every_n_epochs`` training epochs, and always under ``trainer.validate``),
right after the first validation batch, global rank 0 alone takes the first ``num_images`` images of its
validation order (at most a batch: rect batches differ in shape) and runs them through the plain detector
``pl_module.model`` in eval mode under ``torch.no_grad``, then hands the results to ``log_samples``. Hooking
into the validation loop (rather than after it) means the detector holds the weights being validated: the EMA
weights when a ``WeightAveraging`` callback such as ``ModelEMA`` swaps them in for validation, whatever the
callback order. The forward bypasses the DDP wrapper and runs no collective, so the other ranks go on without
waiting for rank 0; the detector's train/eval mode is restored afterwards.
"""

import itertools

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from sta_lightning.training.module import DetectionModule, evaluation_mode


class ValidationSamplesCallback(Callback):
    """Every ``every_n_epochs`` epochs, ``log_samples`` for the first ``num_images`` validation images (at
    most one batch).

    For a ``sta_lightning.training.DetectionModule`` (its ``model`` is the ``YOLOv8``).
    """

    def __init__(self, num_images: int = 4, every_n_epochs: int = 1) -> None:
        if num_images < 1:
            raise ValueError(f"{type(self).__name__}: num_images must be >= 1, got {num_images}")
        if every_n_epochs < 1:
            raise ValueError(f"{type(self).__name__}: every_n_epochs must be >= 1, got {every_n_epochs}")
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self._samples: tuple[object, dict] | None = None  # (dataset, its collated first images)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: DetectionModule,
        outputs: object,
        batch: object,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        samples = self._validation_samples(trainer)
        with torch.no_grad(), evaluation_mode(pl_module.model):
            self.log_samples(trainer, pl_module, samples)

    def log_samples(self, trainer: Trainer, pl_module: DetectionModule, samples: dict) -> None:
        """Run ``samples`` (a collated batch, see ``sta_lightning.data``) through the detector; log it."""
        raise NotImplementedError

    def _validation_samples(self, trainer: Trainer) -> dict:
        """The first ``num_images`` images (at most a batch) in the order of this process's (first) validation
        loader as one collated CPU batch, built once per dataset (a later ``validate`` on other data gets its
        own)."""
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        if self._samples is None or self._samples[0] is not loader.dataset:
            indices = itertools.islice(loader.sampler, min(self.num_images, loader.batch_size))
            samples = loader.collate_fn([loader.dataset[i] for i in indices])
            self._samples = (loader.dataset, samples)
        return self._samples[1]
