"""``--model.compile.enabled`` and ``--model.channels_last`` through ``python -m sta_lightning fit``'s CLI: a
tiny CPU fit runs its train step compiled (backend aot_eager: traced forward and backward, no code
generation) on channels-last weights and inputs, and its losses are those of the plain eager fit."""

import csv
from pathlib import Path

import pytest
import torch

from sta_lightning.cli import main

ARGS = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.max_epochs=1",
    "--trainer.limit_val_batches=0",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
    "--model.detector.scale=n",
    "--model.detector.sta=[{layer: 8, stoken_size: [1, 1], num_heads: 2}]",
    "--model.optimizer.nominal_batch_size=4",
    "--model.warmup.epochs=0",
    "--data=sta_lightning.data.DemoDataModule",
    "--data.num_train=8",
    "--data.num_val=2",
    "--data.image_size=64",
    "--data.loader.batch_size=4",
    "--data.loader.num_workers=0",
]


def step_losses(run: Path) -> list[float]:
    """The total (box + class + DFL) loss of each logged training step."""
    names = [f"train/{term}_loss_step" for term in ("box", "cls", "dfl")]
    with open(next(run.rglob("metrics.csv"))) as file:
        rows = [row for row in csv.DictReader(file) if row[names[0]]]
    return [sum(float(row[name]) for name in names) for row in rows]


@pytest.mark.slow
def test_compiled_channels_last_fit_through_the_cli_trains_like_the_eager_one(tmp_path):
    runs = {}
    for name, extra in {
        "eager": [],
        "compiled": [
            "--model.compile.enabled=true",
            "--model.compile.backend=aot_eager",
            "--model.channels_last=true",
        ],
    }.items():
        root = tmp_path / name
        logger = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}"]
        cli = main(
            [
                "fit",
                *ARGS,
                *extra,
                *logger,
                f"--data.root={tmp_path / 'demo'}",
                f"--trainer.default_root_dir={root}",
            ]
        )
        assert cli.model.compile_config.enabled == (name == "compiled")
        if name == "compiled":
            assert cli.model._compiled_model is not None  # the train step really went through torch.compile
            weight = cli.model.model.layer(0).conv.weight
            assert weight.is_contiguous(memory_format=torch.channels_last)
        runs[name] = step_losses(root)
    assert len(runs["eager"]) == 2
    # Same first loss; after one optimizer step the kernels' summation order (NHWC, traced graph) shows.
    assert runs["compiled"][0] == pytest.approx(runs["eager"][0], rel=1e-5)
    assert runs["compiled"][1] == pytest.approx(runs["eager"][1], rel=2e-3)
