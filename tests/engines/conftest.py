"""Tiny hand-built exports (onnx.helper) and an isolated engine cache per test."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("onnx")


def random_feeds(engine, rng, b=2, h=8, w=8):
    """Random inputs of the engine's dtypes: latents (b, 4, h, w), pixels (b, 3, 8h, 8w), 77 tokens."""
    import numpy as np

    out = {}
    for s in engine.inputs:
        if s.dtype == "int64":
            out[s.name] = rng.integers(0, 60, size=(b, 77)).astype(np.int64)
            continue
        shape = []
        for k, d in enumerate(s.shape):
            if isinstance(d, int):
                shape.append(d)
            elif k == 0:
                shape.append(b)
            elif d == "tokens":
                shape.append(77)
            elif d == "height":
                shape.append(h)
            elif d == "width":
                shape.append(w)
            else:
                shape.append(h * 8)
        out[s.name] = rng.standard_normal(shape).astype(s.dtype)
    return out


@pytest.fixture
def feeds_for():
    """:func:`random_feeds`, for the engine tests of every backend."""
    return random_feeds


def _has_gpu_ort() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _has_trt() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    from ksampler_rt.engines.envinfo import gpu_info

    return gpu_info(0) is not None


def pytest_collection_modifyitems(config, items):
    gpu = _has_gpu_ort()
    trt = _has_trt()
    here = Path(__file__).parent
    for item in items:
        if here not in Path(str(item.path)).parents:
            continue  # only this directory's tests
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU and onnxruntime-gpu"))
        if "tensorrt" in item.keywords and not trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT >= 10 and a CUDA GPU"))


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    from ksampler_rt.engines.testing import make_tiny_export

    return make_tiny_export(tmp_path_factory.mktemp("exp") / "sd15", "sd15")


@pytest.fixture(scope="session")
def tiny_export_xl(tmp_path_factory):
    from ksampler_rt.engines.testing import make_tiny_export

    return make_tiny_export(tmp_path_factory.mktemp("exp") / "sdxl", "sdxl")


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("KSAMPLER_RT_CACHE", str(root))
    return root
