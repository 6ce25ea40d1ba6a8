"""COCODataModule: COCO-format detection data for Lightning (fit / validate / test / predict); DemoDataModule.

Determinism and resume: the training order of an epoch is a permutation drawn from (seed, epoch), which
``BatchSliceSampler`` cuts into global batches shared by the processes, and each sample's augmentation is
drawn from (seed, epoch, index) (``sample_seed``), where seed is the ``seed_everything`` seed (0 without one).
No data randomness comes from torch's global generator, a worker or a rank: the data of a fit is the same with
any worker count, and with N DDP processes of batch b each optimizer step sees the images that one process of
batch N x b sees. The training loader is torchdata's ``StatefulDataLoader``, whose position Lightning saves in
checkpoints, so a fit resumed from a mid-epoch checkpoint continues at the next batch. Workers are persistent
(kept from one epoch and one validation to the next): ``set_epoch`` writes the epoch and the mosaic switch
(off for the last ``close_mosaic`` epochs) into shared memory that the workers read for every sample.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from sta_lightning.classes import Classes
from sta_lightning.data import voc_format, yolo_format
from sta_lightning.data.coco_index import load_coco_index
from sta_lightning.data.coco_json import read_categories
from sta_lightning.data.config import (
    DEFAULT_IMAGE_SIZE,
    AugmentConfig,
    LoaderConfig,
    PredictSource,
    Split,
    plain,
)
from sta_lightning.data.dataset import (
    COCODetectionDataset,
    ImageFolderDataset,
    collate_detection,
    list_image_files,
)
from sta_lightning.data.errors import EXAMPLES_SHOWN, DataWarning, warn_data
from sta_lightning.data.order import BatchSliceSampler, rect_order, rect_shapes
from sta_lightning.data.transforms import TrainAugmentation
from sta_lightning.models.yolo import MAX_STRIDE, check_image_size

_EVAL_STAGES = {"fit": "val", "validate": "val", "test": "test"}
MULTI_SCALE_STREAM = 7  # the random stream of the multi-scale sizes (the samples' streams are 0-3)

# torchdata 0.11 calls a torch function that torch >= 2.9 deprecates, once per loader iterator: not ours to
# fix, and it says nothing to the user.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", module=r"torchdata\.")


@contextmanager
def data_warnings_on_rank_zero() -> Iterator[None]:
    """Within the block, ``DataWarning``s show on global rank 0 only (every rank reads the same data)."""
    with warnings.catch_warnings():
        if rank_zero_only.rank != 0:
            warnings.simplefilter("ignore", DataWarning)
        yield


class COCODataModule(L.LightningDataModule):
    """COCO instances data: an images folder and annotation json per split, or images alone for prediction.

    Args (one config group each, documented on their classes in ``sta_lightning.data.config``):
        train, val: ``Split`` (images folder, annotation json); ``fit`` needs train, ``validate`` val.
        test: ``Split``; ``test`` evaluates the val split when it is not given.
        predict: ``PredictSource``: images (file, folder or list), optionally with an annotation json; None:
            ``predict`` reads the test (else val) split, its images carrying their ids.
        image_size: input size S (square, a multiple of 32). None: 640, or with ``--ckpt_path`` the size the
            checkpoint was trained at (the CLI fills it in).
        loader: ``LoaderConfig``: batch size, workers, pinned memory, persistent workers.
        augment: ``AugmentConfig``: mosaic, affine, HSV and flip of training samples.

    Category ids of any range (COCO's 1..90 with gaps) map to class indices 0..K-1 in sorted id order;
    ``classes`` are read from the val (else train, else test, else predict) json at construction, so
    LightningCLI can link them to the model.
    """

    def __init__(
        self,
        train: Split | None = None,
        val: Split | None = None,
        test: Split | None = None,
        predict: PredictSource | None = None,
        image_size: int | None = None,
        loader: LoaderConfig = LoaderConfig(),
        augment: AugmentConfig = AugmentConfig(),
    ) -> None:
        super().__init__()
        self.image_size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
        check_image_size(self.image_size, owner="data.image_size")
        groups = dict(train=train, val=val, test=test, predict=predict, loader=loader, augment=augment)
        self.save_hyperparameters(
            {**{name: plain(group) for name, group in groups.items()}, "image_size": self.image_size}
        )
        self.splits: dict[str, Split | None] = {"train": train, "val": val, "test": test or val}
        self.predict = predict
        self.loader = loader
        self.num_workers = min(8, os.cpu_count() or 1) if loader.num_workers is None else loader.num_workers
        self.augment = augment
        self.datasets: dict[str, COCODetectionDataset | ImageFolderDataset] = {}
        self._classes = self._read_classes()

    def _read_classes(self) -> Classes | None:
        """The categories of the first annotation file given (val, train, test, predict), or None."""
        files = [
            split.annotations
            for split in (self.splits["val"], self.splits["train"], self.splits["test"])
            if split
        ]
        if self.predict is not None and self.predict.annotations:
            files.append(self.predict.annotations)
        if not files:
            return None
        category_ids, names = read_categories(files[0])
        return Classes(list(names), list(category_ids))

    @property
    def classes(self) -> Classes:
        """The classes of the data (RuntimeError when no annotation file was given)."""
        if self._classes is None:
            raise RuntimeError(
                "the classes are unknown: this datamodule was given no annotation file (set train or val)"
            )
        return self._classes

    def annotation_file(self, stage: str = "validate") -> str | None:
        """The annotation json that evaluation of ``stage`` ('fit', 'validate' or 'test') reads."""
        split = self.splits[_EVAL_STAGES[stage]]
        return split.annotations if split else None

    def input_size(self, iteration: int) -> int:
        """The square input size of training iteration ``iteration`` (counted over the epochs): S, or with
        ``augment.multi_scale`` U{[S/2, 3S/2 + 32)} floored to a multiple of 32 (the reference's draw), from
        (seed, iteration) alone."""
        size = self.image_size
        if not self.augment.multi_scale:
            return size
        seed = np.random.SeedSequence([self.data_seed % 2**63, iteration, MULTI_SCALE_STREAM])
        drawn = int(np.random.default_rng(seed).integers(size // 2, size * 3 // 2 + MAX_STRIDE))
        return max(drawn // MAX_STRIDE * MAX_STRIDE, MAX_STRIDE)

    def class_counts(self) -> np.ndarray:
        """(C,) int64: the objects of each class in the training split (set up for fit)."""
        dataset = self.datasets.get("train")
        if dataset is None:
            raise RuntimeError("class_counts needs the training split set up (setup('fit'))")
        return np.bincount(dataset.index.labels, minlength=self.classes.num_classes).astype(np.int64)

    @property
    def data_seed(self) -> int:
        """The base seed of the data order and augmentation: the ``seed_everything`` seed, 0 without one."""
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def prepare_data(self) -> None:
        """Check every split's annotation file and images once per node (Lightning calls this on local rank
        0 only, before ``setup``), so that the ranks' ``setup`` read the cached index instead of each
        scanning the images."""
        with data_warnings_on_rank_zero():
            for split in dict.fromkeys(split for split in self.splits.values() if split):
                load_coco_index(split.annotations, split.images, scan_workers=max(1, self.num_workers))

    def _load_split(self, name: str, stage: str) -> COCODetectionDataset:
        split = self.splits[name]
        if split is None:
            needed = "test (or val)" if name == "test" else name
            raise ValueError(f"'{stage}' needs the data's {needed} split (images and annotations)")
        index = load_coco_index(split.annotations, split.images, scan_workers=max(1, self.num_workers))
        expected = self.classes
        if list(index.category_ids) != expected.category_ids:
            raise ValueError(
                f"{split.annotations}: its categories {list(index.category_ids)} differ from the ones the "
                f"model was built for {expected.category_ids} (read from the first annotation file given)"
            )
        if list(index.class_names) != expected.names:
            warn_data(
                f"{split.annotations}: the same category ids carry other names {list(index.class_names)} "
                f"than in the first annotation file given {expected.names}; plots and tables use the latter"
            )
        if not len(index.boxes):
            warn_data(
                f"{split.annotations}: no object is annotated, so '{stage}' has nothing to learn from or to "
                "score (an image info file names images to predict: give it as predict.annotations)"
            )
        if name != "train":
            return COCODetectionDataset(index, self.image_size)
        if self.augment.copy_paste > 0:
            index.warn_missing_polygons()
        augmentation = TrainAugmentation(self.image_size, self.augment)
        dataset = COCODetectionDataset(
            index,
            self.image_size,
            augmentation,
            mosaic=self.augment.mosaic,
            mixup=self.augment.mixup,
            mosaic_group=self.augment.mosaic_group,
            cache=self.loader.cache,
            reduced_decoding=self.loader.reduced_decoding,
        )
        if dataset.cache is not None:
            rank_zero_info(
                f"Image cache: {len(index)} images of {index.image_dir} at {self.image_size} px in "
                f"{dataset.cache.nbytes / 2**20:.1f} MiB of shared memory"
            )
        dataset.seed = self.data_seed
        return dataset

    def setup(self, stage: str) -> None:
        with data_warnings_on_rank_zero():
            if stage == "fit":
                self.datasets["train"] = self._load_split("train", stage)
                if self.splits["val"]:
                    self.datasets["val"] = self._load_split("val", stage)
            elif stage in ("validate", "test"):
                split = _EVAL_STAGES[stage]
                self.datasets[split] = self._load_split(split, stage)
            elif stage == "predict":
                self.datasets["predict"] = self._predict_images()

    def _predict_images(self) -> ImageFolderDataset:
        """The images of ``predict``; without it, those of the test (else val) split with its ids."""
        test = self.splits["test"]
        source = self.predict or (PredictSource(test.images, test.annotations) if test else None)
        if source is None:
            raise ValueError(
                "'predict' needs data.predict.images (an image file, a folder or a list of files) or a test "
                "or val split"
            )
        if source.annotations:
            return self._annotated_predict_images(source)
        paths, bad = list_image_files(source.images)
        if bad:
            examples = ", ".join(f"{path} ({reason})" for path, reason in bad[:EXAMPLES_SHOWN])
            warn_data(
                f"{len(bad)} of {len(paths) + len(bad)} images to predict are missing, unreadable or corrupt "
                f"and are skipped. First: {examples}"
            )
        if not paths:
            raise ValueError(f"no readable image to predict in {source.images}")
        return ImageFolderDataset(paths, self.image_size)

    def _annotated_predict_images(self, source: PredictSource) -> ImageFolderDataset:
        """The images of ``predict.annotations`` found in the ``predict.images`` folder, with their ids and
        frames (the scan warns about, and leaves out, missing or unreadable ones)."""
        images, annotations = source.images, source.annotations
        if not isinstance(images, str | os.PathLike):
            raise ValueError(
                f"with predict.annotations, predict.images must be the folder of its images, got {images!r}"
            )
        index = load_coco_index(annotations, images, max(1, self.num_workers))
        if not len(index):
            raise ValueError(f"no image of {annotations} is readable in {images}")
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
        close_mosaic = self.augment.close_mosaic
        enabled = max_epochs is None or max_epochs < 0 or epoch < max_epochs - close_mosaic
        if dataset.mosaic_enabled and not enabled and self.augment.mosaic > 0:
            rank_zero_info(f"Mosaic off from epoch {epoch} (the last {close_mosaic} epochs)")
        dataset.mosaic_enabled = enabled
        dataset.epoch = epoch

    def _dataset(self, split: str) -> COCODetectionDataset | ImageFolderDataset:
        if split not in self.datasets:
            raise RuntimeError(f"the '{split}' data is not set up")
        return self.datasets[split]

    def _loader_args(self) -> dict:
        return dict(
            batch_size=self.loader.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_detection,
            persistent_workers=self.loader.persistent_workers and self.num_workers > 0,
            pin_memory=self.loader.pin_memory,
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
        """Batches of ``epoch`` for process ``rank`` of ``world_size``: slice ``rank`` of each global batch
        of the permutation drawn from (seed, epoch) (``BatchSliceSampler``)."""
        dataset = self._dataset("train")
        sampler = BatchSliceSampler(
            dataset, self.loader.batch_size, self.data_seed, world_size=world_size, rank=rank
        )
        sampler.set_epoch(epoch)
        return StatefulDataLoader(dataset, sampler=sampler, **self._loader_args())

    def _evaluation_loader(self, split: str) -> DataLoader:
        """The loader of an evaluation split; with ``loader.rect``, rect batches: the images by aspect ratio
        (``rect_order``), each global batch (batch size x processes) letterboxed to its own shape
        (``rect_shapes``), process r taking slice r of it (``BatchSliceSampler``)."""
        dataset = self._dataset(split)
        if not (self.loader.rect and isinstance(dataset, COCODetectionDataset)):
            return DataLoader(dataset, shuffle=False, **self._loader_args())
        trainer = self.trainer
        world_size, rank = (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)
        sizes = dataset.index.sizes
        order = rect_order(sizes, dataset.index.file_names)
        batch_size = self.loader.batch_size
        dataset.letterbox_shapes = rect_shapes(sizes, order, batch_size * world_size, self.image_size)
        sampler = BatchSliceSampler(dataset, batch_size, world_size=world_size, rank=rank, order=order)
        return DataLoader(dataset, sampler=sampler, **self._loader_args())

    def val_dataloader(self) -> DataLoader | list:
        return self._evaluation_loader("val") if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._evaluation_loader("predict")


DEMO_IMAGE_SIZE = 320


class DemoDataModule(COCODataModule):
    """The synthetic shapes of ``sta_lightning.data.demo`` under ``root``, generated by ``prepare_data``.

    Args:
        root: folder of the dataset (``train/``, ``val/``, ``annotations/``); generated when missing or made
            with other settings.
        num_train, num_val, seed: generator settings.
        image_size: input size S; None: 320, or with ``--ckpt_path`` the checkpoint's training size.
        loader, augment: as for COCODataModule.

    The classes are fixed by the generator, so ``classes`` works before the files exist.
    """

    # The generator module is imported where it is used: importing it with the package would make
    # ``python -m sta_lightning.data.demo`` warn that the module was already imported before it ran.

    def __init__(
        self,
        root: str = "data/demo",
        num_train: int = 400,
        num_val: int = 100,
        seed: int = 0,
        image_size: int | None = None,
        loader: LoaderConfig = LoaderConfig(),
        augment: AugmentConfig = AugmentConfig(),
    ) -> None:
        from sta_lightning.data import demo

        self.root = Path(root)
        self.generator_settings = dict(num_train=num_train, num_val=num_val, seed=seed)
        splits = {
            name: Split(str(self.root / name), str(demo.annotation_path(self.root, name)))
            for name in ("train", "val")
        }
        size = DEMO_IMAGE_SIZE if image_size is None else image_size
        super().__init__(**splits, image_size=size, loader=loader, augment=augment)

    def _read_classes(self) -> Classes:
        from sta_lightning.data import demo

        return Classes(list(demo.DEMO_CLASS_NAMES), list(demo.DEMO_CATEGORY_IDS))

    def prepare_data(self) -> None:
        from sta_lightning.data import demo

        if not demo.demo_is_complete(self.root, **self.generator_settings):
            rank_zero_info(f"Generating the demo dataset in {self.root}")
            demo.generate_demo_dataset(self.root, **self.generator_settings)
        super().prepare_data()


class YOLODataModule(COCODataModule):
    """A YOLO-format dataset (``data.yaml``, images and ``labels/*.txt``), read as the reference reads it
    (``sta_lightning.data.yolo_format``).

    Args:
        data_yaml: the dataset's data.yaml; its train / val / test splits become this datamodule's.
        predict, image_size, loader, augment: as for COCODataModule.

    At construction each split is converted to a COCO instances json (category ids 0..K-1, the class
    indices; ``yolo_format.cached_coco_json``); the conversion's skips are reported once, when it is
    written. Loading, augmentation and evaluation are then COCODataModule's; ``predict`` without
    ``predict`` images reads the test (else val) split with its ids.
    """

    def __init__(
        self,
        data_yaml: str,
        predict: PredictSource | None = None,
        image_size: int | None = None,
        loader: LoaderConfig = LoaderConfig(),
        augment: AugmentConfig = AugmentConfig(),
    ) -> None:
        dataset = yolo_format.read_data_yaml(data_yaml)
        with data_warnings_on_rank_zero():
            annotations = {name: yolo_format.cached_coco_json(dataset, name) for name in dataset.splits}
        splits = {name: Split(str(dataset.root), str(path)) for name, path in annotations.items()}
        super().__init__(**splits, predict=predict, image_size=image_size, loader=loader, augment=augment)


class VOCDataModule(COCODataModule):
    """A Pascal VOC dataset (``Annotations/``, ``ImageSets/Main/``, ``JPEGImages/``), read by
    ``sta_lightning.data.voc_format``: difficult objects are crowd regions (ignored by evaluation).

    Args:
        root: the VOC root (for example ``VOCdevkit/VOC2007``).
        train_set, val_set, test_set: the image sets (``ImageSets/Main/<set>.txt``) of the splits; VOC2007:
            trainval and test; VOC2012: train and val. None: no such split.
        names: the class names in index order; None: the 20 VOC classes when every object is one of them,
            else the names found, sorted.
        predict, image_size, loader, augment: as for COCODataModule.

    At construction each image set is converted to a COCO instances json (category ids 0..K-1;
    ``voc_format.cached_coco_json``); loading, augmentation and evaluation are then COCODataModule's.
    """

    def __init__(
        self,
        root: str,
        train_set: str | None = "train",
        val_set: str | None = "val",
        test_set: str | None = None,
        names: list[str] | None = None,
        predict: PredictSource | None = None,
        image_size: int | None = None,
        loader: LoaderConfig = LoaderConfig(),
        augment: AugmentConfig = AugmentConfig(),
    ) -> None:
        roles = {"train": train_set, "val": val_set, "test": test_set}
        chosen = [name for name in dict.fromkeys(roles.values()) if name]
        dataset = voc_format.read_voc(root, chosen, names)
        with data_warnings_on_rank_zero():
            annotations = {name: voc_format.cached_coco_json(dataset, name) for name in chosen}
        image_dir = str(dataset.image_dir)
        splits = {role: Split(image_dir, str(annotations[name])) for role, name in roles.items() if name}
        super().__init__(**splits, predict=predict, image_size=image_size, loader=loader, augment=augment)
