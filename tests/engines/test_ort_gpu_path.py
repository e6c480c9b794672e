"""The ONNX Runtime CUDA / TensorRT-EP paths against a mocked onnxruntime-gpu and cuda-python (issue 23).

The fake session computes from the buffers it is bound to and replays a captured graph over the buffers it
captured, so a skipped upload or a stale replay gives a wrong answer, as on a GPU."""
from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from ksampler_rt.engines import ort_cuda
from ksampler_rt.engines.profiles import ProfileRequest, compute_profiles

from fake_gpu import UNET_INPUTS, UNET_OUTPUTS, FakeCuda, fake_onnxruntime, reference, unet_feeds


@pytest.fixture
def fake_ort(monkeypatch):
    ort = fake_onnxruntime()
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    monkeypatch.setattr(ort_cuda, "_PRELOADED", [])
    return ort


@pytest.fixture
def cuda(monkeypatch):
    c = FakeCuda()
    monkeypatch.setattr(ort_cuda, "_cuda_runtime", lambda: c)
    return c


@pytest.fixture
def no_cuda_python(monkeypatch):
    monkeypatch.setattr(ort_cuda, "_cuda_runtime", lambda: None)


def engine(tmp_path, **kw):
    path = tmp_path / "unet.onnx"
    path.write_bytes(b"onnx")
    return ort_cuda.OrtCudaEngine("unet", UNET_INPUTS, UNET_OUTPUTS, path=path, **kw)


def ranged_profiles():
    return compute_profiles("unet", UNET_INPUTS, ProfileRequest(sizes=((64, 64),), batch=(1, 4)))


# --- 5. a CUDA-graph session runs on one thread ---------------------------------------------------------

def test_a_cuda_graph_session_runs_on_one_thread_whoever_calls(tmp_path, fake_ort, cuda):
    eng = engine(tmp_path, cuda_graph=True)
    results = []

    def call(seed):
        f = unet_feeds(np.random.default_rng(seed))
        results.append(np.allclose(eng(**f)["out"], reference(**f), rtol=1e-6))

    with eng:
        for seed in range(3):
            t = threading.Thread(target=call, args=(seed,))
            t.start()
            t.join()
        call(9)  # and the main thread
    session = fake_ort.sessions[-1]
    assert all(results) and len(results) == 4
    assert len(session.threads) == 1 and threading.get_ident() not in session.threads


# --- 6. copies ----------------------------------------------------------------------------------------

def test_pinned_staging_one_stream_one_sync_and_no_reupload_of_the_context(tmp_path, fake_ort, cuda):
    eng = engine(tmp_path, cuda_graph=True)
    rng = np.random.default_rng(0)
    f = unet_feeds(rng)
    with eng:
        eng(**f)
        opts = dict(p for p in fake_ort.sessions[-1].provider_options)["CUDAExecutionProvider"]
        assert opts["user_compute_stream"] == str(eng.stream) and opts["has_user_compute_stream"] == "1"
        assert opts["arena_extend_strategy"] == "kSameAsRequested"
        start = len(cuda.calls)
        for step in range(3):
            f = dict(f, sample=rng.standard_normal(f["sample"].shape).astype(np.float32),
                     timestep=np.full((2,), 800.0 - step, np.float32))
            np.testing.assert_allclose(eng(**f)["out"], reference(**f), rtol=1e-6)  # replays see new inputs
        calls = cuda.calls[start:]
        b = next(iter(eng._buckets.values()))
        assert b.run_options.config["disable_synchronize_execution_providers"] == "1"
    h2d = [c[1] for c in calls if c[0] == "htod"]
    assert h2d == [f["sample"].nbytes, f["timestep"].nbytes] * 3  # never the 77x8 context again
    assert sum(c[0] == "sync" for c in calls) == 3 and sum(c[0] == "dtoh" for c in calls) == 3
    streams = {c[-1] for c in calls if c[0] in ("htod", "dtoh", "sync")}
    assert len(streams) == 1 and 0 not in streams  # one stream, the engine's own (ORT's compute stream)
    assert cuda.count("malloc_host") >= 4  # pinned staging for the 3 inputs and the output


