"""Fixtures for the server tests (helpers live in serve_helpers.py)."""
from __future__ import annotations

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

from serve_helpers import Servers, tiny_models_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The models folder holding the real tiny checkpoint, or None where it cannot be built."""
    models, why = tiny_models_dir(tmp_path_factory.mktemp("models"))
    if models is None:
        print(f"tests/serve: the tiny checkpoint is not available ({why}); using the analytic fake model")
    return models


@pytest.fixture
def servers(tmp_path, tiny_models):
    s = Servers(tmp_path, tiny_models)
    yield s
    s.stop_all()


@pytest.fixture
def server(servers):
    return servers.start()
