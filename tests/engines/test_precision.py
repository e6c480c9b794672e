"""``--precision``: parsing, what this CPU runs natively (refusals name the missing feature), ``auto``, and the
openvino-cpu engines built, cached and run in each precision (tiny hand-built exports; no torch).

The numeric quality bounds on real networks (the tiny SD1.5 through the whole pipeline) are in
tests/bench/test_precision_bench.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from ksampler_rt.engines import EngineError
from ksampler_rt.engines import precision as P
from ksampler_rt.engines.precision import (PrecisionSpec, auto_precision, cpu_precision_refusal, parse_precision,
                                           resolve_cpu_spec)

AVX2 = frozenset({"avx", "avx2", "fma"})
SPR = frozenset({"avx", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                 "amx_int8"})
HAS_NNCF = __import__("importlib.util").util.find_spec("nncf") is not None


# --- parsing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, default, per", [
    ("bf16", "bf16", ()),
    (" BF16 ", "bf16", ()),
    ("unet=bf16,vae=fp32", None, (("unet", "bf16"), ("vae", "fp32"))),
    ("fp32, unet = bf16", "fp32", (("unet", "bf16"),)),
    ("auto,vae_decoder=fp32", "auto", (("vae_decoder", "fp32"),)),
])
def test_parse_precision_forms(text, default, per):
    spec = parse_precision(text)
    assert spec == PrecisionSpec(default, per)
    assert parse_precision(spec.canonical()) == spec  # the canonical string (cache key, rebuild) round-trips


def test_parse_precision_empty_is_the_backends_default():
    assert parse_precision(None) is None and parse_precision("  ") is None


@pytest.mark.parametrize("text, needle", [
    ("bf17", "--precision: received 'bf17', expected one of fp32, fp16, bf16, fp8, int8, auto"),
    ("unet=half", "--precision: received 'half' for unet, expected one of"),
    ("text=bf16", "--precision: received network 'text', expected one of unet, clip, vae"),
    ("unet=bf16,unet=fp32", "--precision: received unet twice"),
    ("bf16,fp32", "--precision: received two default precisions (bf16, fp32)"),
    ("unet=bf16,,vae=fp32", "expected comma-separated items without empty ones"),
])
def test_parse_precision_errors_name_parameter_value_and_accepted(text, needle):
    with pytest.raises(EngineError) as exc:
        parse_precision(text)
    assert needle in str(exc.value)


def test_for_model_prefers_the_models_own_entry_then_its_network_then_the_default():
    spec = parse_precision("fp16,vae=fp32,vae_encoder=bf16,clip=bf16")
    assert spec.for_model("unet") == "fp16"
    assert spec.for_model("clip") == spec.for_model("clip2") == "bf16"  # SDXL's second text encoder too
    assert spec.for_model("vae_decoder") == "fp32" and spec.for_model("vae_encoder") == "bf16"
    assert parse_precision("unet=bf16").for_model("vae_decoder") is None


# --- this machine ----------------------------------------------------------------------------------------
def test_refusal_names_the_missing_cpu_feature_and_what_the_cpu_has():
    assert cpu_precision_refusal("openvino-cpu", "bf16", AVX2) == \
        "bf16 on openvino-cpu needs AVX-512-BF16 or AMX; this CPU has avx2, avx"
    assert "int8 on openvino-cpu needs AVX-512-VNNI, AVX-VNNI or AMX-INT8; this CPU has avx2" in \
        cpu_precision_refusal("openvino-cpu", "int8", AVX2)
    assert cpu_precision_refusal("openvino-cpu", "fp32", AVX2) is None
    assert cpu_precision_refusal("openvino-cpu", "bf16", SPR) is None
    # either feature alone is enough: AVX-512-BF16 without AMX (Cooper Lake), AMX alone
    assert cpu_precision_refusal("openvino-cpu", "bf16", AVX2 | {"avx512_bf16"}) is None
    assert cpu_precision_refusal("openvino-cpu", "bf16", AVX2 | {"amx_bf16"}) is None


def test_precisions_a_backend_has_no_path_for_are_refused_whatever_the_cpu():
    fp8 = cpu_precision_refusal("openvino-cpu", "fp8", SPR)
    assert fp8.startswith("precision: received 'fp8' for openvino-cpu, expected one of fp32, bf16, fp16, int8")
    assert "TensorRT" in fp8
    ort = cpu_precision_refusal("onnxruntime-cpu", "bf16", SPR)
    assert ort.startswith("precision: received 'bf16' for onnxruntime-cpu, expected one of fp32")
    assert cpu_precision_refusal("tensorrt", "fp8", AVX2) is None  # GPU backends decide for themselves


def test_auto_picks_bf16_unet_and_fp32_vae_on_amx_and_fp32_everywhere_on_avx2():
    assert {n: auto_precision("openvino-cpu", n, SPR) for n in P.NETWORKS} == \
        {"unet": "bf16", "clip": "bf16", "vae": "fp32"}
    assert {n: auto_precision("openvino-cpu", n, AVX2) for n in P.NETWORKS} == \
        {"unet": "fp32", "clip": "fp32", "vae": "fp32"}
    assert {n: auto_precision("onnxruntime-cpu", n, SPR) for n in P.NETWORKS} == \
        {"unet": "fp32", "clip": "fp32", "vae": "fp32"}
    # auto only picks precisions with a documented quality bound
    for network, order in P.AUTO_CPU_ORDER.items():
        assert all(p == "fp32" or (network, p) in P.QUALITY_BOUNDS for p in order)
    assert "unet=bf16, clip=bf16, vae=fp32" in P.explain_auto("openvino-cpu", SPR)


def test_resolve_cpu_spec_canonical_forms_and_refusals():
    assert resolve_cpu_spec("openvino-cpu", "fp32", None, SPR) == "fp32"
    assert resolve_cpu_spec("openvino-cpu", "fp32", "bf16", SPR) == "bf16"
    assert resolve_cpu_spec("openvino-cpu", "fp32", "auto", SPR) == "clip=bf16,unet=bf16,vae=fp32"
    assert resolve_cpu_spec("openvino-cpu", "fp32", "auto", AVX2) == "fp32"
    assert resolve_cpu_spec("openvino-cpu", "fp32", "unet=bf16,vae_encoder=fp16", SPR) == \
        "clip=fp32,unet=bf16,vae_decoder=fp32,vae_encoder=fp16"
    with pytest.raises(EngineError, match="bf16 on openvino-cpu needs AVX-512-BF16 or AMX; this CPU has avx2"):
        resolve_cpu_spec("openvino-cpu", "fp32", "unet=bf16", AVX2)
    with pytest.raises(EngineError, match="expected 'fp16' \\(the export's own precision"):
        resolve_cpu_spec("openvino-cpu", "fp16", "bf16", SPR)
    assert resolve_cpu_spec("openvino-cpu", "fp16", "fp16", SPR) == "fp16"
    for spec in ("bf16", "clip=bf16,unet=bf16,vae=fp32", "clip=fp32,unet=bf16,vae_decoder=fp32,vae_encoder=fp16"):
        assert P.model_precision_of(spec, "vae_decoder") in ("bf16", "fp32")


def test_cpu_flags_are_this_machines():
    text = open("/proc/cpuinfo", encoding="utf-8").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    assert P.cpu_flags() == frozenset(line.split(":", 1)[1].split() if line else ())


# --- openvino-cpu engines in each precision ------------------------------------------------------------------
@pytest.fixture
def ov():
    return pytest.importorskip("openvino")


def _native(precision: str) -> str | None:
    return cpu_precision_refusal("openvino-cpu", precision)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "int8"])
def test_openvino_engines_build_cache_and_run_in_each_precision(ov, precision, tiny_export, cache_root, feeds_for):
    why = _native(precision)
    if why:
        pytest.skip(f"this machine cannot run it: {why}")
    from ksampler_rt.engines import EngineCache, load_engines

    rng = np.random.default_rng(0)
    with load_engines(tiny_export, "openvino-cpu") as ref, \
            load_engines(tiny_export, "openvino-cpu", precision=f"{precision},vae_encoder=fp32") as es:
        assert {n: e.precision for n, e in es.engines().items()} == \
            {"unet": precision, "clip": precision, "vae_decoder": precision, "vae_encoder": "fp32"}
        for name in ("unet", "vae_decoder"):
            feeds = feeds_for(es.unet if name == "unet" else es.vae_decoder, rng, b=1, h=8, w=8)
            got, want = getattr(es, name)(**feeds), getattr(ref, name)(**feeds)
            k = getattr(es, name).output_names[0]
            err = np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k])
            # a different precision really ran (not fp32 again), and it is still the same function
            assert 0 < err < 0.05, (name, err)
            compiled = next(iter(getattr(es, name)._compiled.values())).compiled
            assert compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == \
                {"bf16": "bf16", "fp16": "f16", "int8": "f32"}[precision]
    cache = EngineCache(cache_root)
    rows = {(e.components["model"], e.components["precision"]) for e in cache.entries()}
    # fp32 and the asked precision side by side in the cache, one entry each (the vae_encoder shared)
    assert {("unet", "fp32"), ("unet", precision), ("vae_encoder", "fp32")} <= rows
    assert ("vae_encoder", precision) not in rows
    unet = next(e for e in cache.entries() if e.components["model"] == "unet"
                and e.components["precision"] == precision)
    assert json.loads((unet.path / "precision.json").read_text())["precision"] == precision
    if precision == "int8":  # the weights really are int8 in the IR, a quarter of the fp32 size or so
        fp32 = next(e for e in cache.entries() if e.components["model"] == "unet"
                    and e.components["precision"] == "fp32")
        assert (unet.path / "model.bin").stat().st_size < 0.5 * (fp32.path / "model.bin").stat().st_size


def test_openvino_refuses_bf16_on_a_cpu_without_it_and_builds_nothing(ov, tiny_export, cache_root, monkeypatch):
    from ksampler_rt.engines import BuildOptions, EngineCache, build_engines

    monkeypatch.setattr(P, "cpu_flags", lambda: AVX2)
    with pytest.raises(EngineError, match="bf16 on openvino-cpu needs AVX-512-BF16 or AMX; this CPU has avx2"):
        build_engines(tiny_export, BuildOptions.from_cli("openvino-cpu", precision="unet=bf16"))
    assert not list(EngineCache(cache_root).entries())
    # auto on that CPU is fp32, said in the cache key
    built = build_engines(tiny_export, BuildOptions.from_cli("openvino-cpu", precision="auto"), models=["unet"])
    assert built["unet"].components["precision"] == "fp32"


def test_int8_engine_refuses_weight_overrides(ov, tiny_export, cache_root):
    if _native("int8"):
        pytest.skip(_native("int8"))
    from ksampler_rt.engines import load_engines

    es = load_engines(tiny_export, "openvino-cpu", precision="int8", models="unet")
    with pytest.raises(EngineError, match="received weight overrides .* for an int8 openvino-cpu engine"):
        es.unet.with_weights({"w": np.zeros(1, np.float32)})


def test_onnxruntime_cpu_auto_is_the_exports_precision_and_bf16_is_refused(tiny_export, cache_root):
    from ksampler_rt.engines import BuildOptions, build_engines

    built = build_engines(tiny_export, BuildOptions.from_cli("onnxruntime-cpu", precision="auto"), models=["unet"])
    assert built["unet"].components["precision"] == "fp32"
    with pytest.raises(EngineError, match="precision: received 'bf16', expected the export's own precision 'fp32'"):
        build_engines(tiny_export, BuildOptions.from_cli("onnxruntime-cpu", precision="bf16"), models=["unet"])
