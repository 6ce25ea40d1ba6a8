"""An ablation (its base configs, variants, seeds and folder) and the runs it consists of.

The folder holds ``ablation.json`` (this plan, so that a rerun or a cluster task needs only the folder) and
one folder per run, ``runs/<variant>/seed-<seed>``, with the fit's ``checkpoints/last.ckpt``, its logs and,
once validated, ``result.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

PLAN_FILE = "ablation.json"
RESULT_FILE = "result.json"

RunState = Literal["finished", "killed", "new"]


@dataclass(frozen=True)
class Variant:
    """A variant: ``config`` (a YAML file merged after the base configs) or the base unchanged (None)."""

    name: str
    config: str | None = None

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``NAME=PATH`` or ``NAME=`` (the base unchanged)."""
        name, sep, path = text.partition("=")
        if not sep or not name or "/" in name:
            raise ValueError(f"--variant {text!r}: expected NAME=PATH or NAME= (a name without '/')")
        if path and not Path(path).is_file():
            raise ValueError(f"--variant {text!r}: the config file {path} does not exist")
        return cls(name, path or None)


@dataclass(frozen=True)
class WandbSettings:
    """Where the runs and the summary go in W&B: ``project`` (None: no W&B), ``offline`` as the loggers."""

    project: str | None = "sta-lightning"
    offline: bool = True


@dataclass(frozen=True)
class Ablation:
    """``variants`` of the ``configs`` (merged in order), each fitted once per seed with the same
    ``overrides`` (CLI arguments of ``fit``); ``baseline`` names the variant the others are compared with;
    ``name`` is the W&B group."""

    name: str
    configs: tuple[str, ...]
    variants: tuple[Variant, ...]
    baseline: str
    seeds: tuple[int, ...]
    output: Path
    overrides: tuple[str, ...] = ()
    wandb: WandbSettings = field(default_factory=WandbSettings)

    def __post_init__(self) -> None:
        names = [variant.name for variant in self.variants]
        if not names:
            raise ValueError("an ablation needs at least one --variant")
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must differ: {names}")
        if self.baseline not in names:
            raise ValueError(f"--baseline {self.baseline!r} is not one of the variants {names}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct and at least one: {list(self.seeds)}")

    def runs(self) -> list[Run]:
        """Every (variant, seed), seed by seed (so that an ablation stopped early has whole pairs), the
        variants of a seed in the given order."""
        return [Run(self.output, variant, seed) for seed in self.seeds for variant in self.variants]

    def run(self, key: str) -> Run:
        """The run named ``VARIANT:SEED``."""
        for run in self.runs():
            if run.key == key:
                return run
        raise ValueError(f"--run {key!r} is none of this ablation's runs: {[r.key for r in self.runs()]}")

    def save(self) -> None:
        """Write ``ablation.json`` into the output folder, atomically (cluster tasks may write it at once)."""
        self.output.mkdir(parents=True, exist_ok=True)
        content = asdict(self)
        content["output"] = str(self.output)
        temporary = self.output / f".{PLAN_FILE}.{os.getpid()}"
        temporary.write_text(json.dumps(content, indent=1) + "\n")
        temporary.replace(self.output / PLAN_FILE)

    @classmethod
    def load(cls, output: str | Path) -> Ablation:
        """The ablation saved in the folder ``output`` (the folder as given now, wherever it was first)."""
        path = Path(output) / PLAN_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {output} is not the folder of an ablation")
        content = json.loads(path.read_text())
        return cls(
            name=content["name"],
            configs=tuple(content["configs"]),
            variants=tuple(Variant(**variant) for variant in content["variants"]),
            baseline=content["baseline"],
            seeds=tuple(content["seeds"]),
            output=Path(output),
            overrides=tuple(content["overrides"]),
            wandb=WandbSettings(**content["wandb"]),
        )

    def differences(self, other: Ablation) -> list[str]:
        """The fields in which ``other`` differs from this plan (the output folder aside)."""
        mine, theirs = asdict(self), asdict(other)
        return [key for key in mine if key != "output" and mine[key] != theirs[key]]


@dataclass(frozen=True)
class Run:
    """One fit of an ablation: a variant at a seed, in ``<output>/runs/<variant>/seed-<seed>``."""

    output: Path
    variant: Variant
    seed: int

    @property
    def key(self) -> str:
        return f"{self.variant.name}:{self.seed}"

    @property
    def folder(self) -> Path:
        return self.output / "runs" / self.variant.name / f"seed-{self.seed}"

    @property
    def last_checkpoint(self) -> Path:
        return self.folder / "checkpoints" / "last.ckpt"

    @property
    def result_file(self) -> Path:
        return self.folder / RESULT_FILE

    def state(self) -> RunState:
        """``finished`` (validated: ``result.json``), ``killed`` (a ``last.ckpt`` to resume) or ``new``."""
        if self.result_file.is_file():
            return "finished"
        return "killed" if self.last_checkpoint.is_file() else "new"
