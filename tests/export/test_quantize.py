"""Quantized (Q/DQ) exports for TensorRT's explicit quantization (``ksampler_rt.export.quantize``) on the tiny
SD1.5 export: the graph's Q/DQ placement and arithmetic, the manifest, atomic output, the CPU (simulated) run
and its quality, and the TensorRT precision gate (pure logic, no GPU)."""
from __future__ import annotations

import filecmp
import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("onnxruntime.quantization")
onnx = pytest.importorskip("onnx")

from ksampler_rt.engines import EngineError  # noqa: E402
from ksampler_rt.engines.precision import QUALITY_BOUNDS, ort_session_configs, quantized_model  # noqa: E402
from ksampler_rt.export import quantize as Q  # noqa: E402
from ksampler_rt.export.errors import ExportError  # noqa: E402

SIZE = 64  # pixels: 8x8 latents
RECIPE = Q.CalibrationRecipe(width=SIZE, height=SIZE, steps=3, seeds=(0,))


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from ksampler_rt.demo import prepare_tiny_checkpoint

    return Path(prepare_tiny_checkpoint(tmp_path_factory.mktemp("models"), log=lambda *a: None))


@pytest.fixture(scope="module")
def quantized(fp32_export, tmp_path_factory):
    """{mode: (export dir, QuantizeResult)}, built once."""
    root = tmp_path_factory.mktemp("quantized")
    return {m: (root / m, Q.quantize_export(fp32_export, root / m, m, recipe=RECIPE, log=lambda *a: None))
            for m in Q.MODES}


def _graph(path):
    m = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    return m, inits, producer


# --- the graph -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, zp_type", [("fp8", onnx.TensorProto.FLOAT8E4M3FN), ("int8", onnx.TensorProto.INT8)])
def test_denoiser_layers_take_dequantized_inputs_with_zero_zero_points(quantized, fp32_export, mode, zp_type):
    out, _ = quantized[mode]
    m, inits, producer = _graph(out / "unet.onnx")
    assert (m.ir_version, [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")]) == (9, [19])
    raw = {i.name: i for i in m.graph.initializer}
    src = onnx.load(str(fp32_export / "unet.onnx"))
    src_inits = {i.name for i in src.graph.initializer}
    # the layers TensorRT runs quantized: every Conv and Gemm, every MatMul with a weight (not attention's)
    wanted = {n.name for n in src.graph.node if n.op_type in ("Conv", "Gemm")
              or n.op_type == "MatMul" and n.input[1] in src_inits}
    weighted = [n for n in m.graph.node if n.name in wanted]
    assert len(weighted) == len(wanted) >= 30
    for n in weighted:
        for name in n.input[:2]:
            dq = producer.get(name)
            assert dq is not None and dq.op_type == "DequantizeLinear", f"{n.name}: input {name} not dequantized"
            assert raw[dq.input[2]].data_type == zp_type
            assert not np.any(inits[dq.input[2]].astype(np.float32)), "TensorRT needs symmetric (zero) zero points"
        if len(n.input) > 2:  # the bias stays in fp32 (TensorRT has no int32 bias dequantization)
            assert n.input[2] in inits and inits[n.input[2]].dtype == np.float32
    # the text encoders and VAE are untouched
    for other in ("clip.onnx", "vae_decoder.onnx", "vae_encoder.onnx"):
        assert filecmp.cmp(out / other, fp32_export / other, shallow=False)


def test_dequantized_weights_match_the_fp32_weights_within_the_format(quantized, fp32_export):
    """Hand check of the Q/DQ arithmetic on every Conv weight: int8 per output channel, symmetric, round to
    nearest (error <= scale / 2, scale = max|w| / 127); fp8 E4M3 per tensor, scale = max|w| / 448 (3 mantissa
    bits: relative error <= 2^-4 for values in the normal range)."""
    ref = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(fp32_export / "unet.onnx")).graph.initializer}
    for mode in Q.MODES:
        m, inits, producer = _graph(quantized[mode][0] / "unet.onnx")
        checked = 0
        for n in (n for n in m.graph.node if n.op_type == "Conv"):
            dq = producer[n.input[1]]
            q, scale = inits[dq.input[0]], inits[dq.input[1]]
            w = ref[dq.input[0].removesuffix("_quantized")]
            if mode == "int8":
                assert q.dtype == np.int8 and scale.shape == (w.shape[0],)
                np.testing.assert_allclose(scale, np.abs(w).reshape(w.shape[0], -1).max(1) / 127, rtol=1e-5)
                deq = q.astype(np.float32) * scale.reshape(-1, 1, 1, 1)
                assert np.all(np.abs(deq - w) <= scale.reshape(-1, 1, 1, 1) / 2 + 1e-7)
            else:
                assert scale.shape == ()
                np.testing.assert_allclose(scale, np.abs(w).max() / 448, rtol=1e-6)  # amax -> E4M3's max
                deq = q.astype(np.float32) * scale
                normal = np.abs(w / scale) >= 2.0 ** -6  # E4M3's smallest normal
                assert normal.mean() > 0.9
                assert np.all(np.abs(deq - w)[normal] <= np.abs(w)[normal] * 2.0 ** -4 + 1e-12)
            checked += 1
        assert checked >= 20


