"""Plot the learning curves of a run from its CSVLogger ``metrics.csv``: train losses and val mAP per epoch.

python scripts/plot_learning_curves.py runs/demo/version_0/metrics.csv -o docs/demo_learning_curves.png
"""

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

LOSSES = ("box_loss", "cls_loss", "dfl_loss")
MAPS = ("mAP50", "mAP75", "mAP")


def read_epoch_metrics(path: Path) -> dict[str, dict[int, float]]:
    """metric name -> {epoch: value} for the epoch-level train losses and the val metrics in ``path``."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            if not row["epoch"]:  # rows logged outside an epoch (the dataset statistics at the start)
                continue
            epoch = int(row["epoch"])
            for name in LOSSES:
                if row.get(f"train/{name}_epoch"):
                    series[name][epoch] = float(row[f"train/{name}_epoch"])
            for name in MAPS:
                if row.get(f"val/{name}"):
                    series[name][epoch] = float(row[f"val/{name}"])
    if not any(series.get(name) for name in LOSSES + MAPS):
        raise ValueError(f"{path}: no train/*_loss_epoch or val/mAP* columns with values")
    return series


def plot(series: dict[str, dict[int, float]], output: Path, title: str) -> None:
    figure, (losses, maps) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    for name in LOSSES:
        epochs = sorted(series.get(name, {}))
        losses.plot([e + 1 for e in epochs], [series[name][e] for e in epochs], label=name)
    losses.set(xlabel="epoch", ylabel="train loss (gain-scaled)", title="training losses")
    for name in MAPS:
        epochs = sorted(series.get(name, {}))
        maps.plot([e + 1 for e in epochs], [series[name][e] for e in epochs], "o-", label=f"val {name}")
    maps.set(xlabel="epoch", ylabel="COCO metric", ylim=(0, 1), title="validation (EMA weights)")
    for axes in (losses, maps):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics_csv", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=Path("learning_curves.png"))
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    plot(read_epoch_metrics(args.metrics_csv), args.output, args.title)


if __name__ == "__main__":
    main()
