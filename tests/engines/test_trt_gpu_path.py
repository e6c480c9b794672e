"""The TensorRT path against mocked TensorRT 10 / 11 and CUDA objects (issue 23: each test fails on the code
before it). The fakes (fake_gpu.py) compute with real copies, so stale buffers give wrong numbers."""
from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from ksampler_rt.engines import EngineError
from ksampler_rt.engines import trt_backend
from ksampler_rt.engines.cuda import DeviceScratch
from ksampler_rt.engines.spec import TensorSpec

from fake_gpu import UNET_INPUTS, UNET_OUTPUTS, FakeCuda, FakePlan, fake_tensorrt, reference, unet_feeds

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cuda(monkeypatch):
    c = FakeCuda()
    monkeypatch.setattr(trt_backend, "CudaRuntime", lambda: c)
    FakePlan.active.clear()
    FakePlan.overlaps.clear()
    return c


def use_trt(monkeypatch, version="11.0.0", **kw):
    trt = fake_tensorrt(version, **kw)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def engine(tmp_path, scratch=None, **kw):
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"plan")
    return trt_backend.TensorRTEngine("unet", UNET_INPUTS, UNET_OUTPUTS, path=plan, scratch=scratch, **kw)


# --- 1. TensorRT 10 and 11 ---------------------------------------------------------------------------