def test_qdq_summary_matches_the_graph(quantized):
    for mode, zp in (("fp8", "float8e4m3fn"), ("int8", "int8")):
        out, res = quantized[mode]
        assert res.qdq == Q.qdq_summary(out / "unet.onnx")
        assert res.qdq["zero_point_types"] == [zp]
        assert all(q == total for q, total in res.qdq["quantized_layers"].values())


# --- manifest and files ----------------------------------------------------------------------------------
def test_manifest_records_mode_precision_and_calibration(quantized, fp32_export):
    src = json.loads((fp32_export / "manifest.json").read_text())
    for mode in Q.MODES:
        out, res = quantized[mode]
        m = json.loads((out / "manifest.json").read_text())
        assert m == res.manifest
        assert m["quantized"] == mode and m["precision"] == "fp32"
        assert {k: v["precision"] for k, v in m["models"].items()} == {
            k: (mode if k == "unet" else "fp32") for k in src["models"]}
        assert quantized_model(m, "unet") == mode and quantized_model(m, "vae_decoder") is None
        q = m["quantization"]
        assert q["calibration"]["steps"] == RECIPE.steps and q["calibration"]["seeds"] == list(RECIPE.seeds)
        assert q["calibration"]["denoiser_calls"] == len(RECIPE.prompts) * len(RECIPE.seeds) * RECIPE.steps
        assert q["calibration"]["source_weights_hash"] == src["weights_hash"] != m["weights_hash"]
        assert q["op_types"] == ["Conv", "MatMul", "Gemm"]
        assert m["models"]["unet"]["size_bytes"] == (out / "unet.onnx").stat().st_size
        assert (out / "tokenizer").is_dir()
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_calibration_feeds_are_the_runtimes_denoiser_inputs(fp32_export):
    a = Q.record_denoiser_inputs(fp32_export, Q.CalibrationRecipe(width=SIZE, height=SIZE, steps=2, seeds=(3,),
                                                                 prompts=("a cat",)))
    b = Q.record_denoiser_inputs(fp32_export, Q.CalibrationRecipe(width=SIZE, height=SIZE, steps=2, seeds=(3,),
                                                                 prompts=("a cat",)))
    assert len(a) == 2 and set(a[0]) == {"sample", "timestep", "encoder_hidden_states"}
    assert a[0]["sample"].shape == (2, 4, SIZE // 8, SIZE // 8)  # CFG: cond + uncond in one call
    assert a[0]["timestep"][0] > a[1]["timestep"][0]  # from the noisiest step down
    for x, y in zip(a, b):  # deterministic
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_failures_leave_nothing_and_refuse_bad_sources(fp32_export, quantized, tmp_path, monkeypatch):
    with pytest.raises(ExportError, match=r"quantize: received 'fp4', expected one of fp8, int8"):
        Q.quantize_export(fp32_export, tmp_path / "x", "fp4", recipe=RECIPE)
    with pytest.raises(ExportError, match="already quantized"):
        Q.quantize_export(quantized["fp8"][0], tmp_path / "x", "fp8", recipe=RECIPE)
    with pytest.raises(ExportError, match="already exists"):
        Q.quantize_export(fp32_export, quantized["fp8"][0], "fp8", recipe=RECIPE)

    def boom(*a, **k):
        raise RuntimeError("calibration failed")

    monkeypatch.setattr(Q, "quantize_graph", boom)
    with pytest.raises(RuntimeError, match="calibration failed"):
        Q.quantize_export(fp32_export, tmp_path / "out", "int8", recipe=RECIPE, log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


# --- CPU run ---------------------------------------------------------------------------------------------
def _backend_applies_session_configs() -> bool:
    from ksampler_rt.engines.backends import _onnxruntime

    return "ort_session_configs" in inspect.getsource(_onnxruntime)


def test_quantized_graphs_run_on_onnxruntime_cpu_as_fake_quantization(quantized, fp32_export):
    import onnxruntime as ort

    feeds = Q.record_denoiser_inputs(fp32_export, Q.CalibrationRecipe(width=SIZE, height=SIZE, steps=1, seeds=(5,),
                                                                      prompts=("x",)))[0]
    ref = ort.InferenceSession(str(fp32_export / "unet.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    for mode in Q.MODES:
        out, res = quantized[mode]
        so = ort.SessionOptions()
        for k, v in ort_session_configs(res.manifest, "unet").items():
            so.add_session_config_entry(k, v)
        got = ort.InferenceSession(str(out / "unet.onnx"), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert 1e-4 < err < 1.0, (mode, err)  # quantization visibly changes the output, without destroying it
    assert ort_session_configs(quantized["fp8"][1].manifest, "clip") == {}


def test_int8_export_loads_through_the_onnxruntime_cpu_backend(quantized):
    from ksampler_rt.engines import load_engines

    with load_engines(quantized["int8"][0], "onnxruntime-cpu", models=["unet"], log=None) as es:
        out = es.unet(sample=np.zeros((1, 4, 8, 8), np.float32), timestep=np.array([500.0], np.float32),
                      encoder_hidden_states=np.zeros((1, 77, 32), np.float32))
        assert np.isfinite(next(iter(out.values()))).all()


@pytest.mark.skipif(not _backend_applies_session_configs(),
                    reason="the onnxruntime-cpu build does not apply engines.precision.ort_session_configs yet "
                           "(ONNX Runtime 1.31 cannot fuse float8 Q/DQ pairs)")
def test_fp8_generation_stays_within_the_documented_bound(quantized, fp32_export):
    """A whole txt2img job (8 steps, CFG 7) with the fp8 Q/DQ UNet against the fp32 export's, same seed. int8
    has no bound: on these random-weight models its per-tensor ranges are swamped by the late steps' exploding
    latents (docs/engines.md, Precision)."""
    bound = QUALITY_BOUNDS[("unet", "fp8")]
    r = Q.measure_quality(fp32_export, quantized["fp8"][0], seed=42, steps=8, width=SIZE, height=SIZE)
    assert 0.01 < r["rel_l2"] <= bound["rel_l2"], r
    assert r["psnr_db"] >= bound["psnr_db"], r


# --- TensorRT gate (pure logic) --------------------------------------------------------------------------
def _trt_manifest(data):
    return SimpleNamespace(data=data, family="sd15", precision=data.get("precision", "fp32"))


@pytest.mark.parametrize("major", [10, 11])
def test_tensorrt_builds_the_qdq_unet_in_its_mode_and_the_rest_in_fp32(quantized, monkeypatch, major):
    from ksampler_rt.engines.backends.tensorrt import TensorRT
    from ksampler_rt.engines.trt_backend import precision_flags

    trt = TensorRT()
    monkeypatch.setattr(TensorRT, "installed_major", staticmethod(lambda: major))
    m = _trt_manifest(quantized["fp8"][1].manifest)
    assert trt.resolve_precision("fp32", "fp8") == "fp8"
    built = {name: trt.model_precision("fp8", SimpleNamespace(name=name, inputs=[]), m) for name in m.data["models"]}
    assert built == {n: ("fp8" if n == "unet" else "fp32") for n in m.data["models"]}
    assert precision_flags("fp8", "9.0", quantized_export=True, strongly_typed=major >= 11) == (
        [] if major >= 11 else ["FP8", "FP16"])
    with pytest.raises(EngineError, match=r"precision: received 'int8', expected 'fp8'"):
        trt.model_precision("int8", SimpleNamespace(name="unet", inputs=[]), m)


def test_tensorrt_refuses_fp8_for_an_export_without_qdq_nodes_with_the_same_message(monkeypatch):
    from ksampler_rt.engines.backends.tensorrt import TensorRT
    from ksampler_rt.engines.trt_backend import precision_flags

    msg = ("fp8 needs an export with quantize/dequantize (Q/DQ) nodes (calibrated offline); this export has "
           "none; use --precision fp16")
    plain = _trt_manifest({"models": {"unet": {"precision": "fp32"}}})
    unet = SimpleNamespace(name="unet", inputs=[])
    monkeypatch.setattr(TensorRT, "installed_major", staticmethod(lambda: 10))
    assert TensorRT().model_precision("fp8", unet, plain) == "fp8"  # the flag gate below refuses it
    with pytest.raises(EngineError) as e:
        precision_flags("fp8", "9.0")
    assert str(e.value) == msg
    with pytest.raises(EngineError) as e:
        precision_flags("fp8", "9.0", strongly_typed=True)
    assert str(e.value) == msg
    with pytest.raises(EngineError, match="fp8 needs compute capability >= 8.9"):
        precision_flags("fp8", "8.6", strongly_typed=True, quantized_export=True)
    monkeypatch.setattr(TensorRT, "installed_major", staticmethod(lambda: 11))
    with pytest.raises(EngineError) as e:
        TensorRT().model_precision("fp8", unet, plain)
    assert str(e.value) == msg


def test_tensorrt_builder_passes_the_quantized_flag_only_for_the_qdq_model(quantized, monkeypatch, tmp_path):
    from ksampler_rt.engines import trt_backend
    from ksampler_rt.engines.backends.base import BuildJob
    from ksampler_rt.engines.backends.tensorrt import TensorRT

    seen = {}

    def build_plan(path, *a, **k):
        seen[Path(path).name] = k["quantized_export"]
        return b"plan"

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: None)
    monkeypatch.setattr(trt_backend, "build_plan", build_plan)
    m = _trt_manifest(quantized["int8"][1].manifest)
    opts = SimpleNamespace(refit=False, weight_streaming=False)
    cache = SimpleNamespace(timing_cache_path=lambda env: None)
    for name, prec in (("unet", "int8"), ("clip", "fp32")):
        entry = SimpleNamespace(name=name, path=Path(name + ".onnx"))
        TensorRT().builder(BuildJob(m, entry, opts, prec, [], {"compute_capability": "9.0"}, cache))(tmp_path)
    assert seen == {"unet.onnx": True, "clip.onnx": False}
