"""The one base class of the user-input errors the CLI reports in one line (no traceback)."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user — data, a config value, a model or tokenizer directory. The message names
    the file, row, field or config key; ``rlhf-lit`` prints it as one line and exits non-zero."""
