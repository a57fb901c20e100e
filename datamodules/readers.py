"""Row readers for local files (JSONL, JSON, CSV, Parquet) and hub datasets.

Each yields ``(where, row)`` pairs, ``where`` being "FILE:LINE" (or "FILE row N") so any error about
a row can name it. Pure Python + datasets/pyarrow: no lightning, deepspeed or wandb.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from rlhf_lit.errors import InputError
from rlhf_lit.hf.hub import require_hub


class DataError(InputError):
    """Bad input data; the message names the file, the row and the field."""


class BadRow(Exception):
    """A row that cannot be read or normalised; ``reason`` is its drop-count key in skip mode."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


FORMATS = (".jsonl", ".json", ".csv", ".parquet")


def read_rows(path: str | Path) -> Iterator[tuple[str, dict | BadRow]]:
    """Yield ``(where, row)`` for every row of a local file; an unreadable row is yielded as a ``BadRow``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give a file ({', '.join(FORMATS)})")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FORMATS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (no rows)")
    reader = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}[suffix]
    n = 0
    for item in reader(path):
        n += 1
        yield item
    if n == 0:
        raise DataError(f"{path}: file has no rows")


def _decode(raw: bytes, where: str) -> str | BadRow:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow("not_utf8", f"{where}: bytes are not valid UTF-8 at offset {e.start}")


def _jsonl(path: Path):
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            where = f"{path}:{i}"
            text = _decode(raw, where)
            if isinstance(text, BadRow):
                yield where, text
                continue
            if not text.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield where, BadRow("malformed_json", f"{where}: malformed JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                yield where, BadRow("not_an_object", f"{where}: expected a JSON object, got {type(row).__name__}")
                continue
            yield where, row


def _json(path: Path):
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: bytes are not valid UTF-8 at offset {e.start}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
    for i, row in enumerate(data):
        where = f"{path} item {i}"
        yield where, row if isinstance(row, dict) else BadRow("not_an_object", f"{where}: expected a JSON object")


def _csv(path: Path):
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: bytes are not valid UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path}: CSV has no header row")
    start = 2
    for row in reader:
        where = f"{path}:{start}"
        start = reader.line_num + 1
        if None in row or any(v is None for v in row.values()):
            yield where, BadRow("malformed_csv", f"{where}: row has a different number of fields than the header")
            continue
        yield where, row


def _parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", row


def read_hub(name: str, split: str = "train", subset: str | None = None) -> Iterator[tuple[str, dict]]:
    """Rows of a hub dataset through ``datasets.load_dataset``; fails within seconds when offline."""
    require_hub(name, "dataset")
    from datasets import load_dataset

    try:
        ds = load_dataset(name, subset, split=split)
    except Exception as e:
        raise DataError(f"could not load dataset {name!r} (split {split!r}): {str(e).splitlines()[0]}") from None
    for i, row in enumerate(ds):
        yield f"{name}[{split}] row {i}", row
