"""The results of an ablation's finished runs: ``results.csv``, a row per run, from their ``result.json``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from sta_lightning.ablation.execution import COST, METRICS
from sta_lightning.ablation.plan import Ablation

RESULTS_FILE = "results.csv"
COLUMNS = ("variant", "seed", "checkpoint", *METRICS, *COST)


def finished_results(ablation: Ablation) -> list[dict[str, Any]]:
    """The ``result.json`` of every finished run, by variant (in the given order), then seed."""
    runs = sorted(ablation.runs(), key=lambda run: (ablation.variants.index(run.variant), run.seed))
    return [json.loads(run.result_file.read_text()) for run in runs if run.state() == "finished"]


def write_results(results: list[dict[str, Any]], folder: Path) -> Path:
    """Write ``results.csv`` (``COLUMNS``; ``checkpoint`` relative to ``folder``); returns its path."""
    path = folder / RESULTS_FILE
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    return path
