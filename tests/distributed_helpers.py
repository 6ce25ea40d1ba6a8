"""Helpers of the tests that launch real distributed runs: free ports, launching processes that are killed
when they hang, the metrics they log and the comparison of the weights two fits end with."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import torch


def read_metrics(save_dir: Path) -> dict[str, float]:
    """The ``val/`` metrics of the last row that has them in the one metrics.csv of a CSVLogger under
    ``save_dir``."""
    (metrics_file,) = save_dir.rglob("metrics.csv")
    with open(metrics_file) as file:
        rows = [row for row in csv.DictReader(file) if row.get("val/mAP")]
    return {key: float(value) for key, value in rows[-1].items() if key.startswith("val/")}


def logger_arg(save_dir: Path) -> str:
    """The CLI argument of a CSVLogger writing under ``save_dir``."""
    return "--trainer.logger=" + json.dumps(
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(save_dir)}}
    )


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (bound to port 0, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_together(
    commands: list[list[str]], cwd: Path, environments: list[dict[str, str]], timeout: float
) -> list[subprocess.CompletedProcess]:
    """Start every command at once (each in its own session with its own environment), wait for all of them,
    and return their results (text stdout, stderr). Past ``timeout`` seconds every process group still
    running is killed (SIGKILL: the DDP ranks they started go too) and AssertionError reports the hang."""
    processes = [
        subprocess.Popen(
            command,
            cwd=cwd,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for command, environment in zip(commands, environments, strict=True)
    ]
    results = []
    try:
        for command, process in zip(commands, processes, strict=True):
            stdout, stderr = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        errors = []
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            errors.append(process.communicate()[1][-3000:])
        raise AssertionError(f"killed after {timeout} s (a hang?):\n" + "\n-----\n".join(errors)) from None
    return results


def weight_differences(checkpoint: Path, reference: Path) -> dict[str, float]:
    """Max absolute difference over all floating-point parameters and buffers of two checkpoints' EMA
    weights (``state_dict``) and raw weights (``current_model_state``); the keys must be the same."""
    differences = {}
    for key in ("state_dict", "current_model_state"):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)[key]
        expected = torch.load(reference, map_location="cpu", weights_only=True)[key]
        assert state.keys() == expected.keys(), key
        differences[key] = max(
            (state[name].double() - expected[name].double()).abs().max().item()
            for name in state
            if state[name].is_floating_point()
        )
    return differences
