"""Every test runs with temporary caches only: nothing is written to the user's ``~/.cache/ksampler-rt``.

``KSAMPLER_RT_CACHE`` (engine cache, tiny fixtures, model registry) and ``XDG_CACHE_HOME`` (libraries that
follow it) point into pytest's temporary directory for the whole session, and ``KSAMPLER_RT_MODELS`` is
unset so the registry lives under that cache too. Tests that need their own cache still set it with
``monkeypatch`` (``tests/engines``' ``cache_root``, ``tests/workflow``' session cache); this is the floor.
Subprocesses started by tests inherit it.
"""
from __future__ import annotations

import os

import pytest

_ISOLATED = {"KSAMPLER_RT_CACHE": "ksampler-rt", "XDG_CACHE_HOME": "xdg"}


@pytest.fixture(scope="session", autouse=True)
def temporary_caches(tmp_path_factory):
    """{variable: path} of the session's temporary caches (set in ``os.environ`` for the whole run)."""
    root = tmp_path_factory.mktemp("user-cache")
    saved = {k: os.environ.get(k) for k in (*_ISOLATED, "KSAMPLER_RT_MODELS")}
    paths = {k: root / sub for k, sub in _ISOLATED.items()}
    for k, p in paths.items():
        os.environ[k] = str(p)
    os.environ.pop("KSAMPLER_RT_MODELS", None)
    try:
        yield paths
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
