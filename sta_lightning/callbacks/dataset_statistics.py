"""At the start of a fit, statistics of each split's ground truth: instances per class, box width, height and
aspect-ratio histograms, images without boxes, crowd regions."""

from __future__ import annotations

from types import ModuleType

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.utilities import rank_zero_info

from sta_lightning.callbacks.chart_logging import log_chart
from sta_lightning.callbacks.charts import bar_chart, histograms_chart
from sta_lightning.data.datamodule import COCODataModule
from sta_lightning.data.dataset import COCODetectionDataset
from sta_lightning.data.statistics import (
    SplitStatistics,
    aspect_bins,
    histogram,
    size_bins,
    split_statistics,
)
from sta_lightning.training.module import DetectionModule

SUMMARY_COLUMNS = ["split", "images", "images_without_boxes", "boxes", "crowd_regions"]


class DatasetStatisticsCallback(Callback):
    """Ground-truth statistics of every split the datamodule set up for the fit, logged once by global rank 0
    under ``<key>/...``:

    - ``summary``: images, images without boxes, boxes and crowd regions per split (a table; also printed);
    - ``instances_per_class``: objects per class and split (bar chart);
    - ``box_sizes``: histograms of box width and height (pixels of the letterboxed input, 0 to the image
      size) and of the aspect ratio width / height (1/8 to 8, log scale) per split.

    W&B gets a table, a native bar chart and native histograms; TensorBoard the images; ``<run
    folder>/plots/`` PNG and CSV files. For a datamodule whose ``datasets`` hold ``COCODetectionDataset``s
    (``COCODataModule``, ``DemoDataModule``); crowd regions are counted apart, as evaluation ignores them.

    Args:
        key: logging key prefix.
    """

    def __init__(self, key: str = "data") -> None:
        self.key = key

    def on_fit_start(self, trainer: Trainer, pl_module: DetectionModule) -> None:
        if not trainer.is_global_zero:
            return
        names = pl_module.classes.names
        datamodule = trainer.datamodule
        datasets = datamodule.datasets if isinstance(datamodule, COCODataModule) else {}
        indexed = {
            split: dataset for split, dataset in datasets.items() if isinstance(dataset, COCODetectionDataset)
        }
        if not indexed:
            return
        statistics = {
            split: split_statistics(
                dataset.index.boxes,
                dataset.index.labels,
                dataset.index.box_starts,
                dataset.index.sizes,
                len(names),
                dataset.image_size,
                dataset.index.num_crowd,
            )
            for split, dataset in indexed.items()
        }
        image_size = max(dataset.image_size for dataset in indexed.values())
        self._log_summary(trainer, statistics)
        self._log_instances(trainer, statistics, names)
        self._log_box_sizes(trainer, statistics, image_size)

    def _log_summary(self, trainer: Trainer, statistics: dict[str, SplitStatistics]) -> None:
        key = f"{self.key}/summary"
        rows = [
            [split, s.num_images, s.images_without_boxes, s.num_boxes, s.num_crowd]
            for split, s in statistics.items()
        ]
        for split, images, empty, boxes, crowd in rows:
            rank_zero_info(
                f"Dataset {split}: {images} images ({empty} without boxes), {boxes} boxes, "
                f"{crowd} crowd regions"
            )
        log_chart(
            trainer,
            key,
            SUMMARY_COLUMNS,
            rows,
            wandb_values=lambda wandb: {key: wandb.Table(SUMMARY_COLUMNS, rows)},
        )

    def _log_instances(
        self, trainer: Trainer, statistics: dict[str, SplitStatistics], names: list[str]
    ) -> None:
        key = f"{self.key}/instances_per_class"
        series = {split: s.instances for split, s in statistics.items()}
        image = bar_chart(names, series, "objects", "Objects per class")
        rows = [[name, *(int(s.instances[k]) for s in statistics.values())] for k, name in enumerate(names)]

        def wandb_values(wandb: ModuleType) -> dict:
            cells = [
                [f"{split}/{name}", int(s.instances[k])]
                for split, s in statistics.items()
                for k, name in enumerate(names)
            ]
            table = wandb.Table(columns=["split/class", "objects"], data=cells)
            return {key: wandb.plot.bar(table, "split/class", "objects", title="Objects per class")}

        log_chart(trainer, key, ["class", *statistics], rows, image, wandb_values)

    def _log_box_sizes(
        self, trainer: Trainer, statistics: dict[str, SplitStatistics], image_size: int
    ) -> None:
        key = f"{self.key}/box_sizes"
        # name: (axis label, bin edges, values of a split, log-scale axis)
        quantities = {
            "width": ("box width (input pixels)", size_bins(image_size), lambda s: s.widths, False),
            "height": ("box height (input pixels)", size_bins(image_size), lambda s: s.heights, False),
            "aspect": ("width / height", aspect_bins(), lambda s: s.aspect_ratios, True),
        }
        counts = {
            name: {split: histogram(values(s), edges) for split, s in statistics.items()}
            for name, (_, edges, values, _) in quantities.items()
        }
        panels = [
            (label, edges, counts[name], log_x) for name, (label, edges, _, log_x) in quantities.items()
        ]
        image = histograms_chart(panels, "Ground-truth boxes")
        rows = []
        for name, (_, edges, _, _) in quantities.items():
            for b in range(len(edges) - 1):
                rows.append(
                    [name, edges[b], edges[b + 1], *(int(counts[name][split][b]) for split in statistics)]
                )

        def wandb_values(wandb: ModuleType) -> dict:
            return {
                f"{key}/{split}/{name}": wandb.Histogram(np_histogram=(counts[name][split], edges))
                for name, (_, edges, _, _) in quantities.items()
                for split in statistics
            }

        log_chart(trainer, key, ["quantity", "bin_start", "bin_end", *statistics], rows, image, wandb_values)
