"""Fixtures for the server tests (helpers live in serve_helpers.py)."""
from __future__ import annotations

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

from serve_helpers import Servers  # noqa: E402


@pytest.fixture
def servers(tmp_path):
    s = Servers(tmp_path)
    yield s
    s.stop_all()


@pytest.fixture
def server(servers):
    return servers.start()
