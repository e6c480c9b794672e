"""Session-wide tiny Stable Diffusion fixtures (random weights, built offline once per session).

``tiny_sd15_dir``, ``tiny_sd2v_dir``, ``tiny_sdxl_dir``: a diffusers folder each, built with
``ksampler_rt.export.tiny.make_tiny_model(..., seed=0)``; treat them as read-only.
"""
from __future__ import annotations

import os

import pytest

# The fixtures (and everything loading them) must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _build(tmp_path_factory, family):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from ksampler_rt.export.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}") / "model", family, seed=0)


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    return _build(tmp_path_factory, "sd15")


@pytest.fixture(scope="session")
def tiny_sd2v_dir(tmp_path_factory):
    return _build(tmp_path_factory, "sd2-v")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    return _build(tmp_path_factory, "sdxl")


# The flow families (SD3.5 layout, FLUX.1 dev, FLUX.1 schnell), see ksampler_rt/export/tiny_flow.py.
@pytest.fixture(scope="session")
def tiny_flow_dir(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = _build(tmp_path_factory, family)
        return cache[family]
    return get
