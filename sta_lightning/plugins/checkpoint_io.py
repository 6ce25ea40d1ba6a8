"""Lightning's checkpoint reading and writing through ``sta_lightning.checkpoint_file`` for local files:
atomic writes in the checkpoint's own folder, and a ``CheckpointError`` naming a damaged file on resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sta_lightning.checkpoint_file import read_checkpoint, write_checkpoint


class LocalAtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local files are written atomically and checked when read; remote URLs
    (``s3://``...) keep Lightning's own handling. The CLI gives it to every Trainer.

    ``preloaded``: a checkpoint the CLI has already read (path -> content, on the CPU), returned once for
    that path instead of reading the file again.
    """

    def __init__(self, preloaded: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.preloaded = {str(Path(path).resolve()): content for path, content in (preloaded or {}).items()}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_checkpoint(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location, weights_only)
        preloaded = self.preloaded.pop(str(Path(path).resolve()), None)
        if preloaded is not None:
            return preloaded
        return read_checkpoint(path, map_location=map_location, weights_only=weights_only)
