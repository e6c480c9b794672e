"""The suite never writes into the user's cache: tests/conftest.py points the caches at a temporary directory."""
import os
from pathlib import Path

from ksampler_rt.engines import BuildOptions, EngineCache, build_engines, load_engines


def _user_entries() -> set[str]:
    engines = Path.home() / ".cache" / "ksampler-rt" / "engines"
    return {p.name for p in engines.iterdir()} if engines.is_dir() else set()


def test_build_and_load_without_a_cache_land_in_the_temporary_one(tiny_export, temporary_caches,
                                                                  tmp_path_factory):
    base = tmp_path_factory.getbasetemp().resolve()
    root = Path(os.environ["KSAMPLER_RT_CACHE"]).resolve()
    assert root == temporary_caches["KSAMPLER_RT_CACHE"].resolve() and base in root.parents
    assert base in Path(os.environ["XDG_CACHE_HOME"]).resolve().parents
    assert "KSAMPLER_RT_MODELS" not in os.environ
    before = _user_entries()

    built = build_engines(tiny_export, BuildOptions(backend="onnxruntime-cpu"), models=["unet"])["unet"]
    es = load_engines(tiny_export, "onnxruntime-cpu", models=["unet"])  # no cache=: the default one

    assert built.path.resolve().parent == root / "engines"
    assert Path(es.unet.source).resolve() == built.path.resolve() / "model.onnx"
    assert EngineCache().root.resolve() == root
    assert (Path.home() / ".cache" / "ksampler-rt").resolve() not in built.path.resolve().parents
    assert _user_entries() == before
