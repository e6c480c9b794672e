"""The openvino-cpu backend against ONNX Runtime CPU on the tiny hand-built exports (no GPU, no torch).

Every test that runs OpenVINO takes the ``ov`` fixture, which skips cleanly when ``openvino`` is not
installed (``pip install 'ksampler-rt[openvino]'``); the "not installed" messages are tested without it.
"""
import importlib.util
import json
import sys

import numpy as np
import pytest

from ksampler_rt.engines import (BuildOptions, CacheCorruptError, EngineCache, EngineError, SpecError,
                                 build_engines, load_engines)
from ksampler_rt.engines.envinfo import environment

RTOL = ATOL = 1e-4  # fp32 on both sides; measured differences are ~1e-6


@pytest.fixture
def ov():
    return pytest.importorskip("openvino")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_model_matches_onnxruntime_cpu(ov, family, tiny_export, tiny_export_xl, cache_root, feeds_for):
    export = tiny_export if family == "sd15" else tiny_export_xl
    rng = np.random.default_rng(0)
    with load_engines(export, "openvino-cpu") as es, load_engines(export, "onnxruntime-cpu") as ref:
        assert es.backend == "openvino-cpu"
        names = set(es.engines())
        assert {"unet", "clip", "vae_decoder", "vae_encoder"} <= names
        for name in names:
            eng, ort_eng = getattr(es, name), getattr(ref, name)
            assert type(eng).__name__ == "OpenVinoCpuEngine" and eng.source.endswith("model.xml")
            for b, hw in ((1, 8), (2, 16)):
                feeds = feeds_for(eng, rng, b=b, h=hw, w=hw)
                got, want = eng(**feeds), ort_eng(**feeds)
                assert list(got) == eng.output_names
                for k in want:
                    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
                    np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=f"{name}.{k}")


def test_compiles_per_shape_signature_with_a_bounded_lru(ov, tiny_export, cache_root):
    es = load_engines(tiny_export, "openvino-cpu", models=["unet"])
    unet = es.unet
    unet.max_compiled = 2
    call = es.unet_callable()
    rng = np.random.default_rng(1)

    def run(b, hw):
        x = rng.standard_normal((b, 4, hw, hw)).astype(np.float32)
        ctx = rng.standard_normal((b, 77, 32)).astype(np.float32)
        out = call(x, 500.0, ctx)
        assert out.shape == x.shape
        return out

    run(2, 8)
    run(2, 8)
    assert unet.compiles == 1  # same signature: the compiled model (and its request) is reused
    run(1, 8)   # another batch
    assert unet.compiles == 2
    run(2, 8)   # a hit makes batch 2 the most recently used
    assert unet.compiles == 2
    run(2, 16)  # another resolution: the least recently used signature (batch 1) is dropped
    assert unet.compiles == 3 and len(unet.signatures) == 2
    assert [dict(s)["sample"] for s in unet.signatures] == [(2, 4, 8, 8), (2, 4, 16, 16)]
    run(1, 8)
    assert unet.compiles == 4 and len(unet.signatures) == 2
    unet.release()
    assert not unet.loaded and unet.signatures == [] and unet.ov_model is None
    run(1, 8)  # reloads on demand
    assert unet.loaded and unet.compiles == 5


def test_outputs_are_owned_by_the_caller(ov, tiny_export, cache_root):
    es = load_engines(tiny_export, "openvino-cpu", models=["unet", "vae_decoder"])
    z = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    first = es.vae_decoder(latent=z)["image"]
    keep = first.copy()
    es.vae_decoder(latent=-z)  # the same InferRequest runs again
    np.testing.assert_array_equal(first, keep)
    first[...] = 0  # writable, and writing does not disturb the engine
    np.testing.assert_array_equal(es.vae_decoder(latent=z)["image"], keep)


