"""Pure logic of the TensorRT path (no GPU, nothing is built or run), plus the real GPU tests (marked)."""
import sys
import types

import numpy as np
import pytest

from ksampler_rt.engines import EngineError
from ksampler_rt.engines.profiles import ProfileRequest, compute_profiles
from ksampler_rt.engines.spec import TensorSpec
from ksampler_rt.engines.trt_backend import import_tensorrt, precision_flags, profile_shapes


def test_precision_gating():
    assert precision_flags("fp16", "7.5") == ["FP16"]
    assert precision_flags("fp32", "7.5") == []
    assert precision_flags("bf16", "8.0") == ["BF16"]
    with pytest.raises(EngineError, match="bf16 needs an Ampere"):
        precision_flags("bf16", "7.5")
    with pytest.raises(EngineError, match="fp8 needs compute capability >= 8.9"):
        precision_flags("fp8", "8.6", quantized_export=True)
    assert precision_flags("fp8", "9.0", quantized_export=True) == ["FP8", "FP16"]
    with pytest.raises(EngineError, match="Q/DQ"):
        precision_flags("int8", "9.0")
    assert precision_flags("fp16", "9.0", strongly_typed=True) == []
    with pytest.raises(EngineError, match=r"precision: received 'fp4', expected one of fp32, fp16, bf16, fp8, int8"):
        precision_flags("fp4", "9.0")


def test_profile_shapes_for_the_builder():
    specs = [TensorSpec("sample", "float32", ("batch", 4, "height", "width")),
             TensorSpec("timestep", "float32", ("batch",)),
             TensorSpec("encoder_hidden_states", "float32", ("batch", "tokens", 768))]
    shapes = profile_shapes(compute_profiles("unet", specs, ProfileRequest(sizes=((512, 512), (1024, 768)))))
    assert shapes[0]["sample"] == ((1, 4, 64, 64), (2, 4, 64, 64), (4, 4, 64, 64))
    assert shapes[1]["sample"] == ((1, 4, 96, 128), (2, 4, 96, 128), (4, 4, 96, 128))
    assert shapes[1]["timestep"] == ((1,), (2,), (4,))


def test_missing_tensorrt_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    with pytest.raises(EngineError, match=r"pip install ksampler-rt\[tensorrt\]"):
        import_tensorrt()


def test_old_tensorrt_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(EngineError, match="too old"):
        import_tensorrt()


# --- real GPU tests: skipped without TensorRT + a GPU --------------------------------------------------

def _feeds(eng, rng, b=1, hw=8):
    out = {}
    for s in eng.inputs:
        if s.dtype == "int64":
            out[s.name] = rng.integers(0, 60, size=(b, 77)).astype(np.int64)
        else:
            shape = [b if k == 0 else (d if isinstance(d, int) else (77 if d == "tokens" else hw))
                     for k, d in enumerate(s.shape)]
            out[s.name] = rng.standard_normal(shape).astype(s.dtype)
    return out


@pytest.mark.tensorrt
def test_trt_build_load_and_parity_with_ort_cpu(tiny_export, cache_root):
    from ksampler_rt.engines import load_engines
    from ksampler_rt.engines.cli import main

    assert main(["build", str(tiny_export), "--backend", "tensorrt", "--shapes", "64x64", "--batch", "1-2",
                 "--models", "unet,vae_decoder"]) == 0
    trt_set = load_engines(tiny_export, "tensorrt", shapes="64x64", batch="1-2", models=["unet", "vae_decoder"])
    cpu_set = load_engines(tiny_export, "onnxruntime-cpu", models=["unet", "vae_decoder"])
    rng = np.random.default_rng(0)
    with trt_set, cpu_set:
        for name in ("unet", "vae_decoder"):
            feeds = _feeds(cpu_set.engines()[name], rng)
            a = trt_set.engines()[name](**feeds)
            b = cpu_set.engines()[name](**feeds)
            for k in b:
                np.testing.assert_allclose(a[k], b[k], rtol=2e-2, atol=2e-2)  # fp16 tolerance


@pytest.mark.tensorrt
def test_trt_cuda_graph_replay_equals_plain_call(tiny_export, cache_root):
    from ksampler_rt.engines import build_engines, BuildOptions, load_engines

    build_engines(tiny_export, BuildOptions("tensorrt", sizes=[(64, 64)], batch=(1, 2)), models=["unet"])
    graph = load_engines(tiny_export, "tensorrt", shapes="64x64", batch="1-2", models=["unet"], cuda_graph=True)
    plain = load_engines(tiny_export, "tensorrt", shapes="64x64", batch="1-2", models=["unet"], cuda_graph=False)
    feeds = _feeds(plain.unet, np.random.default_rng(1))
    with graph, plain:
        ref = plain.unet(**feeds)["out"]
        for _ in range(3):  # capture, then replays
            np.testing.assert_array_equal(graph.unet(**feeds)["out"], ref)


@pytest.mark.tensorrt
def test_trt_cache_reused_across_processes(tiny_export, cache_root):
    import subprocess

    cmd = [sys.executable, "-m", "ksampler_rt.cli", "build", str(tiny_export), "--backend", "tensorrt",
           "--shapes", "64x64", "--models", "unet"]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    second = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "building" in first and "cached" in second


@pytest.mark.gpu
def test_ort_cuda_io_binding_and_graph_match_cpu(tiny_export, cache_root):
    from ksampler_rt.engines import load_engines

    gpu = load_engines(tiny_export, "onnxruntime-cuda", shapes="64x64", batch="1", models=["unet"])
    cpu = load_engines(tiny_export, "onnxruntime-cpu", models=["unet"])
    feeds = _feeds(cpu.unet, np.random.default_rng(2))
    with gpu, cpu:
        ref = cpu.unet(**feeds)["out"]
        for _ in range(3):
            np.testing.assert_allclose(gpu.unet(**feeds)["out"], ref, rtol=1e-3, atol=1e-3)
