"""The export's working folders: owned by a process, removed by the next export once that process is gone.

An export writes into ``.<out>.tmp-<pid>-*`` next to its output (renamed into place at the end) and uses a
``ksampler-rt-export-<pid>-*`` scratch folder in the system temp directory. Its ``finally`` removes both --
but not when the process dies without unwinding (SIGKILL, power loss, or SIGTERM under Python's default
action, which ends the process without running ``finally``). So:

* :func:`terminate_cleanly` turns SIGTERM / SIGHUP into an exception while the export runs, so the
  ``finally`` blocks run (SIGINT already raises ``KeyboardInterrupt``); afterwards the signal is delivered
  again under its original disposition, so the process still ends the way its parent expects;
* :func:`remove_stale` removes the folders whose owner process no longer exists. The owner is the pid in the
  folder's name; a marker file inside records the host, because a pid only means something on the machine
  that wrote it (an output folder on a network share is seen from several). A folder whose pid is alive --
  another export running right now, or an unrelated process that reused the pid -- is never touched.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from typing import Iterator

SCRATCH_PREFIX = "ksampler-rt-export-"
MARKER = ".ksampler-rt-export-owner"


def _host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one owned by another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_owned_dir(prefix: str, parent: str | None = None) -> str:
    """``mkdtemp`` named ``<prefix><pid>-*`` with an owner marker (pid, host) inside."""
    path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump({"pid": os.getpid(), "host": _host()}, f)
    return path


def drop_marker(path: str) -> None:
    """Remove the owner marker (before the folder becomes the export's output)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, MARKER))


def _owner(path: str, name_pid: int, require_marker: bool) -> int | None:
    """The owning pid if it is a process of this machine, else None (leave the folder alone)."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            info = json.load(f)
    except FileNotFoundError:
        # marker not written yet, or dropped just before the rename into place: the name decides, where the
        # name alone says the folder is an export's
        return None if require_marker else name_pid
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("host") != _host() or info.get("pid") != name_pid:
        return None
    return name_pid


def remove_stale(parent: str, pattern: str, require_marker: bool = False) -> list[str]:
    """Remove the folders in ``parent`` whose name matches ``pattern`` (a regex whose group 1 is the owner pid)
    and whose owner process is gone; returns their paths. ``require_marker``: only folders with the marker."""
    removed = []
    rx = re.compile(pattern)
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = rx.fullmatch(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False):
            continue
        pid = _owner(entry.path, int(m.group(1)), require_marker)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.exists(entry.path):
            removed.append(entry.path)
    return removed


def tmp_prefix(out: str) -> str:
    """Name prefix of the temp folder an export to ``out`` writes into (next to ``out``)."""
    return f".{os.path.basename(out)}.tmp-"


def old_prefix(out: str) -> str:
    """Name prefix the previous ``out`` is renamed to while an overwriting export moves into place."""
    return f".{os.path.basename(out)}.old-"


def remove_stale_export_dirs(out: str) -> list[str]:
    """Before exporting to ``out``: remove dead exports' scratch folders (system temp dir) and temp folders
    next to ``out`` (this output's by name; other outputs' only with the marker, so certainly an export's),
    and the previous ``out`` an interrupted replacement left behind (only once ``out`` is complete again)."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    removed = remove_stale(tempfile.gettempdir(), re.escape(SCRATCH_PREFIX) + r"(\d+)-[^/]+")
    removed += remove_stale(parent, re.escape(tmp_prefix(out)) + r"(\d+)-[^/]+")
    removed += remove_stale(parent, r"\..+\.tmp-(\d+)-[^/]+", require_marker=True)
    if os.path.isfile(os.path.join(out, "manifest.json")):
        removed += remove_stale(parent, re.escape(old_prefix(out)) + r"(\d+)-[^/]+")
    return removed


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM / SIGHUP arrives during an export (see :func:`terminate_cleanly`)."""

    def __init__(self, signum: int):
        super().__init__(f"received signal {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """While active (main thread only), SIGTERM and SIGHUP raise :class:`Terminated` so that cleanup runs; on
    the way out the signal is re-delivered under its original (default) action. Signals whose handler someone
    else installed, or that are ignored, are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    installed = {}

    def handler(signum, frame):
        raise Terminated(signum)
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None or signal.getsignal(sig) is not signal.SIG_DFL:
            continue
        installed[sig] = signal.signal(sig, handler)
    try:
        yield
    except Terminated as exc:
        for sig, previous in installed.items():
            signal.signal(sig, previous)
        installed = {}
        os.kill(os.getpid(), exc.signum)  # the default action: the process ends as the sender meant
        raise SystemExit(128 + exc.signum) from None  # (not reached when the default action terminates)
    finally:
        for sig, previous in installed.items():
            signal.signal(sig, previous)