def test_validation_names_what_was_received(ov, tiny_export, cache_root):
    es = load_engines(tiny_export, "openvino-cpu", models=["unet", "clip"])
    x = np.zeros((1, 4, 8, 8), np.float32)
    ctx = np.zeros((1, 77, 32), np.float32)
    t = np.ones((1,), np.float32)
    with pytest.raises(SpecError, match="float64.*float32"):
        es.unet(sample=x.astype(np.float64), timestep=t, encoder_hidden_states=ctx)
    with pytest.raises(SpecError, match="latents"):
        es.unet(latents=x, timestep=t, encoder_hidden_states=ctx)
    with pytest.raises(SpecError, match="int32.*int64"):
        es.clip(input_ids=np.zeros((1, 77), np.int32))
    assert es.unet.compiles == 0  # nothing reached OpenVINO


def test_shapes_restrict_the_openvino_engine(ov, tiny_export, cache_root):
    es = load_engines(tiny_export, "openvino-cpu", shapes="64x64", batch="1-2", models=["unet"])
    unet = es.unet_callable()
    unet(np.zeros((2, 4, 8, 8), np.float32), 1.0, np.zeros((2, 77, 32), np.float32))
    with pytest.raises(SpecError, match=r"received shape \(1, 4, 16, 16\).*--backend openvino-cpu --shapes"):
        unet(np.zeros((1, 4, 16, 16), np.float32), 1.0, np.zeros((1, 77, 32), np.float32))


