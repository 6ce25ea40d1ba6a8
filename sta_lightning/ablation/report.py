"""The summary of an ablation: per variant the mean and standard deviation of each result, and against the
baseline the paired differences of mAP and mAP50 with their intervals (``summary.json``, ``summary.md``),
the plot of mAP per seed (``summary.png``), and a W&B summary run."""

from __future__ import annotations

import json
import math
import statistics
import uuid
from pathlib import Path
from typing import Any

from sta_lightning.ablation.execution import COST, METRICS
from sta_lightning.ablation.plan import Ablation
from sta_lightning.ablation.statistics import paired_difference

COMPARED = ("mAP", "mAP50")  # the metrics compared with the baseline
SUMMARY_FILES = ("summary.json", "summary.md", "summary.png")


def summarize(
    ablation: Ablation, results: list[dict[str, Any]], confidence: float = 0.95, resamples: int = 10_000
) -> dict[str, Any]:
    """``summary.json``'s content: ``variants`` -> name -> ``n``, ``seeds``, ``mean``, ``std`` (per metric and
    cost column) and, except the baseline, ``paired_diff`` -> metric -> the ``PairedDifference`` fields over
    the seeds both have finished."""
    by_variant = {
        variant.name: {row["seed"]: row for row in results if row["variant"] == variant.name}
        for variant in ablation.variants
    }
    baseline = by_variant[ablation.baseline]
    variants: dict[str, Any] = {}
    for name, rows in by_variant.items():
        columns = {column: [float(row[column]) for row in rows.values()] for column in (*METRICS, *COST)}
        entry: dict[str, Any] = {
            "n": len(rows),
            "seeds": sorted(rows),
            "mean": {column: _mean(values) for column, values in columns.items()},
            "std": {column: _std(values) for column, values in columns.items()},
        }
        paired = sorted(set(rows) & set(baseline))
        if name != ablation.baseline:
            entry["paired_diff"] = {
                metric: paired_difference(
                    [rows[seed][metric] for seed in paired],
                    [baseline[seed][metric] for seed in paired],
                    confidence,
                    resamples,
                ).as_dict()
                if paired
                else None
                for metric in COMPARED
            }
        variants[name] = entry
    return {
        "name": ablation.name,
        "baseline": ablation.baseline,
        "confidence": confidence,
        "bootstrap_resamples": resamples,
        "runs": {"finished": len(results), "planned": len(ablation.runs())},
        "variants": variants,
    }


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _std(values: list[float]) -> float:
    """The sample standard deviation (n - 1); NaN below two values."""
    return statistics.stdev(values) if len(values) > 1 else math.nan


def markdown(summary: dict[str, Any]) -> str:
    """``summary.md``: the variants' means and standard deviations, then the paired differences."""
    level = round(summary["confidence"] * 100)
    lines = [
        f"# Ablation {summary['name']}",
        "",
        f"{summary['runs']['finished']} of {summary['runs']['planned']} runs finished. Mean ± standard "
        "deviation over seeds; params in millions, GFLOPs at the training size, training images per second, "
        "fit wall time in minutes.",
        "",
        "| variant | seeds | mAP | mAP50 | params M | GFLOPs | images/s | fit min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary["variants"].items():
        mean, std = entry["mean"], entry["std"]
        lines.append(
            f"| {name} | {entry['n']} | {_pm(mean['mAP'], std['mAP'])} | {_pm(mean['mAP50'], std['mAP50'])} "
            f"| {mean['params'] / 1e6:.3f} | {mean['gflops']:.2f} | {mean['images_per_second']:.1f} "
            f"| {mean['fit_seconds'] / 60:.1f} |"
        )
    lines += [
        "",
        f"Paired differences against **{summary['baseline']}** (same seed: variant - baseline), with "
        f"{level}% intervals by Student's t and by a paired bootstrap of "
        f"{summary['bootstrap_resamples']} resamples. "
        'The verdict is "better" or "worse" only when both intervals exclude 0.',
        "",
        "| variant | metric | pairs | mean difference | t interval | bootstrap interval | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary["variants"].items():
        for metric, diff in (entry.get("paired_diff") or {}).items():
            if diff is None:
                lines.append(f"| {name} | {metric} | 0 | | | | no finished pair |")
                continue
            lines.append(
                f"| {name} | {metric} | {diff['n']} | {diff['mean']:+.4f} "
                f"| [{diff['t_low']:+.4f}, {diff['t_high']:+.4f}] "
                f"| [{diff['boot_low']:+.4f}, {diff['boot_high']:+.4f}] | {diff['verdict']} |"
            )
    return "\n".join(lines) + "\n"


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def plot(ablation: Ablation, results: list[dict[str, Any]], path: Path) -> None:
    """mAP of each run: variants along x, one line per seed (the pairs the differences compare)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [variant.name for variant in ablation.variants]
    figure, axes = plt.subplots(figsize=(1.6 * len(names) + 3, 4))
    for seed in ablation.seeds:
        points = [(names.index(row["variant"]), row["mAP"]) for row in results if row["seed"] == seed]
        if points:
            x, y = zip(*sorted(points), strict=True)
            axes.plot(x, y, marker="o", label=f"seed {seed}")
    axes.set_xticks(range(len(names)), names)
    axes.set_ylabel("val mAP@[.5:.95]")
    axes.set_title(f"{ablation.name}: mAP per seed (baseline {ablation.baseline})")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_summary(
    ablation: Ablation, results: list[dict[str, Any]], confidence: float, resamples: int
) -> dict:
    """Write ``summary.json``, ``summary.md`` and ``summary.png`` into the ablation's folder; returns the
    summary."""
    summary = summarize(ablation, results, confidence, resamples)
    json_file, markdown_file, plot_file = (ablation.output / name for name in SUMMARY_FILES)
    json_file.write_text(json.dumps(summary, indent=1) + "\n")
    markdown_file.write_text(markdown(summary))
    plot(ablation, results, plot_file)
    return summary


def log_to_wandb(ablation: Ablation, results: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """One W&B run in the ablation's group: the results and paired differences as Tables, and the plot
    (offline when the ablation's W&B settings or the environment say so, as the runs)."""
    import wandb

    from sta_lightning.plugins.loggers import OfflineFallbackWandbLogger

    logger = OfflineFallbackWandbLogger(
        project=ablation.wandb.project,
        name=f"{ablation.name}/summary",
        group=ablation.name,
        tags=["ablation-summary"],
        job_type="ablation-summary",
        offline=ablation.wandb.offline,
        save_dir=str(ablation.output),
        id=uuid.uuid4().hex[:12],  # under SLURM the default would be the job's id, that of a run
    )
    columns = list(results[0]) if results else []
    differences = [
        [name, metric, *diff.values()]
        for name, entry in summary["variants"].items()
        for metric, diff in (entry.get("paired_diff") or {}).items()
        if diff is not None
    ]
    logger.experiment.log(
        {
            "ablation/results": wandb.Table(columns=columns, data=[list(row.values()) for row in results]),
            "ablation/paired_differences": wandb.Table(
                columns=[
                    "variant",
                    "metric",
                    "n",
                    "mean",
                    "t_low",
                    "t_high",
                    "boot_low",
                    "boot_high",
                    "verdict",
                ],
                data=differences,
            ),
            "ablation/mAP_per_seed": wandb.Image(str(ablation.output / SUMMARY_FILES[2])),
        }
    )
    logger.finalize("success")
