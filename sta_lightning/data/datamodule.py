"""COCODataModule: COCO-format detection data for Lightning (fit / validate / test / predict); DemoDataModule.

Determinism and resume: the training order of an epoch is a permutation drawn from (seed, epoch) by a
``DistributedSampler`` (one replica without DDP), and each sample's augmentation is drawn from (seed, epoch,
index) (``sample_seed``), where seed is the ``seed_everything`` seed (0 without one). No data randomness comes
from torch's global generator, a worker or a rank: the data of a fit is the same with any worker count, and
with N DDP processes of batch b each optimizer step sees the images that one process of batch N x b sees.
The training loader is torchdata's ``StatefulDataLoader``, whose position Lightning saves in checkpoints,
so a fit resumed from a mid-epoch checkpoint continues at the next batch. Workers are persistent (kept from
one epoch and one validation to the next): ``set_epoch`` writes the epoch and the mosaic switch (off for the
last ``close_mosaic`` epochs) into shared memory that the workers read for every sample.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from sta_lightning.data.coco import DataWarning, load_coco_index, read_categories
from sta_lightning.data.dataset import (
    CocoDetectionDataset,
    ImageFolderDataset,
    collate_detection,
    list_image_files,
)
from sta_lightning.data.transforms import TrainAugmentation

_EVAL_STAGES = {"fit": "val", "validate": "val", "test": "test"}

# torchdata 0.11 calls a torch function that torch >= 2.9 deprecates, once per loader iterator: not ours to
# fix, and it says nothing to the user.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", module=r"torchdata\.")


class COCODataModule(L.LightningDataModule):
    """COCO instances data: images folders + annotation json per split, or images alone for prediction.

    Args:
        train_images, train_annotations: training image folder and instances json (needed by ``fit``).
        val_images, val_annotations: validation split (needed by ``fit`` and ``validate``).
        test_images, test_annotations: test split; ``test`` uses the validation split when they are not given.
        predict_images: an image file, a folder of images, or a list of image files (needed by ``predict``);
            with ``predict_annotations``, the folder of that file's images.
        predict_annotations: a COCO json listing the images to predict (``images`` and ``categories``;
            ``annotations`` may be empty): the predictions carry its image and category ids and are in its
            pixel frame; listed images missing from the folder are skipped with a DataWarning.
        image_size: input size S (square, a multiple of 32).
        batch_size: images per batch and per device.
        num_workers: DataLoader processes; None picks min(8, CPU count).
        mosaic: probability of a 4-image mosaic per training sample.
        close_mosaic: no mosaic in the last this many epochs.
        degrees, translate, scale: affine rotation (+-degrees), translation (+-fraction of S), scale
            (factor U[1 - scale, 1 + scale]).
        hsv_h, hsv_s, hsv_v: colour jitter of hue (fraction of a turn), saturation and value (factor ranges).
        fliplr: horizontal flip probability.
        pin_memory: pin batches in page-locked memory (for GPU training).
        persistent_workers: keep the DataLoader workers from one epoch (and validation) to the next instead of
            starting them anew (with num_workers > 0).

    Category ids of any range (COCO's 1..90 with gaps) map to class indices 0..K-1 in sorted id order;
    ``num_classes``, ``class_names`` and ``category_ids`` are read from the val (else train, else test)
    json at construction, so LightningCLI can link them to the model.
    """

    def __init__(
        self,
        train_images: str | None = None,
        train_annotations: str | None = None,
        val_images: str | None = None,
        val_annotations: str | None = None,
        test_images: str | None = None,
        test_annotations: str | None = None,
        predict_images: str | list[str] | None = None,
        predict_annotations: str | None = None,
        image_size: int = 640,
        batch_size: int = 16,
        num_workers: int | None = None,
        mosaic: float = 1.0,
        close_mosaic: int = 10,
        degrees: float = 0.0,
        translate: float = 0.1,
        scale: float = 0.5,
        hsv_h: float = 0.015,
        hsv_s: float = 0.7,
        hsv_v: float = 0.4,
        fliplr: float = 0.5,
        pin_memory: bool = False,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        if image_size <= 0 or image_size % 32:
            raise ValueError(
                f"image_size must be a positive multiple of 32 (the largest stride), got {image_size}"
            )
        if bool(test_images) != bool(test_annotations):
            raise ValueError(
                "give test_images and test_annotations together (without both, 'test' evaluates the "
                f"validation split), got test_images={test_images!r}, test_annotations={test_annotations!r}"
            )
        self.save_hyperparameters()
        self.splits = {
            "train": (train_images, train_annotations),
            "val": (val_images, val_annotations),
            "test": (test_images, test_annotations) if test_annotations else (val_images, val_annotations),
        }
        self.predict_images = predict_images
        self.predict_annotations = predict_annotations
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        self.mosaic = mosaic
        self.close_mosaic = close_mosaic
        self.augmentation_args = dict(
            degrees=degrees,
            translate=translate,
            scale=scale,
            hsv_h=hsv_h,
            hsv_s=hsv_s,
            hsv_v=hsv_v,
            fliplr=fliplr,
        )
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.datasets: dict[str, CocoDetectionDataset | ImageFolderDataset] = {}
        self._categories = self._read_categories()

    def _read_categories(self) -> tuple[tuple[int, ...], tuple[str, ...]] | None:
        """(category ids, names) of the first annotation file given (val, train, test, predict), or None."""
        files = [self.splits[split][1] for split in ("val", "train", "test")] + [self.predict_annotations]
        for annotation_file in files:
            if annotation_file:
                return read_categories(annotation_file)
        return None

    def _require_categories(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        if self._categories is None:
            raise RuntimeError(
                "the classes are unknown: this datamodule was given no annotation file "
                "(set train_annotations or val_annotations)"
            )
        return self._categories

    @property
    def num_classes(self) -> int:
        return len(self._require_categories()[0])

    @property
    def class_names(self) -> list[str]:
        return list(self._require_categories()[1])

    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each contiguous class index."""
        return list(self._require_categories()[0])

    def annotation_file(self, stage: str = "validate") -> str | None:
        """The annotation json that evaluation of ``stage`` ('fit', 'validate' or 'test') reads."""
        return self.splits[_EVAL_STAGES[stage]][1]

    @property
    def data_seed(self) -> int:
        """The base seed of the data order and augmentation: the ``seed_everything`` seed, 0 without one."""
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def prepare_data(self) -> None:
        """Check every split's annotation file and images once per node (Lightning calls this on local rank
        0 only, before ``setup``), so that the ranks' ``setup`` read the cached index instead of each
        scanning the images."""
        for image_dir, annotation_file in dict.fromkeys(self.splits.values()):
            if image_dir and annotation_file:
                load_coco_index(annotation_file, image_dir, scan_workers=max(1, self.num_workers))

    def _load_split(self, split: str, stage: str) -> CocoDetectionDataset:
        images, annotations = self.splits[split]
        if not images or not annotations:
            needed = (
                "test_images and test_annotations (or val_images and val_annotations)"
                if split == "test"
                else f"{split}_images and {split}_annotations"
            )
            raise ValueError(f"'{stage}' needs {needed}")
        index = load_coco_index(annotations, images, scan_workers=max(1, self.num_workers))
        expected_ids, expected_names = self._require_categories()
        if index.category_ids != expected_ids:
            raise ValueError(
                f"{annotations}: its categories {list(index.category_ids)} differ from the ones the model "
                f"was built for {list(expected_ids)} (read from the first annotation file given)"
            )
        if index.class_names != expected_names:
            rank_zero_warn(
                f"{annotations}: the same category ids carry other names {list(index.class_names)} than in "
                f"the first annotation file given {list(expected_names)}; plots and tables use the latter",
                category=DataWarning,
            )
        if not len(index.boxes):
            rank_zero_warn(
                f"{annotations}: no object is annotated, so '{stage}' has nothing to learn from or to score "
                "(an image info file names images to predict: give it as predict_annotations)",
                category=DataWarning,
            )
        if split != "train":
            return CocoDetectionDataset(index, self.image_size)
        augmentation = TrainAugmentation(self.image_size, **self.augmentation_args)
        dataset = CocoDetectionDataset(index, self.image_size, augmentation, mosaic=self.mosaic)
        dataset.seed = self.data_seed
        return dataset

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.datasets["train"] = self._load_split("train", stage)
            if self.splits["val"][1]:
                self.datasets["val"] = self._load_split("val", stage)
        elif stage in ("validate", "test"):
            split = _EVAL_STAGES[stage]
            self.datasets[split] = self._load_split(split, stage)
        elif stage == "predict" and self.predict_annotations:
            self.datasets["predict"] = self._annotated_predict_images()
        elif stage == "predict":
            if not self.predict_images:
                raise ValueError("'predict' needs predict_images: an image file, a folder or a list of files")
            paths, bad = list_image_files(self.predict_images)
            if bad:
                examples = ", ".join(f"{path} ({reason})" for path, reason in bad[:5])
                rank_zero_warn(
                    f"{len(bad)} of {len(paths) + len(bad)} images to predict are missing, unreadable or "
                    f"corrupt and are skipped. First: {examples}",
                    category=DataWarning,
                )
            if not paths:
                raise ValueError(f"no readable image to predict in {self.predict_images}")
            self.datasets["predict"] = ImageFolderDataset(paths, self.image_size)

    def _annotated_predict_images(self) -> ImageFolderDataset:
        """The images of ``predict_annotations`` found in the ``predict_images`` folder, with their ids and
        frames (the scan warns about, and leaves out, missing or unreadable ones)."""
        if not isinstance(self.predict_images, str | os.PathLike):
            raise ValueError(
                "with predict_annotations, predict_images must be the folder of its images, got "
                f"{self.predict_images!r}"
            )
        index = load_coco_index(self.predict_annotations, self.predict_images, max(1, self.num_workers))
        if not len(index):
            raise ValueError(f"no image of {self.predict_annotations} is readable in {self.predict_images}")
        paths = [index.image_path(i) for i in range(len(index))]
        return ImageFolderDataset(
            paths, self.image_size, index.image_ids.tolist(), index.exif_oriented.tolist()
        )

    def set_epoch(self, epoch: int, max_epochs: int | None) -> None:
        """Each training epoch start: the epoch of the augmentation draws; mosaic off in the last
        ``close_mosaic`` epochs."""
        dataset = self.datasets.get("train")
        if dataset is None:
            return
        enabled = max_epochs is None or max_epochs < 0 or epoch < max_epochs - self.close_mosaic
        if dataset.mosaic_enabled and not enabled and self.mosaic > 0:
            rank_zero_info(f"Mosaic off from epoch {epoch} (the last {self.close_mosaic} epochs)")
        dataset.mosaic_enabled = enabled
        dataset.epoch = epoch

    def _dataset(self, split: str) -> CocoDetectionDataset | ImageFolderDataset:
        if split not in self.datasets:
            raise RuntimeError(f"the '{split}' data is not set up")
        return self.datasets[split]

    def _loader_args(self) -> dict:
        return dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_detection,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            pin_memory=self.pin_memory,
            # Worker seeds come from this generator instead of torch's global one, whose draws belong to the
            # model (drop path) and are restored on resume.
            generator=torch.Generator().manual_seed(self.data_seed),
        )

    def train_dataloader(self) -> StatefulDataLoader:
        """The training loader of the epoch the trainer is about to run, for this process.

        Lightning builds the first epoch's iterator (and forks its workers) before ``on_train_epoch_start``,
        so the epoch state is applied here too: the fit loop's count of processed epochs is the epoch to run,
        also when resuming (after a checkpoint at the end of epoch e it is e + 1; within epoch e, e).
        """
        if self.trainer is None:
            return self.training_loader(epoch=0)
        self.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed, self.trainer.max_epochs)
        return self.training_loader(
            self._dataset("train").epoch, world_size=self.trainer.world_size, rank=self.trainer.global_rank
        )

    def training_loader(self, epoch: int, world_size: int = 1, rank: int = 0) -> StatefulDataLoader:
        """Batches of ``epoch`` for process ``rank`` of ``world_size``: a permutation drawn from
        (seed, epoch), of which this process takes positions rank, rank + world_size, ...
        (``DistributedSampler``)."""
        dataset = self._dataset("train")
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.data_seed
        )
        sampler.set_epoch(epoch)
        return StatefulDataLoader(dataset, sampler=sampler, **self._loader_args())

    def _evaluation_loader(self, split: str) -> DataLoader:
        return DataLoader(self._dataset(split), shuffle=False, **self._loader_args())

    def val_dataloader(self) -> DataLoader | list:
        return self._evaluation_loader("val") if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._evaluation_loader("predict")