def test_without_cuda_python_unchanged_inputs_are_skipped_too(tmp_path, fake_ort, no_cuda_python):
    eng = engine(tmp_path, cuda_graph=False)
    rng = np.random.default_rng(1)
    f = unet_feeds(rng)
    with eng:
        eng(**f)
        fake_ort.update_inplace_calls.clear()
        f = dict(f, sample=rng.standard_normal(f["sample"].shape).astype(np.float32))
        np.testing.assert_allclose(eng(**f)["out"], reference(**f), rtol=1e-6)
        assert fake_ort.update_inplace_calls == [f["sample"].nbytes]
        f["encoder_hidden_states"][0, 0, 0] += 1.0  # changed in place: uploaded again
        np.testing.assert_allclose(eng(**f)["out"], reference(**f), rtol=1e-6)


# --- 7. CUDA graphs with batch ranges, and more shapes than buckets ---------------------------------------

def test_cuda_graphs_stay_on_with_a_batch_range(tmp_path, tiny_export, cache_root):
    from ksampler_rt.engines import LoadOptions
    from ksampler_rt.engines.backends import LoadJob, get_backend
    from ksampler_rt.engines.cache import EngineCache
    from ksampler_rt.engines.manifest import load_manifest

    m = load_manifest(tiny_export)
    profiles = compute_profiles("unet", m.models["unet"].inputs, ProfileRequest(sizes=((64, 64),), batch=(1, 4)))
    assert not all(p.is_static for p in profiles)
    job = LoadJob(m.models["unet"], tmp_path / "model.onnx", profiles, None, str(tiny_export), LoadOptions(),
                  EngineCache(cache_root))
    assert get_backend("onnxruntime-cuda").make_engine(job).cuda_graph is True


@pytest.mark.parametrize("release", [True, False])
def test_a_ninth_shape_falls_back_instead_of_failing(tmp_path, monkeypatch, cuda, release):
    ort = fake_onnxruntime(release=release)
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    eng = engine(tmp_path, cuda_graph=True, max_buckets=8)
    rng = np.random.default_rng(3)
    with eng:
        for hw in list(range(1, 11)) + [1, 2]:  # ten shapes, then two evicted ones again
            f = unet_feeds(rng, b=1, h=hw, w=hw)
            np.testing.assert_allclose(eng(**f)["out"], reference(**f), rtol=1e-6)
        released = list(ort.sessions[-1].released)
        ids = [b.graph_id for b in eng._buckets.values()]
    assert len(ids) == 8 and eng.stats["buckets_evicted"] == 4
    if release:
        assert released == [0, 1, 2, 3] and len(set(ids)) == 8 and min(ids) >= 4  # fresh ids only
    else:
        assert -1 in ids  # no release call in this onnxruntime: later shapes run without a graph


# --- 8. transformer optimizer fusions; LoRA weights applied before them -----------------------------------

def test_cuda_build_fuses_with_the_transformer_optimizer(tiny_export, tmp_path):
    import onnx

    from ksampler_rt.engines.backends import BuildJob, get_backend
    from ksampler_rt.engines.build import BuildOptions
    from ksampler_rt.engines.manifest import load_manifest
    from ksampler_rt.engines.ort_fusion import fused_op_counts

    m = load_manifest(tiny_export)
    job = BuildJob(m, m.models["unet"], BuildOptions("onnxruntime-cuda"), "fp32", [], {}, None)
    src = get_backend("onnxruntime-cuda").build_source(job, tmp_path)
    assert src.parent == tmp_path and fused_op_counts(onnx.load(str(src))).get("NhwcConv", 0) > 0


