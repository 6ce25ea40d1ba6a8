"""``python -m sta_lightning ablate``: fit each variant at each seed, validate the final checkpoints, and
write ``results.csv`` and the paired summary (``summary.json``, ``summary.md``, ``summary.png``).

    python -m sta_lightning ablate --config BASE.yaml --variant plain=configs/ablation/plain.yaml \\
        --variant sta= --baseline plain --seeds 0 1 2 --output runs/ablation/demo -- --trainer.max_epochs 20

Everything after ``--`` goes to every fit. Rerunning skips finished runs and resumes killed ones from their
``last.ckpt``; ``--output DIR`` alone continues the ablation saved there. ``--emit`` writes one command per
run and a SLURM array script instead of running; ``--summarize DIR`` rebuilds the results and summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sta_lightning.ablation import cluster
from sta_lightning.ablation.execution import execute
from sta_lightning.ablation.plan import Ablation, Variant, WandbSettings
from sta_lightning.ablation.report import log_to_wandb, write_summary
from sta_lightning.ablation.results import finished_results, write_results


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sta_lightning ablate",
        description="Variants of a config over paired seeds: fits, results.csv and paired confidence "
        "intervals against a baseline. Arguments after -- go to every fit (for example -- "
        "--trainer.max_epochs 2).",
    )
    plan = parser.add_argument_group("the ablation (saved in OUTPUT/ablation.json)")
    plan.add_argument("--config", action="append", default=[], help="a base config; repeat to merge several")
    plan.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a variant: the YAML PATH merged after the base configs; NAME= runs the base unchanged",
    )
    plan.add_argument("--baseline", help="the variant the others are compared with (default: the first)")
    plan.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="the paired seeds (default 0 1 2)"
    )
    plan.add_argument("--output", type=Path, help="the ablation's folder")
    plan.add_argument("--name", help="the W&B group (default: the output folder's name)")
    plan.add_argument("--wandb-project", default="sta-lightning", help="W&B project of the runs and summary")
    plan.add_argument("--no-wandb", action="store_true", help="log the runs to CSV only")
    plan.add_argument("--wandb-online", action="store_true", help="log online (falls back to offline)")
    action = parser.add_argument_group("what to do (default: run every unfinished run here, then summarize)")
    action.add_argument(
        "--run", metavar="VARIANT:SEED", help="run only this one (a cluster task), no summary"
    )
    action.add_argument(
        "--emit", action="store_true", help="write commands.txt and ablation.sbatch, run nothing"
    )
    action.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="OPTION",
        help="an #SBATCH line for --emit, as --slurm=--gres=gpu:1 (repeat)",
    )
    action.add_argument("--summarize", type=Path, metavar="DIR", help="rebuild results and summary of DIR")
    summary = parser.add_argument_group("the summary")
    summary.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    summary.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    return parser


def ablation_from(arguments: argparse.Namespace, overrides: list[str]) -> Ablation:
    """The ablation the arguments describe, or the one saved in ``--output`` when they name no variant."""
    if not arguments.variant:
        return Ablation.load(arguments.output)
    if not arguments.config:
        raise ValueError("--config is required with --variant")
    variants = tuple(Variant.parse(text) for text in arguments.variant)
    ablation = Ablation(
        name=arguments.name or arguments.output.resolve().name,
        configs=tuple(arguments.config),
        variants=variants,
        baseline=arguments.baseline or variants[0].name,
        seeds=tuple(arguments.seeds),
        output=arguments.output,
        overrides=tuple(overrides),
        wandb=WandbSettings(
            project=None if arguments.no_wandb else arguments.wandb_project,
            offline=not arguments.wandb_online,
        ),
    )
    try:
        saved = Ablation.load(arguments.output)
    except FileNotFoundError:
        ablation.save()
        return ablation
    changed = saved.differences(ablation)
    if changed:
        raise ValueError(
            f"{arguments.output} holds an ablation that differs in {', '.join(changed)}: give another "
            f"--output, or the same arguments (or --output {arguments.output} alone) to continue it"
        )
    return saved


def write_outputs(ablation: Ablation, confidence: float, resamples: int) -> None:
    """Write results.csv and the summary of the finished runs, print it and log it to W&B."""
    results = finished_results(ablation)
    results_file = write_results(results, ablation.output)
    summary = write_summary(ablation, results, confidence, resamples)
    if ablation.wandb.project and results:
        log_to_wandb(ablation, results, summary)
    print((ablation.output / "summary.md").read_text())
    print(f"{results_file}, {ablation.output / 'summary.json'}, summary.md and summary.png written")


def run_all(ablation: Ablation, only: str | None) -> list[str]:
    """Run the unfinished runs (or only ``only``) one after another; returns the failures."""
    runs = [ablation.run(only)] if only else ablation.runs()
    failures = []
    for number, run in enumerate(runs, start=1):
        state = run.state()
        step = f"[{number}/{len(runs)}] {run.key}"
        if state == "finished":
            print(f"{step}: finished earlier, skipped", flush=True)
            continue
        print(
            f"{step}: {'resuming from ' + str(run.last_checkpoint) if state == 'killed' else 'fit'}",
            flush=True,
        )
        try:
            result = execute(ablation, run)
        except RuntimeError as failure:
            print(f"{step}: {failure}", file=sys.stderr, flush=True)
            failures.append(str(failure))
            continue
        print(f"{step}: mAP {result['mAP']:.4f}  mAP50 {result['mAP50']:.4f}", flush=True)
    return failures


def main(args: list[str] | None = None) -> None:
    given = list(sys.argv[1:] if args is None else args)
    split = given.index("--") if "--" in given else len(given)
    command_parser = parser()
    arguments = command_parser.parse_args(given[:split])
    overrides = given[split + 1 :]
    try:
        if arguments.summarize:
            write_outputs(Ablation.load(arguments.summarize), arguments.confidence, arguments.resamples)
            return
        if arguments.output is None:
            command_parser.error("--output is required (or --summarize DIR)")
        ablation = ablation_from(arguments, overrides)
        if arguments.run:
            ablation.run(arguments.run)  # a key of this ablation
    except (ValueError, FileNotFoundError) as error:
        command_parser.error(str(error))
    if arguments.emit:
        commands_file, script_file = cluster.emit(ablation, arguments.slurm)
        print(
            f"{len(ablation.runs())} runs: one command per line in {commands_file}; SLURM array: sbatch "
            f"{script_file}\nwhen they are done: python -m sta_lightning ablate --summarize {ablation.output}"
        )
        return
    failures = run_all(ablation, arguments.run)
    if not arguments.run:
        write_outputs(ablation, arguments.confidence, arguments.resamples)
    if failures:
        sys.exit(
            f"{len(failures)} run(s) failed; rerun the same command to retry them:\n" + "\n".join(failures)
        )
