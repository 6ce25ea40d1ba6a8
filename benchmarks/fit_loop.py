"""The cost of the fit loop: real ``Trainer.fit`` steps of the CLI's module against a bare training loop.

Usage: python benchmarks/fit_loop.py [--size 96] [--batch 8] [--steps 30] [--rounds 3] [--threads 2]

Both run the same YOLOv8n (default STA), at sizes where compute is small, on the same batches already in
memory (uint8 images and 4 random boxes each):
- fit: ``Trainer.fit`` of a ``DetectionModule`` (one optimizer step per batch, EMA callback, random states,
  the CLI's checkpoint IO and checkpoint callback, CSV logger, progress bar), on a datamodule that serves the
  prepared batches;
- bare: zero_grad, forward, ``YOLOv8Loss``, backward, clip_grad_norm_(10), the optimizer step and the EMA
  update, in a Python loop.
Per-step time is the wall time between consecutive batch starts, median over the steps after ``--warmup``;
the two run in alternating rounds and the medians of the rounds are compared. The host synchronisations of a
fit step are counted as the calls that read a tensor's value on the host (``item``, ``tolist``, ``bool``,
``float``, ``int``: each one stalls a GPU's queue) per step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from model import random_targets  # benchmarks/model.py
from torch.optim.swa_utils import AveragedModel

from sta_lightning.classes import Classes
from sta_lightning.models import DetectorConfig
from sta_lightning.plugins.checkpoint_io import LocalAtomicCheckpointIO
from sta_lightning.plugins.checkpointing import ResumableModelCheckpoint
from sta_lightning.training import DetectionModule
from sta_lightning.training.ema import EMAConfig, ModelEMA
from sta_lightning.training.optim import OptimizerConfig, WarmupConfig, build_optimizer

NUM_CLASSES = 5
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


def make_batches(count: int, batch: int, size: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
        batches.append({"images": images, **random_targets(batch, size, 4, NUM_CLASSES, generator)})
    return batches


def make_module() -> DetectionModule:
    """One optimizer step per batch (nominal batch = batch), no warmup."""
    torch.manual_seed(0)
    return DetectionModule(
        detector=DetectorConfig(scale="n", sta="default"),
        classes=Classes([str(i) for i in range(NUM_CLASSES)]),
        optimizer=OptimizerConfig(name="SGD", nominal_batch_size=1),
        warmup=WarmupConfig(epochs=0),
        ema=EMAConfig(tau=100.0),
    )


def first(items: list) -> dict[str, torch.Tensor]:
    return items[0]


class BatchData(L.LightningDataModule):
    """Serves prepared batches as they are (``DetectionData`` without annotations)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], image_size: int) -> None:
        super().__init__()
        self.batches, self.image_size = batches, image_size

    def annotation_file(self, stage: str) -> None:
        return None

    def set_epoch(self, epoch: int, max_epochs: int | None) -> None:
        pass

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        # One prepared batch per item; the loader's batch_size of 1 makes the module's total batch 1, which
        # with nominal_batch_size 1 is one optimizer step per batch and the weight decay unscaled.
        return torch.utils.data.DataLoader(self.batches, batch_size=1, shuffle=False, collate_fn=first)


@contextmanager
def counting_host_reads(counts: dict[str, int]) -> Iterator[None]:
    """Count the calls of the tensor methods that read a value on the host, in ``counts``."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name: str, original: Callable) -> Callable:
        def method(self, *args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return original(self, *args, **kwargs)

        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class StepClock(L.Callback):
    """Batch start times; host reads counted from batch ``warmup`` on."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.starts, self.counts = warmup, [], {}
        self._counting = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())
        if batch_idx == self.warmup:
            self._counting = counting_host_reads(self.counts)
            self._counting.__enter__()

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())
        if self._counting is not None:
            self._counting.__exit__(None, None, None)


def fit_round(batches: list, size: int, warmup: int) -> tuple[float, dict[str, int]]:
    """Median ms per fit step, and the host reads of the counted steps."""
    clock = StepClock(warmup)
    with tempfile.TemporaryDirectory() as folder:
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=CSVLogger(folder),
            callbacks=[clock, ResumableModelCheckpoint(dirpath=folder, save_last=True)],
            plugins=[LocalAtomicCheckpointIO()],
            enable_model_summary=False,
            log_every_n_steps=10,
            default_root_dir=folder,
        )
        trainer.fit(make_module(), datamodule=BatchData(batches, size))
    times = [b - a for a, b in zip(clock.starts[warmup:-1], clock.starts[warmup + 1 :], strict=True)]
    return 1e3 * statistics.median(times), clock.counts


def bare_round(batches: list, warmup: int) -> float:
    """Median ms per step of the same work in a plain loop."""
    module = make_module()
    model, loss = module.model.train(), module.loss
    optimizer = build_optimizer(model, module.optimizer_config)
    ema_rule = ModelEMA(module.ema_config.decay, module.ema_config.tau)
    ema = AveragedModel(model, multi_avg_fn=ema_rule._average, use_buffers=True)
    starts = []
    for batch in batches:
        starts.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        predictions = model(batch["images"].float() / 255)
        total, _ = loss(predictions, {key: batch[key] for key in ("batch_idx", "cls", "bboxes")})
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        ema.update_parameters(model)
    starts.append(time.perf_counter())
    times = [b - a for a, b in zip(starts[warmup:-1], starts[warmup + 1 :], strict=True)]
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (a multiple of 32)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="steps per round, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = make_batches(args.steps, args.batch, args.size)
    fit_ms, bare_ms, counts = [], [], {}
    for round_index in range(args.rounds):
        fit, counts = fit_round(batches, args.size, args.warmup)
        bare = bare_round(batches, args.warmup)
        fit_ms.append(fit)
        bare_ms.append(bare)
        print(f"round {round_index}: fit {fit:.1f} ms/step, bare {bare:.1f} ms/step", flush=True)
    counted_steps = args.steps - args.warmup
    reads = ", ".join(f"{name} {count / counted_steps:.1f}" for name, count in sorted(counts.items()))
    fit, bare = statistics.median(fit_ms), statistics.median(bare_ms)
    print(f"\nyolov8n + default STA, {args.size} px, batch {args.batch}, {args.threads} threads, CPU")
    print(
        f"median of {args.rounds} rounds ({counted_steps} timed steps each): "
        f"fit {fit:.1f} ms/step, bare {bare:.1f} ms/step"
    )
    print(f"fit / bare: {fit / bare:.3f}x")
    print(f"host reads per fit step: {reads or 'none'}")


if __name__ == "__main__":
    main()
