"""Route what torch / transformers / diffusers say during an export into a log file, not the console.

An export of even the tiny model makes the libraries it drives talk: torch's TorchScript exporter warns
(``TracerWarning``: "Converting a tensor to a Python boolean might cause the trace to be incorrect" and the
like, expected for a UNet's shape checks), transformers warns about optional backends and draws "Loading
weights" progress bars, diffusers warns about dtype casts. None of it is actionable for the user, all of it
drowns the export's own progress lines, yet it is what someone debugging a bad export wants to read. So
while :func:`library_output_to` is active:

* Python warnings are written to the file (once per warning site, the ``"default"`` action, whatever filters
  were set before -- ``-W error`` must not turn a TracerWarning into a failed export);
* the records of the libraries' loggers (:data:`LIBRARY_LOGGERS`) go to the file instead of their handlers,
  as does anything else that would reach Python's last-resort stderr handler;
* transformers' and diffusers' tqdm bars are switched off.

The process's ``sys.stdout`` / ``sys.stderr`` are *not* redirected: transformers binds its stderr handler to
whatever ``sys.stderr`` is when it first configures logging, so a redirect in effect then would leave a
handler writing to a closed file after the export. Instead transformers and diffusers are made to add their
handlers (which they do lazily, on first use) at the start of the capture, and those are set aside with the
others.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Iterator, TextIO

#: Loggers whose records go to the file (the roots of their libraries' logger trees).
LIBRARY_LOGGERS = ("torch", "transformers", "diffusers", "huggingface_hub", "onnx", "onnxscript", "onnxruntime",
                   "onnx_ir", "accelerate", "safetensors")

# (package, its logging module): libraries that add their stderr handler lazily, on first use
_LAZY_LOGGING = (("transformers", "transformers.utils.logging"), ("diffusers", "diffusers.utils.logging"))

_active: list["LibraryLog"] = []
_lock = threading.Lock()


class LibraryLog:
    """The file library output goes to, and how many entries (warnings, log records) it received."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.count = 0
        self.categories: dict[str, int] = {}  # warning category / logger name -> entries

    def _write(self, text: str, kind: str) -> None:
        self.count += 1
        self.categories[kind] = self.categories.get(kind, 0) + 1
        with _lock:
            self._file.write(text if text.endswith("\n") else text + "\n")
            self._file.flush()

    def summary(self, path: str | os.PathLike | None = None) -> str:
        """One report line: 'N library warning/log entries (TracerWarning x5, diffusers) in PATH' (``path``: where
        the file ended up, if it was moved after the capture)."""
        kinds = ", ".join(f"{k} x{n}" if n > 1 else k
                          for k, n in sorted(self.categories.items(), key=lambda kv: (-kv[1], kv[0])))
        noun = "entry" if self.count == 1 else "entries"
        return f"{self.count} library warning/log {noun} ({kinds}) written to {path or self.path}"


class _FileHandler(logging.Handler):
    def __init__(self, target: LibraryLog):
        super().__init__(logging.NOTSET)
        self.target = target
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.target._write(self.format(record), record.name.split(".")[0])
        except Exception:  # a log line must never break the export
            self.handleError(record)


def _configure_lazy_library_logging() -> None:
    """Let transformers / diffusers add their default stderr handlers now, while ``sys.stderr`` is the console,
    so that they are swapped out below rather than added (to the console) in the middle of the export."""
    for package, module in _LAZY_LOGGING:
        if package not in sys.modules and importlib.util.find_spec(package) is None:
            continue
        try:
            importlib.import_module(module).get_logger(package)
        except Exception:  # a broken optional library is the export's problem to report, not this one's
            continue


def _progress_bars_off() -> list:
    """Switch off transformers' / diffusers' tqdm bars; returns the enable functions to call afterwards."""
    restore = []
    for package, module in _LAZY_LOGGING:
        mod = sys.modules.get(module)
        if mod is None:
            continue
        if mod.is_progress_bar_enabled():
            mod.disable_progress_bar()
            restore.append(mod.enable_progress_bar)
    return restore


def current() -> LibraryLog | None:
    """The innermost active capture, if any."""
    return _active[-1] if _active else None


@contextlib.contextmanager
def library_output_to(path: str | os.PathLike) -> Iterator[LibraryLog]:
    """Send library warnings and log records to ``path`` (appended; created on the first entry) while active.

    Nested use with the same ``path`` reuses the enclosing capture (one file handle, one count); a different
    ``path`` captures into that file until the inner block ends. Not for concurrent use from several threads:
    the warning filters and logger handlers it swaps are process-wide.
    """
    path = Path(path).absolute()
    if _active and _active[-1].path == path:
        yield _active[-1]
        return
    target = LibraryLog(path)
    target._file = _LazyFile(path)
    handler = _FileHandler(target)
    saved = []
    root = logging.getLogger()
    root_handler = None
    restore_bars = []
    _active.append(target)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")

            def show(message, category, filename, lineno, file=None, line=None):
                target._write(warnings.formatwarning(message, category, filename, lineno, line), category.__name__)
            warnings.showwarning = show
            for name in LIBRARY_LOGGERS:
                logger = logging.getLogger(name)
                saved.append((logger, logger.handlers[:], logger.propagate))
                logger.handlers = [handler]
                logger.propagate = False
            if not root.handlers:  # records of other libraries would reach logging.lastResort (stderr)
                root_handler = handler
                root.addHandler(root_handler)
            # transformers / diffusers add their stderr handler on first use: let them do it now (what their
            # import says lands in the file), then set that handler aside with the others
            _configure_lazy_library_logging()
            for logger, handlers, _ in saved:
                handlers += [h for h in logger.handlers if h is not handler and h not in handlers]
                logger.handlers = [handler]
                logger.propagate = False
            restore_bars = _progress_bars_off()
            yield target
    finally:
        _active.remove(target)
        for enable in restore_bars:
            enable()
        if root_handler is not None:
            root.removeHandler(root_handler)
        for logger, handlers, propagate in saved:
            # keep any handler a library added meanwhile (it was configured during the capture)
            added = [h for h in logger.handlers if h is not handler and h not in handlers]
            logger.handlers = handlers + added
            logger.propagate = propagate
        target._file.close()


class _LazyFile:
    """Opened (append, UTF-8) on the first write, so a quiet export leaves no empty log behind."""

    def __init__(self, path: Path):
        self.path = path
        self._fh: TextIO | None = None

    def write(self, text: str) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8", errors="backslashreplace")
        self._fh.write(text)

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
