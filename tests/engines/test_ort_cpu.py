import numpy as np
import onnxruntime as ort
import pytest

from ksampler_rt.engines import EngineError, SpecError, load_engines
from ksampler_rt.engines.ort import OrtCpuEngine, check_providers


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_outputs_match_plain_inference_session(family, tiny_export, tiny_export_xl, cache_root, feeds_for):
    export = tiny_export if family == "sd15" else tiny_export_xl
    rng = np.random.default_rng(0)
    with load_engines(export, backend="onnxruntime-cpu") as es:
        assert (es.clip2 is None) == (family == "sd15")
        for name, eng in es.engines().items():
            assert eng.source.endswith("model.onnx") and "engines" in eng.source  # ran from the cache
            feeds = feeds_for(eng, rng)
            got = eng(**feeds)
            plain = ort.InferenceSession(str(export / f"{name}.onnx"), providers=["CPUExecutionProvider"])
            ref = plain.run(None, feeds)
            assert list(got) == [o.name for o in plain.get_outputs()]
            for g, r in zip(got.values(), ref):
                np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_matches_onnx_reference_evaluator(tiny_export, cache_root, feeds_for):
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(1)
    es = load_engines(tiny_export, backend="onnxruntime-cpu", models=["unet", "vae_decoder"])
    for name in ("unet", "vae_decoder"):
        eng = getattr(es, name)
        feeds = feeds_for(eng, rng, b=1)
        ref = ReferenceEvaluator(str(tiny_export / f"{name}.onnx")).run(None, feeds)
        np.testing.assert_allclose(eng(**feeds)[eng.output_names[0]], ref[0], rtol=1e-4, atol=1e-4)
    es.release()


def test_unet_callable_maps_names_and_broadcasts_timestep(tiny_export_xl, cache_root):
    es = load_engines(tiny_export_xl, backend="onnxruntime-cpu")
    unet = es.unet_callable()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    y = rng.standard_normal((2, 16)).astype(np.float32)
    out = unet(x, 999.0, ctx, y=y)
    direct = es.unet(sample=x, timestep=np.full((2,), 999.0, np.float32), encoder_hidden_states=ctx, y=y)["out"]
    np.testing.assert_array_equal(out, direct)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(unet(x, np.array([999.0, 999.0]), ctx, y=y), direct)
    with pytest.raises(TypeError, match="needs y"):
        unet(x, 1.0, ctx)
    with pytest.raises(TypeError, match="unsupported"):
        unet(x, 1.0, ctx, y=y, mask=object())
    with pytest.raises(TypeError, match="received ControlNet residuals"):
        unet(x, 1.0, ctx, y=y, control={"down": [], "mid": None})
    unet(x, 1.0, ctx, y=y, control=None)  # None kwargs are ignored
    es.release()


def test_lifecycle_release_and_reload(tiny_export, cache_root):
    es = load_engines(tiny_export, backend="onnxruntime-cpu", models=["unet"])
    assert not es.unet.loaded
    with es:
        assert es.unet.loaded and es.unet.session is not None
    assert not es.unet.loaded and es.unet.session is None
    x = np.zeros((1, 4, 8, 8), np.float32)
    es.unet_callable()(x, 1.0, np.zeros((1, 77, 32), np.float32))  # loads on demand
    assert es.unet.loaded
    es.release()


def test_shapes_restrict_the_ort_engine(tiny_export, cache_root):
    es = load_engines(tiny_export, backend="onnxruntime-cpu", shapes="64x64", batch="1-2")
    unet = es.unet_callable()
    unet(np.zeros((2, 4, 8, 8), np.float32), 1.0, np.zeros((2, 77, 32), np.float32))
    with pytest.raises(SpecError, match=r"received shape \(1, 4, 16, 16\).*\(1..2, 4, 8, 8\) \(64x64 static\).*"
                                        r"--shapes 64x64,128x128 --batch 1-2"):
        unet(np.zeros((1, 4, 16, 16), np.float32), 1.0, np.zeros((1, 77, 32), np.float32))


def test_refuses_silent_cpu_fallback():
    class FakeSession:  # what onnxruntime returns when CUDA could not be initialised
        def get_providers(self):
            return ["CPUExecutionProvider"]

    with pytest.raises(EngineError, match="CUDAExecutionProvider.*refusing to fall back"):
        check_providers(FakeSession(), ["CUDAExecutionProvider"], "unet")
    check_providers(FakeSession(), ["CPUExecutionProvider"], "unet")


def test_gpu_backend_unavailable_here_is_a_clear_error(tiny_export, cache_root):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(EngineError, match="onnxruntime-cuda is not available.*onnxruntime-gpu"):
        load_engines(tiny_export, backend="onnxruntime-cuda")


def test_auto_picks_an_available_backend(tiny_export, cache_root):
    from ksampler_rt.engines import available_backends

    avail = available_backends()
    assert avail["onnxruntime-cpu"] is None
    es = load_engines(tiny_export, backend="auto", models=["unet"])
    from ksampler_rt.engines.loader import AUTO_ORDER

    assert AUTO_ORDER == ("tensorrt", "onnxruntime-cuda", "openvino-cpu", "onnxruntime-cpu")
    best = next(b for b in AUTO_ORDER if avail[b] is None)
    assert es.backend == best


def test_thread_and_spinning_options_are_applied(tiny_export, cache_root):
    from ksampler_rt.engines.ort import cpu_session_options

    so = cpu_session_options(threads=3, spinning=False)
    assert so.intra_op_num_threads == 3
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    ref = load_engines(tiny_export, "onnxruntime-cpu", models=["unet"]).unet
    eng = OrtCpuEngine("unet", ref.inputs, ref.outputs, path=tiny_export / "unet.onnx", optimized=False, threads=1)
    with eng:
        assert eng.session.get_session_options().intra_op_num_threads == 1


def test_stale_cached_model_is_detected(tiny_export, cache_root, tmp_path):
    """An engine whose graph IO does not match the export's declared IO is refused on load."""
    from ksampler_rt.engines.spec import TensorSpec

    bad = [TensorSpec("sample", "float32", ("batch", 4, "height", "width"))]
    eng = OrtCpuEngine("unet", bad, [], path=tiny_export / "unet.onnx", optimized=False)
    with pytest.raises(EngineError, match="stale"):
        eng.load()
