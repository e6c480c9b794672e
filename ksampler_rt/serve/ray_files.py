"""Placing images produced on Ray replicas into the front's (or shared) output folders.

Replicas number their files independently, so a name such as ``ComfyUI_00001_.png`` is only a
hint: :func:`place_file` claims the first free counter for the prefix in the destination folder
with an exclusive create (safe between concurrent prompts and between replicas writing into one
shared folder) and returns the name it got.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_COUNTED = re.compile(r"^(?P<prefix>.*)_(?P<counter>\d{5,})_\.(?P<ext>png|webp|jpg|jpeg|gif)$", re.IGNORECASE)


def _folder(root: Path, subfolder: str) -> Path:
    root = Path(root).resolve()
    folder = root.joinpath(*[p for p in str(subfolder or "").replace("\\", "/").split("/") if p not in ("", ".")])
    real = folder.resolve()
    if real != root and root not in real.parents:
        raise ValueError(f"subfolder: {subfolder!r} leaves the output folder")
    return folder


def _next_counter(folder: Path, prefix: str, ext: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"_(\d+)_?\." + re.escape(ext) + "$")
    counters = [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))] if folder.is_dir() else []
    return max(counters, default=0) + 1


def place_file(root: Path, subfolder: str, filename: str, data: bytes, *, overwrite: bool = False) -> str:
    """Write ``data`` as ``root/subfolder/<name>``; the name is ``filename`` with its counter moved to the
    first free one (``overwrite``: exactly ``filename``). Returns the file name used."""
    if "/" in filename or "\\" in filename or filename.startswith(".") or not filename:
        raise ValueError(f"filename: received {filename!r}, expected a plain file name")
    folder = _folder(root, subfolder)
    folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _write_atomic(folder / filename, data)
        return filename
    match = _COUNTED.match(filename)
    if match is None:  # not a counted name: keep it unless taken, else add " (n)"
        stem, suffix = os.path.splitext(filename)
        candidates = (filename if i == 0 else f"{stem} ({i}){suffix}" for i in range(10 ** 6))
    else:
        prefix, ext = match["prefix"], match["ext"]
        start = _next_counter(folder, prefix, ext)
        candidates = (f"{prefix}_{counter:05}_.{ext}" for counter in range(start, start + 10 ** 6))
    for name in candidates:
        try:
            fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return name
    raise RuntimeError(f"no free file name for {filename!r} in {folder}")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
