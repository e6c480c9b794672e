"""Tiny hand-built exports (onnx.helper) and an isolated engine cache per test."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("onnx")


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
