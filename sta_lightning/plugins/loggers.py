"""A W&B logger that never hangs or fails a training run: offline without credentials or network.

Under SLURM (``srun``) the run id is ``slurm-<job id>`` unless ``id`` is given, so a job that SLURM requeues
continues the same W&B run. Runs offline when ``offline=True``, when ``WANDB_MODE`` is offline/dryrun, or
when no API key is found (``WANDB_API_KEY`` or a netrc entry for the W&B host). Online, ``wandb.init`` gets a
short timeout and falls back to offline if it cannot reach the server. Offline runs print the ``wandb sync``
command that uploads them once, when training ends (``finalize``).

W&B's console output is trimmed to what it does not repeat: ``quiet`` unless the settings, ``WANDB_QUIET``
or ``WANDB_SILENT`` say otherwise (no version line, end-of-run history panel or second sync command), and the
run is finished from Python at exit (left to W&B's service, the service finishes it and prints its own sync
command whatever ``quiet`` says). The save directory is created before ``wandb.init``, which otherwise warns
``git root <dir> does not exist`` on a first run (it looks for the git repository from that directory).
"""

import atexit
import netrc
import os
import sys
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import lightning as L
import wandb
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn


def wandb_credentials_available() -> bool:
    """True if W&B can authenticate without a prompt: ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, or a
    netrc login (``$NETRC``, ``~/.netrc`` or ``~/_netrc``, as ``wandb login`` writes) for the W&B server host
    (``WANDB_BASE_URL`` or wandb's default). Reads only local state: no network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url).hostname
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for candidate in candidates:
        netrc_file = Path(candidate).expanduser()
        try:
            if netrc_file.is_file() and netrc.netrc(netrc_file).authenticators(host) is not None:
                return True
        except (netrc.NetrcParseError, OSError):
            continue
    return False


def wandb_offline_requested() -> bool:
    """True when the environment asks W&B for offline mode (``WANDB_MODE=offline`` or the old ``dryrun``)."""
    return os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun")


class OfflineFallbackWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` that switches to offline mode instead of failing or waiting for a login.

    Arguments are those of ``WandbLogger`` (project, name, group, tags, save_dir, ... are passed on to
    ``wandb.init``) plus ``init_timeout`` (seconds ``wandb.init`` may wait for the server when online).
    ``log_model`` needs an online run; offline it is turned off with a warning (Lightning would raise).
    """

    def __init__(
        self,
        *,
        offline: bool = False,
        log_model: Literal["all"] | bool = False,
        init_timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        go_offline = offline or wandb_offline_requested() or not wandb_credentials_available()
        if go_offline and log_model:
            rank_zero_warn(
                f"W&B runs offline here, so log_model={log_model} is ignored (artifacts need a server)."
            )
            log_model = False
        settings = kwargs.pop("settings", None) or wandb.Settings()
        if not {"quiet", "silent"} & settings.model_fields_set and not (
            os.environ.get("WANDB_QUIET") or os.environ.get("WANDB_SILENT")
        ):
            settings.quiet = True  # W&B's own footer would repeat the sync command printed by ``finalize``
        settings.init_timeout = init_timeout
        settings.login_timeout = init_timeout
        if go_offline:
            kwargs["mode"] = "offline"
        job_id = SLURMEnvironment.job_id() if SLURMEnvironment.detect() else None
        if job_id is not None and not (kwargs.get("id") or kwargs.get("version")):
            kwargs["id"] = f"slurm-{job_id}"  # a requeued job resumes this run (WandbLogger: resume="allow")
        # The base class's own ``offline`` flag rewrites os.environ["WANDB_MODE"] for the whole process; the
        # ``mode`` init argument keeps the choice to this run.
        super().__init__(offline=False, log_model=log_model, settings=settings, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)  # Lightning passes None, which makes wandb warn
        self._sync_hint_printed = False
        self._exit_code = 0  # of the run when finished at exit: 1 once a stage has failed

    @property
    def offline(self) -> bool:
        """Whether this run writes only to the local disk (to be uploaded later with ``wandb sync``)."""
        if self._experiment is not None and hasattr(self._experiment, "settings"):
            return self._experiment.settings.mode == "offline"  # e.g. WANDB_MODE=offline with mode unset
        return self._wandb_init.get("mode") == "offline"

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The ``wandb`` run, created on first use (global rank 0); offline if the server is unreachable."""
        if self._experiment is not None:
            return super().experiment
        if self._wandb_init.get("dir"):
            # wandb.init looks for the git repository from here; missing: "git root ... does not exist"
            Path(self._wandb_init["dir"]).mkdir(parents=True, exist_ok=True)
        run = None
        if not self.offline:
            try:
                run = super().experiment
            except wandb.errors.CommError as error:
                rank_zero_warn(f"W&B server unreachable ({error}); logging this run offline instead.")
                wandb.finish()
                self._wandb_init["mode"] = "offline"
                self._log_model = False
        if run is None:
            run = super().experiment
        atexit.register(self._finish_at_exit)  # after W&B's own exit hook, so it runs before it
        return run

    def _finish_at_exit(self) -> None:
        """Finish the run (no-op if finished): as failed if a stage failed or an exception ended Python."""
        if self._experiment is not None:
            failed = self._exit_code or getattr(sys, "last_value", None) is not None
            self._experiment.finish(exit_code=1 if failed else 0)

    def sync_command(self) -> str:
        """The shell command that uploads this offline run (its ``offline-run-*`` folder) to W&B."""
        return f"wandb sync {Path(self.experiment.dir).parent.resolve()}"

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Lightning's finalize; then, for an offline run, the ``wandb sync`` command, once per run, unless
        W&B's own footer (not quiet, not silent) prints it when the run finishes."""
        super().finalize(status)
        if status != "success":
            self._exit_code = 1
        run = self._experiment
        if not self.offline or run is None or self._sync_hint_printed:
            return
        self._sync_hint_printed = True
        if run.settings.quiet or run.settings.silent:
            rank_zero_info(f"W&B run stored offline. Upload it with: {self.sync_command()}")


class WandbRunCheckpoint(Callback):
    """Keeps the W&B run id of the fit in its checkpoints, so that ``fit --ckpt_path`` continues the same W&B
    run (the CLI sets the logger's ``id`` from it when the config gives none)."""

    def __init__(self) -> None:
        self.run_id: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.run_id is None:
            self.run_id = wandb_run_id(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run_id = state_dict.get("run_id")


def wandb_run_id(trainer: L.Trainer) -> str | None:
    """The id of the trainer's W&B run (global rank 0 knows it; None elsewhere or without a W&B logger)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            return logger.experiment.id
    return None