def test_compile_settings(ov, tiny_export, cache_root, monkeypatch):
    monkeypatch.setenv("KSAMPLER_RT_ORT_THREADS", "1")
    es = load_engines(tiny_export, "openvino-cpu", models=["unet"])
    cfg = es.unet.config()
    assert cfg == {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                   "ENABLE_CPU_PINNING": False}
    assert load_engines(tiny_export, "openvino-cpu", models=["unet"], threads=3).unet.config()[
        "INFERENCE_NUM_THREADS"] == 3
    es.unet_callable()(np.zeros((1, 4, 8, 8), np.float32), 1.0, np.zeros((1, 77, 32), np.float32))
    (c,) = es.unet._compiled.values()
    assert np.dtype(c.compiled.get_property("INFERENCE_PRECISION_HINT").to_dtype()) == np.float32
    assert int(c.compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    assert c.compiled.get_property("ENABLE_CPU_PINNING") is False


def test_build_then_load_from_the_cache(ov, tiny_export, cache_root):
    built = build_engines(tiny_export, BuildOptions(backend="openvino-cpu"), cache=EngineCache(cache_root))
    assert set(built) == {"unet", "clip", "vae_decoder", "vae_encoder"}
    e = built["unet"]
    side = json.loads((e.path / "entry.json").read_text())
    assert set(side["files"]) == {"model.xml", "model.bin"} and side["artefact"] == "model.xml"
    assert side["components"]["backend"] == "openvino-cpu" and side["components"]["precision"] == "fp32"
    assert side["components"]["openvino"] == ov.get_version() and side["components"]["isa"] is not None
    assert e.path.name.startswith("unet-openvino-cpu-")
    # fp32 stays fp32: the IR's weights are as large as the export's
    assert (e.path / "model.bin").stat().st_size > 0.9 * sum(
        a.nbytes for a in _onnx_initializers(tiny_export / "unet.onnx").values())
    mtime = (e.path / "model.bin").stat().st_mtime_ns
    # a fresh load finds the entry (nothing rebuilt, build_missing=False would raise otherwise)
    es = load_engines(tiny_export, "openvino-cpu", build_missing=False)
    assert es.unet.path == e.path / "model.xml" and (e.path / "model.bin").stat().st_mtime_ns == mtime
    x = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ctx = np.zeros((1, 77, 32), np.float32)
    ref = load_engines(tiny_export, "onnxruntime-cpu", models=["unet"]).unet_callable()(x, 10.0, ctx)
    np.testing.assert_allclose(es.unet_callable()(x, 10.0, ctx), ref, rtol=RTOL, atol=ATOL)


def test_cli_build_and_list(ov, tiny_export, cache_root, capsys):
    from ksampler_rt.cli import main

    assert main(["build", str(tiny_export), "--backend", "openvino-cpu", "--models", "unet"]) == 0
    assert "1 engine(s) ready for openvino-cpu" in capsys.readouterr().out
    assert main(["engines", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["entries"]
    assert [(r["model"], r["backend"], r["status"]) for r in rows] == [("unet", "openvino-cpu", "ok")]
    # issue 25: bf16 / fp16 / int8 are openvino-cpu precisions now (tests/engines/test_precision.py); fp8 is not
    assert main(["build", str(tiny_export), "--backend", "openvino-cpu", "--precision", "fp8"]) == 2
    assert ("precision: received 'fp8' for openvino-cpu, expected one of fp32, bf16, fp16, int8"
            in capsys.readouterr().err)


@pytest.mark.parametrize("victim", ["model.bin", "model.xml"])
def test_corrupt_ir_is_refused_with_the_rebuild_command(ov, victim, tiny_export, cache_root):
    e = build_engines(tiny_export, BuildOptions(backend="openvino-cpu"), models=["unet"],
                      cache=EngineCache(cache_root))["unet"]
    f = e.path / victim
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError) as ei:
        load_engines(tiny_export, "openvino-cpu", models=["unet"])
    msg = str(ei.value)
    assert str(f) in msg and "checksum" in msg
    assert f"ksampler-rt build {tiny_export} --backend openvino-cpu" in msg and "--force" in msg
    build_engines(tiny_export, BuildOptions(backend="openvino-cpu", force=True), models=["unet"],
                  cache=EngineCache(cache_root))  # the advertised fix works
    load_engines(tiny_export, "openvino-cpu", models=["unet"])


def test_foreign_openvino_version_is_a_miss(ov, tiny_export, cache_root):
    cache = EngineCache(cache_root)
    e = build_engines(tiny_export, BuildOptions(backend="openvino-cpu"), models=["unet"], cache=cache)["unet"]
    meta = json.loads((e.path / "entry.json").read_text())
    here = environment("openvino-cpu")
    assert meta["components"]["openvino"] == here["openvino"]
    other = {**here, "openvino": "2020.1.0"}
    from ksampler_rt.engines.cache import ForeignEngineError

    entry = cache.read_entry(e.path)
    entry.check_environment(here)
    with pytest.raises(ForeignEngineError, match="OpenVINO 2026.*openvino"):
        entry.check_environment(other)


def _onnx_initializers(path):
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_with_weights_matches_onnxruntime(ov, tiny_export, cache_root):
    inits = _onnx_initializers(tiny_export / "unet.onnx")
    rng = np.random.default_rng(4)
    overrides = {n: inits[n] + 0.2 * rng.standard_normal(inits[n].shape).astype(np.float32)
                 for n in ("conv0.w", "conv1.b", "q.w", "o.w")}
    es = load_engines(tiny_export, "openvino-cpu", models=["unet"])
    ref = load_engines(tiny_export, "onnxruntime-cpu", models=["unet"])
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    base = es.unet_callable()(x, 300.0, ctx)
    patched_engine = es.unet.with_weights(overrides)
    assert patched_engine is not es.unet and es.unet.with_weights({}) is es.unet
    assert "(+4 overridden weights)" in patched_engine.source
    got = es.unet_callable(patched_engine)(x, 300.0, ctx)
    want = ref.unet_callable(ref.unet.with_weights(overrides))(x, 300.0, ctx)
    assert np.abs(got - base).max() > 1e-2  # the weights did change the result
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(es.unet_callable()(x, 300.0, ctx), base)  # the base engine is untouched
    with pytest.raises(EngineError, match="no weight"):
        es.unet.with_weights({"nope.w": np.zeros(3, np.float32)}).load()
    with pytest.raises(EngineError, match="shape"):
        es.unet.with_weights({"q.w": np.zeros((3, 3), np.float32)}).load()


def test_ksampler_run_matches_onnxruntime(ov, tiny_export, cache_root):
    from ksampler_rt.runtime import Model, ksampler

    rng = np.random.default_rng(5)
    pos = [[rng.standard_normal((1, 77, 32)).astype(np.float32), {}]]
    neg = [[rng.standard_normal((1, 77, 32)).astype(np.float32), {}]]
    latent = {"samples": np.zeros((1, 4, 8, 8), np.float32)}
    out = {}
    for backend in ("openvino-cpu", "onnxruntime-cpu"):
        es = load_engines(tiny_export, backend, models=["unet"])
        out[backend] = ksampler(Model(es.unet_callable(), "sd15"), 42, 6, 7.0, "euler_ancestral", "karras",
                                pos, neg, latent)["samples"]
        es.release()
    a, b = out["openvino-cpu"], out["onnxruntime-cpu"]
    assert np.isfinite(a).all() and np.abs(a).max() > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def test_auto_prefers_openvino_over_onnxruntime_cpu(ov, tiny_export, cache_root):
    from ksampler_rt.engines import available_backends
    from ksampler_rt.engines.loader import AUTO_ORDER, pick_backend

    assert AUTO_ORDER.index("openvino-cpu") < AUTO_ORDER.index("onnxruntime-cpu")
    avail = available_backends()
    assert avail["openvino-cpu"] is None
    if avail["tensorrt"] is None or avail["onnxruntime-cuda"] is None:
        pytest.skip("a GPU backend comes first here")
    assert pick_backend("auto") == "openvino-cpu"


def test_not_installed_is_a_clear_reason(monkeypatch, tiny_export, cache_root):
    """Pure logic, runs without openvino: what a user without the extra is told."""
    from ksampler_rt.engines import available_backends, openvino_backend

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else real(n, *a))
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    reason = available_backends()["openvino-cpu"]
    assert reason == "openvino is not installed (pip install 'ksampler-rt[openvino]')"
    with pytest.raises(EngineError, match=r"backend openvino-cpu is not available: openvino is not installed"):
        load_engines(tiny_export, "openvino-cpu")
    with pytest.raises(EngineError, match=r"pip install 'ksampler-rt\[openvino\]'"):
        openvino_backend.import_openvino()
    assert environment("openvino-cpu")["openvino"] is None


def test_model_cache_dir_setting(monkeypatch, tmp_path):
    from ksampler_rt.engines.openvino_backend import model_cache_dir

    monkeypatch.delenv("KSAMPLER_RT_OV_MODEL_CACHE", raising=False)
    assert model_cache_dir(tmp_path) is None
    monkeypatch.setenv("KSAMPLER_RT_OV_MODEL_CACHE", "1")
    assert model_cache_dir(tmp_path) == str(tmp_path / "openvino")
    monkeypatch.setenv("KSAMPLER_RT_OV_MODEL_CACHE", str(tmp_path / "elsewhere"))
    assert model_cache_dir(tmp_path) == str(tmp_path / "elsewhere")
    monkeypatch.setenv("KSAMPLER_RT_OV_MODEL_CACHE", "0")
    assert model_cache_dir(tmp_path) is None


def test_model_cache_when_enabled(ov, tiny_export, cache_root, monkeypatch):
    monkeypatch.setenv("KSAMPLER_RT_OV_MODEL_CACHE", "1")
    es = load_engines(tiny_export, "openvino-cpu", models=["unet"])
    assert es.unet.config()["CACHE_DIR"] == str(cache_root / "openvino")
    es.unet_callable()(np.zeros((1, 4, 8, 8), np.float32), 1.0, np.zeros((1, 77, 32), np.float32))
    assert any((cache_root / "openvino").iterdir())


def test_max_compiled_setting(monkeypatch):
    """Pure logic, runs without openvino: the LRU bound's default and its environment override."""
    from ksampler_rt.engines.openvino_backend import default_max_compiled

    monkeypatch.delenv("KSAMPLER_RT_OV_MAX_COMPILED", raising=False)
    assert default_max_compiled() == 2
    monkeypatch.setenv("KSAMPLER_RT_OV_MAX_COMPILED", "5")
    assert default_max_compiled() == 5
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("KSAMPLER_RT_OV_MAX_COMPILED", bad)
        with pytest.raises(EngineError, match=r"KSAMPLER_RT_OV_MAX_COMPILED: received .*expected a positive integer"):
            default_max_compiled()
