"""Hub access that fails fast and clearly when there is no network.

Without a reachable hub, ``from_pretrained``/``load_dataset`` on a hub name retry for 20-50 s before
failing with a deep traceback. We probe once (a TCP connect, a few seconds at most) and turn every
failure into one message that says how to use a local path instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from rlhf_lit.errors import InputError


class HubUnavailable(InputError, RuntimeError):
    """A hub name was given but the hub cannot be reached (or offline mode is set)."""


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def offline_mode() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub's endpoint opens within ``timeout`` seconds."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(name: str, what: str) -> None:
    """Raise :class:`HubUnavailable` at once when ``name`` is not local and the hub is out of reach."""
    if is_local(name):
        return
    if offline_mode() or not hub_reachable():
        why = "offline mode is set (HF_HUB_OFFLINE)" if offline_mode() else "the hub cannot be reached"
        raise HubUnavailable(
            f"{what} {name!r} is not a local path and {why}; pass a local directory or file instead "
            f"(for example one written by save_pretrained, or a .jsonl/.csv/.parquet file for data)"
        )


@contextlib.contextmanager
def hub_errors(name: str, what: str):
    """Check reachability first, then turn a loading failure into one line naming ``name``."""
    require_hub(name, what)
    try:
        yield
    except (OSError, ValueError) as e:
        raise HubUnavailable(f"could not load {what} {name!r}: {str(e).splitlines()[0]}") from e
