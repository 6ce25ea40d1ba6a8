"""sta_lightning.callbacks."""

from sta_lightning.callbacks.attention_maps import AttentionMapsCallback  # noqa: F401
from sta_lightning.callbacks.dataset_statistics import DatasetStatisticsCallback  # noqa: F401
from sta_lightning.callbacks.evaluation_plots import EvaluationPlotsCallback  # noqa: F401
from sta_lightning.callbacks.metric_table import COCOMetricTableCallback  # noqa: F401
from sta_lightning.callbacks.metrics_summary import FinalMetricsSummary  # noqa: F401
from sta_lightning.callbacks.prediction_images import PredictionImagesCallback  # noqa: F401
from sta_lightning.callbacks.prediction_writer import PredictionWriter  # noqa: F401
from sta_lightning.callbacks.save_config import WandbSaveConfigCallback  # noqa: F401
from sta_lightning.callbacks.throughput import TrainingThroughput  # noqa: F401
