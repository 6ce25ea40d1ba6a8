"""The global random generators of every process in checkpoints, so that a resumed fit draws what the
uninterrupted one would have drawn."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from sta_lightning.distributed import gather_on_rank_zero


def random_states() -> dict[str, Any]:
    """This process's torch (CPU and, once initialised, CUDA), numpy and python generator states, as tensors
    and plain values (a checkpoint holding them loads with ``torch.load(weights_only=True)``)."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    """Put back the generator states returned by ``random_states``."""
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomStateCheckpoint(L.Callback):
    """Saves each process's generator states with every checkpoint; restores them when a fit resumes.

    The states are gathered from all processes into the checkpoint (``per_rank``, in global rank order) and
    put back in ``on_train_start``, after Lightning's restore and any sanity validation, just before training
    goes on. The data pipeline does not use these generators (``sta_lightning.data`` draws from its own
    seeds); the model does (drop path). A fit resumed on another number of processes keeps its fresh states,
    with a warning.
    """

    def __init__(self) -> None:
        self._states_to_restore: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Lightning builds the checkpoint on every rank (rank 0 writes it): a collective is safe here.
        return {"per_rank": gather_on_rank_zero([random_states()])}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._states_to_restore = state_dict.get("per_rank")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        states, self._states_to_restore = self._states_to_restore, None
        if states is None:
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds the random states of {len(states)} processes, this fit runs "
                f"{trainer.world_size}: the model's random draws (drop path) start afresh"
            )
            return
        set_random_states(states[trainer.global_rank])
