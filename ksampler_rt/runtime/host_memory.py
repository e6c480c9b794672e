"""Keep freed host memory for reuse: glibc malloc thresholds for the sampling loop's temporaries.

Every sampling step allocates and frees numpy temporaries of one to a few latent batches (256 KB to a
few MB at 1024x1024). glibc serves blocks above ``M_MMAP_THRESHOLD`` (128 KB at start) with a fresh
``mmap`` and returns them with ``munmap`` on free, so each such temporary page-faults all its pages
again; it raises the threshold only after it frees an mmapped block larger than the current one
(``man 3 mallopt``), so a process's speed depends on what it happened to free before. Measured on the
development machine: the whole ``ksampler()`` path with a zero-cost UNet at [1,4,128,128] took 1.43 ms
per euler step in a fresh process and 0.63 ms with the thresholds below.

:func:`tune_host_allocator` sets them once, explicitly (mmap threshold 32 MB, the most glibc accepts on
64-bit, and trim threshold 128 MB, so the heap keeps that much free memory instead of returning it
after every step). It changes a process-wide policy, so the library never calls it on import: the
``ksampler-rt`` command (run, serve, demo, bench, ...) and the Ray workers call it at start, and programs
embedding the runtime may call it themselves. ``KSAMPLER_RT_MALLOC_TUNING=0`` turns it off; a no-op where
the C library is not glibc. The same policy can be given to any process with glibc's environment
variables ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=134217728``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20
ENV = "KSAMPLER_RT_MALLOC_TUNING"
_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3

_applied: bool | None = None


def allocator_env() -> dict[str, str]:
    """glibc environment variables that give a child process the same policy."""
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def tune_host_allocator() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring). Returns True when they are set
    (now or by an earlier call), False when disabled by ``$KSAMPLER_RT_MALLOC_TUNING=0`` or not glibc."""
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off") or not sys.platform.startswith("linux"):
        _applied = False
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        _applied = False
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
