"""``python -m sta_lightning ablate``: variants of a config over paired seeds, their results and paired
confidence intervals against a baseline (see docs/ablation.md)."""

from sta_lightning.ablation.plan import Ablation, Run, Variant  # noqa: F401
from sta_lightning.ablation.statistics import PairedDifference, paired_difference  # noqa: F401
