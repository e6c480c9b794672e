"""Append-only JSON-lines logs (the server's ``history.jsonl`` and ``queue.jsonl``): replay, append, rewrite.

A log survives a crash mid-write: replay skips a torn or unreadable line (one bad byte costs its line,
not the file) and says which; the next append starts a new line after a torn one; a rewrite replaces the
file atomically (tmp + ``os.replace``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

#: What a record's ``apply`` may raise for a line that is not a usable record (it is skipped).
UNREADABLE = (ValueError, TypeError, KeyError, AttributeError, RecursionError)


def replay(path: Path, apply: Callable[[object], None], warnings: list[str]) -> int:
    """Call ``apply`` with every record of the log at ``path``, in order; returns how many were applied.

    A line that is not UTF-8 JSON, or that ``apply`` rejects with one of :data:`UNREADABLE`, is skipped
    with a warning ``NAME:LINE: skipped an unreadable line``; blank lines are passed over. ``OSError``
    (the file cannot be read) is the caller's to handle."""
    applied = 0
    with open(path, "rb") as f:  # line by line as bytes: a bad byte costs its line only
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                apply(json.loads(raw.decode("utf-8")))
            except UNREADABLE:
                warnings.append(f"{path.name}:{number}: skipped an unreadable line")
                continue
            applied += 1
    return applied


def _line(record: dict) -> bytes:
    return (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode("utf-8")


def append(path: Path, record: dict) -> None:
    """Append ``record`` as one line; after a torn last line (killed mid-write) it starts a new line."""
    line = _line(record)
    with open(path, "ab+") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)
        f.flush()


def rewrite(path: Path, records: Iterable[dict]) -> int:
    """Replace the log with ``records`` atomically; returns how many lines it now holds."""
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with open(tmp, "wb") as f:
        for record in records:
            f.write(_line(record))
            count += 1
    os.replace(tmp, path)
    return count
