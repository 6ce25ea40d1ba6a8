"""Paired differences of a metric between a variant and the baseline, with confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

Verdict = str  # "better", "worse" or "no difference shown"


@dataclass(frozen=True)
class PairedDifference:
    """Variant minus baseline over ``n`` paired seeds: their ``mean`` and two intervals of it at the same
    confidence, Student's t (``t_low``, ``t_high``; NaN for n < 2) and the percentile bootstrap
    (``boot_low``, ``boot_high``). ``verdict`` is "better" or "worse" only when both intervals exclude 0."""

    n: int
    mean: float
    t_low: float
    t_high: float
    boot_low: float
    boot_high: float
    verdict: Verdict

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def t_interval(differences: np.ndarray, confidence: float) -> tuple[float, float]:
    """Student's t interval of the mean of paired differences (that of ``scipy.stats.ttest_rel``)."""
    n = len(differences)
    if n < 2:
        return math.nan, math.nan
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * differences.std(ddof=1) / math.sqrt(n)
    mean = float(differences.mean())
    return mean - half, mean + half


def bootstrap_interval(
    differences: np.ndarray, confidence: float, resamples: int, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: ``resamples`` resamples of the pairs with replacement,
    drawn from ``numpy.random.default_rng(seed)`` (the draws of ``scipy.stats.bootstrap`` with that rng)."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(differences), (resamples, len(differences)))
    means = differences[indices].mean(axis=-1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def verdict(intervals: Sequence[tuple[float, float]]) -> Verdict:
    """ "better" when every interval lies above 0, "worse" when every one lies below, else
    "no difference shown" (an interval contains 0, or is undefined)."""
    if all(low > 0 for low, _ in intervals):
        return "better"
    if all(high < 0 for _, high in intervals):
        return "worse"
    return "no difference shown"


def paired_difference(
    variant: Sequence[float],
    baseline: Sequence[float],
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
    """The difference ``variant - baseline`` of values paired by position (the same seed)."""
    if len(variant) != len(baseline) or not variant:
        raise ValueError(f"paired values need equal, non-zero lengths: {len(variant)} and {len(baseline)}")
    differences = np.asarray(variant, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    t_low, t_high = t_interval(differences, confidence)
    boot_low, boot_high = bootstrap_interval(differences, confidence, resamples, seed)
    return PairedDifference(
        n=len(differences),
        mean=float(differences.mean()),
        t_low=t_low,
        t_high=t_high,
        boot_low=boot_low,
        boot_high=boot_high,
        verdict=verdict([(t_low, t_high), (boot_low, boot_high)]),
    )
