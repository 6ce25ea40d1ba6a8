"""Exact resume on a GPU with deterministic kernels, as tests/test_resume.py checks it on CPUs.

Run: ``python benchmarks/gpu_check/resume.py --work DIR [--precision 16-mixed]`` (CUDA; about a minute)
     ``--dry-run``: the same on the CPU.

Two fits of configs/demo.yaml's recipe (AdamW, a 1-epoch warmup that ramps the accumulation) start together
on 12 demo images at 64 px, batches of 4 with a nominal batch of 8 (an accumulation open at epoch ends), EMA
tau 5, 4 epochs validated and checkpointed every epoch, close_mosaic 1 (the switch after the kill), drop
path 0.3 in the STA blocks (the model draws from torch's generator), ``--trainer.deterministic true``
(Lightning then calls ``torch.use_deterministic_algorithms(True)``; CUBLAS_WORKSPACE_CONFIG=:4096:8 is set
here too) and the given precision (16-mixed: the GradScaler state must resume too). One runs through; the
other is killed with SIGKILL when batch 1 of epoch 2 starts (tests/fault_injection.py's ``KillAt``, so
after the epoch-1 checkpoint) and is then resumed from its ``last.ckpt``. Both must end with the same epoch
and step, the same weights (EMA and raw), optimizer and mixed-precision state and final val metrics, bit for
bit: the script prints how many values differ and by how much. Exit status 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_utils import ROOT, demo_config, result, say  # noqa: E402

HERE = Path(__file__).resolve().parent
EPOCHS = 4
KILL = {"epoch": 2, "batch": 1}
DEMO = {"num_train": 12, "num_val": 4}
running: list[subprocess.Popen] = []


def fit_command(
    demo_root: Path,
    run_dir: Path,
    accelerator: str,
    precision: str,
    config: Path = ROOT / "configs" / "demo.yaml",
) -> list[str]:
    """The fit's command line (kept in one place: the model and data flags follow the config groups)."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir)}}
    sta = "[{layer: 6, stoken_size: [4, 4], drop_path: 0.3}, {layer: 8, stoken_size: [1, 1], drop_path: 0.3}]"
    return [
        sys.executable,
        "-m",
        "sta_lightning",
        "fit",
        f"--config={config}",
        f"--trainer.accelerator={accelerator}",
        "--trainer.devices=1",
        f"--trainer.precision={precision}",
        "--trainer.deterministic=true",
        f"--trainer.max_epochs={EPOCHS}",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger={json.dumps([logger])}",
        "--trainer.callbacks=[]",  # the demo's image and plot callbacks: slow, and not what is checked
        f"--checkpoint.dirpath={run_dir / 'checkpoints'}",
        f"--model.detector.sta={sta}",
        "--model.optimizer.nominal_batch_size=8",  # accumulate 2 batches of 4: steps in every epoch
        "--model.ema.tau=5",
        f"--data.init_args.root={demo_root}",
        f"--data.init_args.num_train={DEMO['num_train']}",
        f"--data.init_args.num_val={DEMO['num_val']}",
        "--data.init_args.image_size=64",
        "--data.init_args.loader.batch_size=4",
        "--data.init_args.loader.num_workers=0",
        "--data.init_args.augment.close_mosaic=1",
    ]


def kill_callback() -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": "fault_injection.KillAt", "init_args": KILL})


