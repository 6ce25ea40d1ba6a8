"""CompileConfig: the training step's forward through ``torch.compile``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CompileConfig:
    """The compile group of a config (``model.compile``).

    enabled: run the train step's forward through ``torch.compile`` (mode "default": Inductor's fused kernels;
        not "reduce-overhead", whose CUDA graphs need static buffers and pay off for small, launch-bound steps
        rather than a detector's, nor "max-autotune", which spends minutes tuning each shape). The first step
        compiles (minutes on CPU); validation, test, predict and the EMA copy run the eager model. STA blocks
        run their one-pass "cells" layout under compile.
    backend: the ``torch.compile`` backend: "inductor" generates kernels; "aot_eager" only traces forward and
        backward (fast: checks that the step compiles, without speed-up).
    """

    enabled: bool = False
    backend: str = "inductor"

    def __post_init__(self) -> None:
        known = torch._dynamo.list_backends(exclude_tags=())
        if self.enabled and self.backend not in known:
            raise ValueError(
                f"compile.backend {self.backend!r} is not a torch.compile backend; known: {', '.join(known)}"
            )

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` compiled with this backend (Inductor in mode "default")."""
        mode = "default" if self.backend == "inductor" else None  # modes are Inductor's
        return torch.compile(model, mode=mode, backend=self.backend)
