"""The tiny SD1.5 checkpoint, exported and registered ONCE per session in a private cache.

``tiny_sd15`` builds the deterministic tiny diffusers model, exports it to ONNX and registers it as
``tiny-sd15`` in a session models folder (about 20-60 s, the slowest part of this directory).
Every test here runs with ``KSAMPLER_RT_CACHE`` pointed at the session cache (an autouse
fixture), so nothing touches ``~/.cache`` and engine caches are shared within the session.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EXAMPLES = Path(__file__).resolve().parents[2] / "ksampler_rt" / "workflow" / "examples"
BACKEND = os.environ.get("KSAMPLER_RT_TEST_BACKEND", "onnxruntime-cpu")  # e.g. onnxruntime-cuda on a GPU box


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ksampler-rt-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(session_cache, monkeypatch):
    monkeypatch.setenv("KSAMPLER_RT_CACHE", str(session_cache))
    monkeypatch.delenv("KSAMPLER_RT_MODELS", raising=False)


def _with_cache(cache: Path, fn):
    old = os.environ.get("KSAMPLER_RT_CACHE")
    os.environ["KSAMPLER_RT_CACHE"] = str(cache)
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("KSAMPLER_RT_CACHE", None)
        else:
            os.environ["KSAMPLER_RT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_sd15(session_cache):
    """SimpleNamespace(models_dir, export_dir, source): the registered tiny-sd15 and its diffusers folder."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("onnx")
    from ksampler_rt.demo import prepare_tiny_checkpoint
    from ksampler_rt.export.tiny import ensure_tiny_model

    models_dir = session_cache / "models"
    export_dir = _with_cache(session_cache, lambda: prepare_tiny_checkpoint(models_dir, log=lambda *_: None))
    source = _with_cache(session_cache, lambda: ensure_tiny_model("sd15"))
    return SimpleNamespace(models_dir=models_dir, export_dir=Path(export_dir), source=Path(source))


@pytest.fixture(scope="session")
def pipeline(tiny_sd15, tmp_path_factory, session_cache):
    """One Pipeline for the session: engines load once and are reused by every test."""
    from ksampler_rt.workflow.pipeline import Pipeline

    out = tmp_path_factory.mktemp("output")
    pipe = Pipeline(tiny_sd15.models_dir, backend=BACKEND, output_dir=out, input_dir=EXAMPLES,
                    temp_dir=tmp_path_factory.mktemp("temp"), log=None)
    _with_cache(session_cache, lambda: pipe.load_checkpoint("tiny-sd15"))
    yield pipe
    pipe.release()