def test_tensorrt_11_builds_a_strongly_typed_network_without_precision_flags(monkeypatch, tmp_path):
    trt = use_trt(monkeypatch, "11.0.0")
    assert not hasattr(trt.BuilderFlag, "FP16")  # what TensorRT 11 removed
    assert trt_backend.build_plan(tmp_path / "unet.onnx", [], "fp16", "9.0") == b"plan"
    net_flags, config_flags, pinned = trt.built[-1]
    assert net_flags & (1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert not set(config_flags) & {"FP16", "BF16", "INT8", "FP8"} and pinned == []


def test_tensorrt_10_keeps_the_flag_path_and_pins_the_exports_fp32_layers(monkeypatch, tmp_path):
    trt = use_trt(monkeypatch, "10.13.0")
    trt_backend.build_plan(tmp_path / "unet.onnx", [], "fp16", "8.9")
    net_flags, config_flags, pinned = trt.built[-1]
    assert net_flags == 0 and "FP16" in config_flags
    # the export's fp16 graph keeps its upcast attention in fp32: the FP16 flag must not take it
    assert pinned == ["attn_upcast"] and "OBEY_PRECISION_CONSTRAINTS" in config_flags
    trt.OnnxParser.layer_types = [("conv", "float32"), ("out", "float32")]  # an fp32 export asked to be fp16
    trt_backend.build_plan(tmp_path / "unet.onnx", [], "fp16", "8.9")
    assert trt.built[-1][2] == [] and "OBEY_PRECISION_CONSTRAINTS" not in trt.built[-1][1]


def test_supported_majors_match_the_pin(monkeypatch):
    pin = re.search(r'"tensorrt([^"]*)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert pin == ">=10,<12" and trt_backend.SUPPORTED_MAJORS == (10, 11)
    use_trt(monkeypatch, "12.0.1")
    with pytest.raises(EngineError, match=r"tensorrt: received version 12\.0\.1, expected a major version in 10, 11"):
        trt_backend.import_tensorrt()


# --- 2. precision from the export --------------------------------------------------------------------

def test_precision_comes_from_the_export(monkeypatch, tiny_export):
    from ksampler_rt.engines.backends import get_backend
    from ksampler_rt.engines.backends import tensorrt as trt_mod
    from ksampler_rt.engines.manifest import load_manifest

    b = get_backend("tensorrt")
    monkeypatch.setattr(trt_mod, "module_version", lambda name: "10.13.0")
    assert b.resolve_precision("fp32", None) == "fp32"  # was fp16 whatever the export said
    assert b.resolve_precision("fp16", None) == "fp16"
    assert b.resolve_precision("fp32", "fp16") == "fp16"  # TensorRT 10 may still convert on request
    manifest = load_manifest(tiny_export)
    manifest.data["precision"] = "fp16"  # an fp16 export whose VAE the exporter kept in fp32 (fp32 IO)
    assert b.model_precision("fp16", manifest.models["vae_decoder"], manifest) == "fp32"
    monkeypatch.setattr(trt_mod, "module_version", lambda name: "11.0.0")
    with pytest.raises(EngineError, match=r"precision: received 'fp16', expected the export's own precision 'fp32'"):
        b.resolve_precision("fp32", "fp16")
    from ksampler_rt.engines.build import BuildOptions

    assert b.key_options(BuildOptions("tensorrt"))["strongly_typed"] is True


def test_the_cache_key_records_the_precision_built(monkeypatch, tiny_export, cache_root):
    """build_model keys an fp16 export's fp32 VAE as fp32 (what TensorRT builds), its UNet as fp16."""
    from ksampler_rt.engines import build as build_mod
    from ksampler_rt.engines.backends import tensorrt as trt_mod
    from ksampler_rt.engines.cache import EngineCache
    from ksampler_rt.engines.manifest import load_manifest

    monkeypatch.setattr(trt_mod, "module_version", lambda name: "10.13.0")
    seen = {}

    def fake_builder(self, job):
        seen[job.entry.name] = job.precision
        return lambda tmp: ((tmp / "engine.plan").write_bytes(b"plan"), {"artefact": "engine.plan"})[1]

    monkeypatch.setattr(trt_mod.TensorRT, "builder", fake_builder)
    manifest = load_manifest(tiny_export)
    manifest.data["precision"] = "fp16"
    unet = manifest.models["unet"]
    unet.inputs = [TensorSpec(s.name, "float16", s.shape) for s in unet.inputs]  # exported in fp16
    env = {"gpu": "X", "compute_capability": "8.9", "cuda": "12.8", "tensorrt": "10.13.0"}
    opts = build_mod.BuildOptions("tensorrt", sizes=[(64, 64)])
    cache = EngineCache(cache_root)
    vae = build_mod.build_model(manifest, "vae_decoder", opts, cache, env)
    un = build_mod.build_model(manifest, "unet", opts, cache, env)
    assert seen == {"vae_decoder": "fp32", "unet": "fp16"}
    assert vae.components["precision"] == "fp32" and un.components["precision"] == "fp16"


# --- 4. refit ------------------------------------------------------------------------------------------

def test_refit_supplies_the_weights_tensorrt_reports_missing(monkeypatch, tmp_path, cuda, tiny_export):
    use_trt(monkeypatch, cuda=cuda, refit_names=("conv.w", "conv.b", "proj.w"), combined={"conv.w": ["conv.b"]})
    eng = engine(tmp_path, export_dir=str(tiny_export))
    eng._base_weights = {"conv.b": np.arange(4, dtype=np.float32)}  # the export's value of the combined bias
    new_w = np.ones((4, 4), np.float32)
    with eng:
        eng.refit({"conv.w": new_w})
        plan = eng.engine
        np.testing.assert_array_equal(plan.weights["conv.w"], new_w)
        np.testing.assert_array_equal(plan.weights["conv.b"], np.arange(4, dtype=np.float32))
        with pytest.raises(EngineError, match=r"refit weights: received \['lora.q'\], expected names the plan can "
                                              r"refit \(3 listed by Refitter.get_all_weights\(\)"):
            eng.refit({"lora.q": new_w})
        eng._base_weights = {}
        with pytest.raises(EngineError, match=r"refit needs weights \['conv.b'\]"):
            eng.refit({"conv.w": new_w})


def test_plain_plans_are_preferred_by_default():
    from ksampler_rt.engines import LoadOptions
    from ksampler_rt.engines.backends import get_backend
    from ksampler_rt.engines.build import BuildOptions

    candidates = get_backend("tensorrt").lookup_options(BuildOptions("tensorrt"), LoadOptions())
    assert [c.refit for c in candidates] == [False, True]  # plain first, and the plain one is built
    assert [c.refit for c in get_backend("tensorrt").lookup_options(BuildOptions("tensorrt", refit=True),
                                                                   LoadOptions(refit=True))] == [True]


# --- 5. threads ----------------------------------------------------------------------------------------

def test_engines_sharing_a_scratch_never_run_on_it_at_once(monkeypatch, tmp_path, cuda):
    use_trt(monkeypatch, cuda=cuda)
    scratch = DeviceScratch(cuda)
    a, b = engine(tmp_path, scratch, cuda_graph=False), engine(tmp_path, scratch, cuda_graph=False)
    errors = []

    def work(eng, seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(15):
                f = unet_feeds(rng)
                np.testing.assert_allclose(eng(**f)["out"], reference(**f), rtol=1e-6)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with a, b:
        threads = [threading.Thread(target=work, args=(e, i)) for i, e in enumerate((a, b, a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and FakePlan.overlaps == []


# --- 6. copies -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("graph", [False, True])
def test_only_changed_inputs_are_uploaded_and_one_sync_per_call(monkeypatch, tmp_path, cuda, graph):
    use_trt(monkeypatch, cuda=cuda)
    eng = engine(tmp_path, cuda_graph=graph)
    rng = np.random.default_rng(0)
    f = unet_feeds(rng)
    with eng:
        eng(**f)
        before = [c for c in cuda.calls if c[0] in ("htod", "sync")]
        for step in range(3):  # a sampling loop: new latents, new timestep, the same text context
            f = dict(f, sample=rng.standard_normal(f["sample"].shape).astype(np.float32),
                     timestep=np.full((2,), 900.0 - 100 * step, np.float32))
            np.testing.assert_allclose(eng(**f)["out"], reference(**f), rtol=1e-6)  # never a stale replay
        calls = [c for c in cuda.calls if c[0] in ("htod", "sync")][len(before):]
    ctx_bytes = f["encoder_hidden_states"].nbytes
    assert [c[1] for c in calls if c[0] == "htod"] == [f["sample"].nbytes, f["timestep"].nbytes] * 3
    assert ctx_bytes not in [c[1] for c in calls if c[0] == "htod"]
    assert sum(c[0] == "sync" for c in calls) == 3
    assert eng.stats["h2d_skipped"] >= 3
    if graph:
        assert eng.stats["graph_replays"] == 3 and eng.stats["graph_captures"] == 1


def test_context_changed_in_place_is_uploaded(monkeypatch, tmp_path, cuda):
    use_trt(monkeypatch, cuda=cuda)
    eng = engine(tmp_path)
    f = unet_feeds(np.random.default_rng(1))
    with eng:
        eng(**f)
        f["encoder_hidden_states"] += 1.0  # same array object, new values
        np.testing.assert_allclose(eng(**f)["out"], reference(**f), rtol=1e-6)


# --- 7. more shapes than buckets -----------------------------------------------------------------------

def test_a_ninth_shape_evicts_the_least_recently_used_bucket(monkeypatch, tmp_path, cuda):
    use_trt(monkeypatch, cuda=cuda)
    eng = engine(tmp_path, max_buckets=8)
    rng = np.random.default_rng(2)
    with eng:
        for hw in range(1, 11):
            f = unet_feeds(rng, b=1, h=hw, w=hw)
            np.testing.assert_allclose(eng(**f)["out"], reference(**f), rtol=1e-6)
        f = unet_feeds(rng, b=1, h=1, w=1)  # evicted earlier: rebuilt, not replayed from freed buffers
        np.testing.assert_allclose(eng(**f)["out"], reference(**f), rtol=1e-6)
        assert len(eng._buckets) == 8 and eng.stats["buckets_evicted"] == 3


# --- 9. the cache key -----------------------------------------------------------------------------------

def test_tensorrt_key_has_the_exporter_revision_and_no_driver(tiny_export):
    from ksampler_rt.engines.backends import environment
    from ksampler_rt.engines.build import BuildOptions, key_components
    from ksampler_rt.engines.manifest import load_manifest

    assert not {"driver", "nvidia_driver"} & set(environment("tensorrt"))
    m = load_manifest(tiny_export)
    entry = m.models["unet"]
    env = {"gpu": "X", "compute_capability": "9.0", "cuda": "12.8", "tensorrt": "10.13.0"}
    m.data["exporter_revision"] = 3
    k3 = key_components(m, entry, BuildOptions("tensorrt"), "fp32", [], env)
    m.data["exporter_revision"] = 4
    k4 = key_components(m, entry, BuildOptions("tensorrt"), "fp32", [], env)
    assert k3["options"]["exporter_revision"] == 3 and k3 != k4


def test_default_build_takes_prompts_past_75_tokens(tiny_export):
    from ksampler_rt.engines.build import BuildOptions, profile_request
    from ksampler_rt.engines.manifest import load_manifest

    req = profile_request(load_manifest(tiny_export), BuildOptions("tensorrt"), required=True)
    assert req.tokens == (77, 231)


def test_same_values_sees_a_change_the_probe_skips():
    from ksampler_rt.engines.cuda import same_values

    held = np.zeros((2, 77, 8), np.float32)
    new = held.copy()
    assert same_values(held, new)
    new[1, 40, 3] = 1e-7  # not on the 64-element probe's stride
    assert not same_values(held, new)
    assert not same_values(held, held.astype(np.float16)) and not same_values(held, held[:1])
    nan = np.full(4, np.nan, np.float32)
    assert not same_values(nan, nan.copy())  # NaN is never "unchanged": uploaded again, safely
