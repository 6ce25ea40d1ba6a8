"""An ablation emitted for a cluster: one shell command per run (``commands.txt``) and a SLURM array script
(``ablation.sbatch``) whose task i runs line i + 1. Every task writes into the ablation's folder."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from sta_lightning.ablation.plan import Ablation

COMMANDS_FILE = "commands.txt"
SLURM_FILE = "ablation.sbatch"


def run_commands(ablation: Ablation) -> list[str]:
    """Per run: ``cd`` to this directory (config paths are relative to it), then ``ablate --run``."""
    here, output = shlex.quote(str(Path.cwd())), shlex.quote(str(ablation.output.resolve()))
    python = shlex.quote(sys.executable)
    return [
        f"cd {here} && {python} -m sta_lightning ablate --output {output} --run {shlex.quote(run.key)}"
        for run in ablation.runs()
    ]


def slurm_script(ablation: Ablation, commands_file: Path, options: list[str]) -> str:
    """An array job of one task per line of ``commands_file``; ``options`` become ``#SBATCH`` lines (for
    example ``--gres=gpu:1``, ``--time=4:00:00``). Each task is one process that runs one fit."""
    output = ablation.output.resolve()
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={ablation.name}",
        f"#SBATCH --array=0-{len(ablation.runs()) - 1}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={output}/slurm/%A_%a.out",
        *(f"#SBATCH {option}" for option in options),
        "set -euo pipefail",
        f'command=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(commands_file.resolve()))})',
        'eval "$command"',
    ]
    return "\n".join(lines) + "\n"


def emit(ablation: Ablation, options: list[str]) -> tuple[Path, Path]:
    """Write ``commands.txt`` and ``ablation.sbatch`` into the ablation's folder; returns their paths."""
    (ablation.output / "slurm").mkdir(parents=True, exist_ok=True)
    commands_file, script_file = ablation.output / COMMANDS_FILE, ablation.output / SLURM_FILE
    commands_file.write_text("\n".join(run_commands(ablation)) + "\n")
    script_file.write_text(slurm_script(ablation, commands_file, options))
    return commands_file, script_file