def test_fusions_keep_the_outputs_on_the_cpu(tiny_export):
    import onnx
    import onnxruntime as ort

    from ksampler_rt.engines.ort_fusion import fuse

    path = tiny_export / "unet.onnx"
    fused = fuse(str(path), "unet", use_gpu=False)
    feeds = {"sample": np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32),
             "timestep": np.array([1.0, 500.0], np.float32),
             "encoder_hidden_states": np.random.default_rng(1).standard_normal((2, 77, 32)).astype(np.float32)}
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert onnx.checker.check_model(fused) is None


def test_lora_weights_go_in_before_the_fusions(tiny_export, fake_ort, no_cuda_python):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(tiny_export / "unet.onnx"))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    w = next(t for t in model.graph.initializer if t.name == conv.input[1])
    new = np.full(tuple(w.dims), 0.25, np.float32)
    eng = ort_cuda.OrtCudaEngine("unet", UNET_INPUTS, UNET_OUTPUTS, path=tiny_export / "unet.onnx",
                                 cuda_graph=False, fusion="unet", export_dir=str(tiny_export))
    lora = eng.with_weights({w.name: new})
    so = fake_ort.SessionOptions()
    blob, _ = lora._session_source(so)
    fused = onnx.load_from_string(blob)
    nhwc = [numpy_helper.to_array(t) for t in fused.graph.initializer if t.name.endswith("_weight_NHWC")]
    assert any(a.shape == new.transpose(0, 2, 3, 1).shape and np.all(a == 0.25) for a in nhwc)
    assert not any(t.name == w.name for t in fused.graph.initializer)  # the export's name is gone after fusion


# --- 9. preload_dlls, LoRA sessions bounded -----------------------------------------------------------------

def test_cuda_libraries_are_preloaded_before_the_first_session(tmp_path, fake_ort, no_cuda_python):
    order = []
    fake_ort.preload_dlls = lambda *a, **k: order.append("preload")
    base = fake_ort.InferenceSession

    class Session(base):
        def __init__(self, *a, **k):
            order.append("session")
            super().__init__(*a, **k)

    fake_ort.InferenceSession = Session
    with engine(tmp_path, cuda_graph=False):
        pass
    assert order == ["preload", "session"]


def test_lora_sessions_are_bounded(tmp_path, fake_ort, no_cuda_python, tiny_export):
    sessions = ort_cuda.WeightSessions(limit=1)
    base = engine(tmp_path, cuda_graph=False, weight_sessions=sessions, export_dir=str(tiny_export))
    a = ort_cuda.OrtCudaEngine("unet", UNET_INPUTS, UNET_OUTPUTS, path=tmp_path / "unet.onnx", cuda_graph=False,
                               overrides={"x": np.zeros(1, np.float32)}, weight_sessions=sessions)
    b = ort_cuda.OrtCudaEngine("unet", UNET_INPUTS, UNET_OUTPUTS, path=tmp_path / "unet.onnx", cuda_graph=False,
                               overrides={"y": np.zeros(1, np.float32)}, weight_sessions=sessions)
    for e in (a, b):  # overrides are not in the dummy file: skip the initializer swap
        e._session_source = lambda so: (str(tmp_path / "unet.onnx"), None)
    with base:
        a.load()
        b.load()
        assert not a.loaded and b.loaded and len(sessions) == 1
        f = unet_feeds(np.random.default_rng(5))
        np.testing.assert_allclose(a(**f)["out"], reference(**f), rtol=1e-6)  # reloads, evicting b
        assert a.loaded and not b.loaded
    assert sessions.resolve_limit(100) == 1
    free = ort_cuda.WeightSessions()
    assert free.resolve_limit(1 << 30, FakeCuda()) == 4  # half of 8 GiB free / 1 GiB per session


# --- 3. onnxruntime-trt caches the EP's own engines ----------------------------------------------------------