def start(command: list[str], run_dir: Path) -> tuple[subprocess.Popen, Path]:
    """Start a fit in its own session (``KillAt`` kills its whole process group), output to a log file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    environment = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8")
    environment.pop("WANDB_SERVICE", None)
    path = [str(ROOT / "tests"), str(HERE), str(ROOT), os.environ.get("PYTHONPATH")]
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    log = run_dir / f"fit-{len(list(run_dir.glob('fit-*.log')))}.log"
    with open(log, "w") as file:
        process = subprocess.Popen(
            command,
            cwd=run_dir,
            env=environment,
            stdout=file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running.append(process)
    return process, log


def finish(name: str, process: subprocess.Popen, log: Path, expected: int) -> bool:
    code = process.wait()
    running.remove(process)
    if code == expected:
        say(f"{name}: exit status {code} as expected")
        return True
    tail = log.read_text(errors="replace").splitlines()[-40:]
    say(f"{name}: exit status {code}, expected {expected}; last lines of {log}:")
    say("\n".join("    " + line for line in tail))
    return False


def stop_all(signum, frame) -> None:
    """On SIGTERM (the step's timeout), kill the fits' process groups too: they run in their own sessions."""
    for process in running:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def val_metrics(run_dir: Path) -> dict[str, float]:
    """The last epoch's val/* metrics of the newest CSV log in ``run_dir``."""
    logs = sorted(run_dir.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    with open(logs[-1]) as file:
        rows = [r for r in csv.DictReader(file) if r.get("val/mAP") and int(r["epoch"]) == EPOCHS - 1]
    return {key: float(value) for key, value in rows[-1].items() if key.startswith("val/")} if rows else {}


def leaves(state, prefix: str = "") -> dict[str, object]:
    """Every leaf (tensor, number, string...) of a nested checkpoint structure, by its path."""
    if isinstance(state, dict | list | tuple):
        items = state.items() if isinstance(state, dict) else enumerate(state)
        found: dict[str, object] = {}
        for key, value in items:
            found |= leaves(value, f"{prefix}/{key}" if prefix else str(key))
        return found
    return {prefix: state}


def same(x: object, y: object) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
    return x == y


def difference(x: object, y: object) -> float:
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape:
        return (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
    return float("nan")


def compare(expected_path: Path, resumed_path: Path) -> bool:
    """Epoch, step, weights (EMA and raw), optimizer and mixed-precision state of two checkpoints, exactly."""
    a = torch.load(expected_path, map_location="cpu", weights_only=True)
    b = torch.load(resumed_path, map_location="cpu", weights_only=True)
    ok = (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    say(
        f"epoch, step: uninterrupted {a['epoch']} {a['global_step']}, resumed {b['epoch']} {b['global_step']}"
    )
    for key in ("state_dict", "current_model_state", "optimizer_states", "MixedPrecision"):
        if key not in a and key not in b:
            continue
        left, right = leaves(a.get(key, {})), leaves(b.get(key, {}))
        differing = [name for name in left.keys() | right.keys() if not same(left.get(name), right.get(name))]
        largest = max((difference(left.get(n), right.get(n)) for n in differing), default=0.0)
        say(f"{key}: {len(left)} values, {len(differing)} differ (largest difference {largest:.3g})")
        if differing:
            say(f"    first differing: {sorted(differing)[:5]}")
        ok = ok and not differing
    return ok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, required=True, help="folder of the fits and their demo data")
    parser.add_argument("--precision", default="16-mixed", help="Lightning precision of the fits")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_check/resume.py needs a CUDA GPU; --dry-run runs on CPU")
    signal.signal(signal.SIGTERM, stop_all)
    accelerator = "cpu" if args.dry_run else "gpu"
    from demo_fit import prepare_demo

    work = args.work / "resume"
    prepare_demo(work / "demo", DEMO)
    uninterrupted_dir, killed_dir = work / "uninterrupted", work / "killed"
    begin = time.monotonic()
    config, _ = demo_config(work)  # its loggers are replaced by a CSV logger in any case
    command = fit_command(work / "demo", killed_dir, accelerator, args.precision, config)
    uninterrupted_command = fit_command(work / "demo", uninterrupted_dir, accelerator, args.precision, config)
    uninterrupted = start(uninterrupted_command, uninterrupted_dir)
    killed = start([*command, kill_callback()], killed_dir)
    say(f"$ {' '.join(command[1:])}  (killed run: + {kill_callback()})")
    ok = finish("uninterrupted fit", *uninterrupted, expected=0)
    ok = finish(f"fit killed at epoch {KILL['epoch']} batch {KILL['batch']}", *killed, -signal.SIGKILL) and ok
    last = killed_dir / "checkpoints" / "last.ckpt"
    if ok:
        state = torch.load(last, map_location="cpu", weights_only=True)
        say(f"the killed fit's last.ckpt is of epoch {state['epoch']}, step {state['global_step']}")
        resumed = start([*command, f"--ckpt_path={last}"], killed_dir)
        ok = finish("resumed fit", *resumed, expected=0)
    if ok:
        same_state = compare(uninterrupted_dir / "checkpoints" / "last.ckpt", last)
        expected, got = val_metrics(uninterrupted_dir), val_metrics(killed_dir)
        say(f"final val metrics: uninterrupted {expected}; resumed {got}")
        ok = same_state and bool(expected) and expected == got
    seconds = time.monotonic() - begin
    verdict = "identical to the uninterrupted fit" if ok else "FAILED (see the lines above)"
    result(f"exact resume ({accelerator}, {args.precision}, deterministic): {verdict}, {seconds:.0f} s")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
