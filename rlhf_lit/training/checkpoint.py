"""Crash-safe checkpoint files: written beside the target, then renamed over it.

Lightning's default writer opens the target and writes into it, so a kill while saving leaves a
truncated ``last.ckpt`` that the next run cannot load. A rename is atomic on POSIX filesystems: the
old checkpoint stays intact until the new one is complete. (DeepSpeed writes its own checkpoint
directories and does not use this plugin.)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that never leaves a partial checkpoint behind."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