def test_ort_trt_build_caches_the_ep_engines_instead_of_saving_a_model(tiny_export, fake_ort, tmp_path):
    from ksampler_rt.engines.backends import BuildJob, get_backend
    from ksampler_rt.engines.build import BuildOptions
    from ksampler_rt.engines.manifest import load_manifest

    m = load_manifest(tiny_export)
    backend = get_backend("onnxruntime-trt")
    assert backend.shape_bound
    profiles = compute_profiles("unet", m.models["unet"].inputs, ProfileRequest(sizes=((64, 64),)))
    job = BuildJob(m, m.models["unet"], BuildOptions("onnxruntime-trt"), "fp32", profiles, {}, None)
    out = tmp_path / "entry"
    out.mkdir()
    meta = backend.builder(job)(out)
    session = fake_ort.sessions[-1]
    trt_opts = dict(p for p in session.provider_options)["TensorrtExecutionProvider"]
    assert trt_opts["trt_engine_cache_enable"] == "1"
    assert trt_opts["trt_engine_cache_path"] == str(out) and (out / meta["artefact"]).is_file()
    assert "trt_profile_opt_shapes" in trt_opts and not session.options.optimized_model_filepath
    assert any(p.suffix == ".engine" for p in out.iterdir())  # top level: the cache checksums these files


# --- 7. the bench's "cuda-graph" row runs with graphs ---------------------------------------------------------

def test_the_bench_cuda_graph_row_really_uses_graphs(tiny_export, cache_root, fake_ort, no_cuda_python):
    import shutil

    from ksampler_rt.bench.engines import run
    from ksampler_rt.engines.backends import onnxruntime_cuda, register, unregister

    class FakeCudaBackend(onnxruntime_cuda.OnnxRuntimeCuda):
        name = "fake-onnxruntime-cuda"
        auto_priority = None

        def unavailable_reason(self):
            return None

        def builder(self, job):  # no CUDA here: the artefact is the export's file itself
            return lambda tmp: (shutil.copy(job.entry.path, tmp / "model.onnx"), {"artefact": "model.onnx"})[1]

    register(FakeCudaBackend())
    try:
        rows = run(tiny_export, ["fake-onnxruntime-cuda"], [(64, 64)], 2, repeat=2, models=["unet"],
                   log=lambda *_: None)
    finally:
        unregister("fake-onnxruntime-cuda")
    graph_rows = [r for r in rows if r["variant"] == "cuda-graph"]
    assert graph_rows and all(r["graphs"] for r in graph_rows)
    graph_sessions = [s for s in fake_ort.sessions if s.cuda_graph]
    assert graph_sessions and any(gid >= 0 for s in graph_sessions for gid in s.runs)
    assert {r["variant"] for r in rows} >= {"cuda-graph", "no-graph", "no-iobinding"}
    assert not any(r["graphs"] for r in rows if r["variant"] != "cuda-graph")


def test_ort_trt_entry_is_cached_and_loaded_with_its_engine_cache(tiny_export, fake_ort, cache_root):
    from ksampler_rt.engines import LoadOptions
    from ksampler_rt.engines.backends import LoadJob, get_backend
    from ksampler_rt.engines.build import BuildOptions, build_model, model_profiles, profile_request
    from ksampler_rt.engines.cache import EngineCache
    from ksampler_rt.engines.manifest import load_manifest

    m, cache = load_manifest(tiny_export), EngineCache(cache_root)
    env = {"gpu": "X", "compute_capability": "9.0", "driver": "13.0", "cuda": "13.0", "nvidia_driver": "580",
           "onnxruntime": "1.31.1", "tensorrt": "10.13.0"}
    opts = BuildOptions("onnxruntime-trt", sizes=[(64, 64)], batch=(1, 2))
    found = build_model(m, "unet", opts, cache, env)
    assert any(f.endswith(".engine") for f in found.meta["files"])  # checksummed with the entry
    assert cache.lookup(found.components) is not None  # verified: nothing written after publishing
    req = profile_request(m, opts, required=True)
    job = LoadJob(m.models["unet"], found.file(found.meta["artefact"]), model_profiles(m.models["unet"], req), req,
                  str(tiny_export), LoadOptions(), cache)
    eng = get_backend("onnxruntime-trt").make_engine(job)
    assert eng.trt_cache_dir == str(found.path) and eng.path == m.models["unet"].path and eng.tensorrt_ep