class DemoDataModule(COCODataModule):
    """The synthetic shapes of ``sta_lightning.data.demo`` under ``root``, generated by ``prepare_data``.

    Args:
        root: folder of the dataset (``train/``, ``val/``, ``annotations/``); generated when missing or made
            with other settings.
        num_train, num_val, seed: generator settings.
        image_size, batch_size, **kwargs: as for COCODataModule (its augmentation and loader arguments).

    The classes are fixed by the generator, so ``num_classes`` works before the files exist.
    """

    # The generator module is imported where it is used: importing it with the package would make
    # ``python -m sta_lightning.data.demo`` warn that the module was already imported before it ran.

    def __init__(
        self,
        root: str = "data/demo",
        num_train: int = 400,
        num_val: int = 100,
        seed: int = 0,
        image_size: int = 320,
        batch_size: int = 16,
        **kwargs,
    ) -> None:
        from sta_lightning.data import demo

        self.root = Path(root)
        self.generator_settings = dict(num_train=num_train, num_val=num_val, seed=seed)
        super().__init__(
            train_images=str(self.root / "train"),
            train_annotations=str(demo.annotation_path(self.root, "train")),
            val_images=str(self.root / "val"),
            val_annotations=str(demo.annotation_path(self.root, "val")),
            image_size=image_size,
            batch_size=batch_size,
            **kwargs,
        )

    def _read_categories(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        from sta_lightning.data import demo

        return demo.DEMO_CATEGORY_IDS, demo.DEMO_CLASS_NAMES

    def prepare_data(self) -> None:
        from sta_lightning.data import demo

        if not demo.demo_is_complete(self.root, **self.generator_settings):
            rank_zero_info(f"Generating the demo dataset in {self.root}")
            demo.generate_demo_dataset(self.root, **self.generator_settings)
        super().prepare_data()
