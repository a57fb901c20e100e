"""Output directories rlhf-lit may replace: only its own (issue #28). Pure Python: no lightning.

Every directory rlhf-lit writes as a whole (a stage's export, a converted model) carries a marker file.
Replacing a path is allowed when nothing is there, when it is such a directory (or an export written
before markers existed, known by its model card), or when the user says so (``--overwrite``, or the
callback's ``overwrite: true``). Anything else is refused with one line before any work starts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rlhf_lit.errors import InputError

MARKER = ".rlhf-lit"
"""the file that says rlhf-lit wrote a directory (JSON: what wrote it, when)"""
OVERWRITE_ENV = "RLHF_LIT_OVERWRITE"
"""set to 1 by ``rlhf-lit --overwrite ...``: replace output paths rlhf-lit did not write"""


def overwrite_requested() -> bool:
    return os.environ.get(OVERWRITE_ENV, "").lower() in ("1", "true", "yes")


def mark(directory: Path, what: str) -> None:
    """Write the marker into ``directory`` (before it is renamed into place)."""
    (Path(directory) / MARKER).write_text(json.dumps({"written_by": "rlhf-lit", "what": what, "at": time.time()}))


def ours(path: Path) -> bool:
    """Whether ``path`` is a directory rlhf-lit wrote: its marker, or the model card of an export written
    before the marker existed (root or one sub-folder, e.g. PPO's actor/)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / MARKER).is_file():
        return True
    cards = [path / "README.md", *path.glob("*/README.md")]
    return any(c.is_file() and c.read_text(errors="replace").startswith("# rlhf-lit export") for c in cards)


def check_output(path: Path, key: str, overwrite: bool = False) -> None:
    """Refuse, in one line naming ``key``, an output ``path`` that rlhf-lit may not replace or cannot write:
    a file, a non-empty directory it did not write (unless ``overwrite``), or a place without write access.
    Called when a stage starts, so nothing is trained for an export that would then fail."""
    path = Path(path)
    overwrite = overwrite or overwrite_requested()
    if path.exists() and not overwrite:
        if not path.is_dir():
            raise InputError(f"{key}: {path} is a file rlhf-lit did not write; choose another path (or --overwrite)")
        if any(path.iterdir()) and not ours(path):
            raise InputError(
                f"{key}: {path} holds files rlhf-lit did not write (no {MARKER} marker); choose another path "
                "(or --overwrite to replace it)"
            )
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # the directory that will hold the new ones
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{key}: cannot write {path} (no write permission on {parent})")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{key}: cannot write {path} (no write permission on it)")
