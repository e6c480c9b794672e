"""``ksampler-rt gpu-check`` on the CPU backends (what CI can run), and its checks against a broken engine."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")

from ksampler_rt.bench import gpu_check  # noqa: E402


def test_gpu_check_runs_green_on_the_cpu_backends(tmp_path, monkeypatch):
    monkeypatch.setenv("KSAMPLER_RT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report.json"
    rc = gpu_check.main(["--repeat", "2", "--json", str(out), "--backends", "onnxruntime-cpu,openvino-cpu",
                         "--precisions", "fp32,fp16,bf16,fp8"])
    report = json.loads(out.read_text())
    assert rc == 0 and report["passed"] and report["mode"] == "cpu"
    assert report["versions"]["onnxruntime"] and "gpu" in report["versions"]
    ran = report["backends"]
    assert "onnxruntime-cpu" in ran
    for name, r in ran.items():
        assert {b["size"] for b in r["buckets"]} == {"64x64", "96x64"} and {b["batch"] for b in r["buckets"]} == {1, 2}
        for b in r["buckets"]:
            assert b["changing_inputs"]["passed"] and b["changing_inputs"]["stale_would_fail"]
            assert b["copies"]["h2d_ms"] >= 0
        assert r["second_thread"]["passed"] and r["vae_nan"]["passed"] and r["vae_nan"]["nan"] == 0
        assert r["lora"]["passed"] and r["lora"]["swap_changes_output"]
    assert ran["onnxruntime-cpu"]["buckets"][0]["plain_ms"] is not None
    # the precisions section: a row per precision and backend, run or skipped with its reason
    prec = report["precisions"]
    assert set(prec) == set(ran)
    for name, sec in prec.items():
        rows = {r["precision"]: r for r in sec["rows"]}
        assert list(rows) == ["fp32", "fp16", "bf16", "fp8"] and sec["passed"]
        assert "GPUs only" in rows["fp8"]["skipped"]
        assert rows["fp32"]["passed"] and rows["fp32"]["latent"]["rel_l2"] is None
        for r in rows.values():
            if "skipped" not in r:
                assert {c["size"] for c in r["unet"]} == {"64x64", "96x64"} and r["vae"]["overflow"]["nan"] == 0
    ort_rows = {r["precision"]: r for r in prec["onnxruntime-cpu"]["rows"]}
    assert "export's own precision" in ort_rows["fp16"]["skipped"]  # refused, never a silent fp32 row
    if "openvino-cpu" in prec:  # bf16 runs on an AMX / AVX-512-BF16 CPU, else the row names the missing feature
        bf16 = {r["precision"]: r for r in prec["openvino-cpu"]["rows"]}["bf16"]
        assert "AVX-512-BF16" in bf16.get("skipped", "AVX-512-BF16") or 0 < bf16["latent"]["rel_l2"] < 0.15


class _Stale:
    """An engine whose replays return the first call's output whatever the inputs (a stale CUDA graph)."""

    def __init__(self, eng):
        self.eng, self.first = eng, None
        self.inputs, self.output_names = eng.inputs, eng.output_names

    def __call__(self, **feeds):
        if self.first is None:
            self.first = self.eng(**feeds)
        return self.first


def test_the_changing_inputs_check_fails_a_stale_replay(tmp_path):
    from ksampler_rt.engines import load_engines
    from ksampler_rt.engines.testing import make_tiny_export

    export = make_tiny_export(tmp_path / "export", "sd15")
    ref = load_engines(export, "onnxruntime-cpu", cache=tmp_path / "cache", models=["unet"])
    with ref:
        good = gpu_check.changing_inputs_check(ref.unet, ref.unet, np.random.default_rng(0), 1, 8, 8, 1e-3)
        bad = gpu_check.changing_inputs_check(_Stale(ref.unet), ref.unet, np.random.default_rng(0), 1, 8, 8, 1e-3)
    assert good["passed"] and good["stale_would_fail"]
    assert not bad["passed"] and bad["worst_rel"] > 1e-3


def test_gpu_check_is_a_ksampler_rt_subcommand():
    from ksampler_rt.cli import build_parser

    args = build_parser().parse_args(["gpu-check", "--no-lora", "--budget-s", "60"])
    assert args.func is gpu_check.main_args and args.lora is False and args.budget_s == 60


# --------------------------------------------------------------------------------------------- precisions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))  # the GPU fakes
from fake_gpu import FakePrecisionUnet, FakePrecisionVae, precision_unet_reference, round_to  # noqa: E402

from ksampler_rt.bench import gpu_precision as gp  # noqa: E402


def test_error_metrics_on_hand_computed_arrays():
    # ||[3, 4] - [0, 5]|| / ||[0, 5]|| = sqrt(9 + 1) / 5
    assert gp.relative_l2(np.array([3.0, 4.0]), np.array([0.0, 5.0])) == pytest.approx(np.sqrt(10) / 5, rel=1e-12)
    assert gp.relative_l2(np.ones(3), np.ones(3)) == 0.0
    assert np.isnan(gp.relative_l2(np.array([np.nan, 1.0]), np.array([1.0, 1.0])))
    # MSE of [0.5, 0.5] against [0.4, 0.6] is 0.01: 10 log10(1 / 0.01) = 20 dB
    assert gp.psnr_db(np.array([0.5, 0.5]), np.array([0.4, 0.6])) == pytest.approx(20.0, abs=1e-9)
    assert gp.psnr_db(np.zeros(4), np.zeros(4)) == float("inf")
    assert gp.nonfinite(np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)) == {"nan": 1, "inf": 2}
    np.testing.assert_array_equal(gp.to_image(np.array([-1.0, 0.0, 3.0])), [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="x: received shape"):
        gp.relative_l2(np.ones(2), np.ones(3))


def test_the_bf16_fake_rounds_as_ml_dtypes_does():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    a = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 100
    np.testing.assert_array_equal(round_to(a, "bf16"), a.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_precisions_option_and_quantized_gating():
    assert gp.parse_precisions(None) == ("fp32", "fp16", "bf16")
    assert gp.parse_precisions("bf16,fp8") == ("fp32", "bf16", "fp8")  # the fp32 reference always runs, first
    assert gp.parse_precisions("none") == ()
    with pytest.raises(ValueError, match="--precisions: received 'fp9'"):
        gp.parse_precisions("fp9")
    assert "not quantized" in gp.quantized_skip_reason("fp8", False, "9.0", gpu=True)
    assert ">= 8.9, this GPU has 8.6" in gp.quantized_skip_reason("fp8", True, "8.6", gpu=True)
    assert gp.quantized_skip_reason("fp8", True, "9.0", gpu=True) is None
    assert gp.quantized_skip_reason("int8", True, "8.6", gpu=True) is None
    assert "unknown" in gp.quantized_skip_reason("fp8", True, None, gpu=True)
    assert "GPUs only" in gp.quantized_skip_reason("fp8", True, "9.0", gpu=False)
    assert gp.quantized_skip_reason("bf16", False, "7.5", gpu=True) is None
    args = __import__("ksampler_rt.cli", fromlist=["x"]).build_parser().parse_args(
        ["gpu-check", "--precisions", "fp16", "--quick"])
    assert args.precisions == ("fp32", "fp16") and args.quick


def _fake_loader(refuse=()):
    from ksampler_rt.engines.spec import EngineError

    made = []

    def load(p):
        if p in refuse:
            raise EngineError(f"precision: received {p!r}, expected the export's own precision 'fp32'")
        made.append(p)
        return gp.Loaded(FakePrecisionUnet(p), FakePrecisionVae(p), FakePrecisionVae(p), f"fake {p}")

    return load, made


def _section(loader, precisions, quantized=False, cc="9.0", gpu=True):
    return gp.precision_section("tensorrt", loader, precisions, ref_unet=FakePrecisionUnet("fp32"),
                                sizes=[(64, 64), (96, 64)], batches=(1, 2), scale=8, family="sd15",
                                quantized=quantized, compute_capability=cc, gpu=gpu, repeat=1,
                                big_lat=(1, 4, 16, 16), budget_ok=lambda need: True, log=lambda m: None)


def test_precision_rows_against_fp32_with_the_fake_gpu():
    loader, made = _fake_loader(refuse=("int8",))
    sec = _section(loader, ("fp32", "fp16", "bf16", "fp8", "int8"), quantized=False)
    rows = {r["precision"]: r for r in sec["rows"]}
    assert [r["precision"] for r in sec["rows"]] == ["fp32", "fp16", "bf16", "fp8", "int8"]
    assert made == ["fp32", "fp16", "bf16"]  # fp8 / int8 gated before any build
    assert "not quantized" in rows["fp8"]["skipped"] and "not quantized" in rows["int8"]["skipped"]
    # the UNet output's error is the fp16 / bf16 rounding of the fp32 output, for the same inputs
    feeds = gp.make_inputs(FakePrecisionUnet("fp32"), [(64, 64), (96, 64)], (1, 2), 8, "sd15").unet
    for p in ("fp16", "bf16"):
        for cell in rows[p]["unet"]:
            w, h = map(int, cell["size"].split("x"))
            want = precision_unet_reference(**feeds[(w, h, cell["batch"])])
            err = np.linalg.norm(round_to(want, p).astype(np.float64) - want) / np.linalg.norm(want.astype(np.float64))
            assert cell["rel_l2"] == pytest.approx(err, rel=1e-6) and cell["nan"] == cell["inf"] == 0 and cell["ms"] > 0
    assert all(c["rel_l2"] is None for c in rows["fp32"]["unet"])
    assert len(rows["fp16"]["unet"]) == 4 and rows["fp16"]["latent"]["steps"] == gp.LATENT_STEPS
    # bf16 keeps 8 significant bits, fp16 11: its latent drifts further from fp32
    assert 0 < rows["fp16"]["latent"]["rel_l2"] < rows["bf16"]["latent"]["rel_l2"] < 0.05
    # fp16 overflows in the VAE's first activation: the decode falls back to fp32 and says so; bf16 has fp32's range
    assert rows["fp16"]["vae"]["overflow"]["nan"] > 0 and rows["fp16"]["vae"]["precision"] == "fp32"
    assert rows["fp16"]["vae"]["fallback"].startswith("fp32: fp16 overflowed")
    assert rows["bf16"]["vae"]["fallback"] is None and rows["bf16"]["vae"]["overflow"]["nan"] == 0
    assert rows["fp16"]["vae"]["psnr_db"] > rows["bf16"]["vae"]["psnr_db"] > 20
    assert sec["passed"] and all(rows[p]["passed"] for p in ("fp32", "fp16", "bf16"))
    json.loads(json.dumps(sec))  # the report section is plain JSON


def test_fp8_rows_need_a_quantized_export_and_compute_capability_8_9():
    loader, made = _fake_loader()
    low = {r["precision"]: r for r in _section(loader, ("fp32", "fp8"), quantized=True, cc="8.6")["rows"]}
    assert "8.9" in low["fp8"]["skipped"] and "8.6" in low["fp8"]["skipped"]
    ok = {r["precision"]: r for r in _section(loader, ("fp32", "fp8"), quantized=True, cc="9.0")["rows"]}
    assert "skipped" not in ok["fp8"] and ok["fp8"]["source"] == "fake fp8"
    refused, _ = _fake_loader(refuse=("bf16",))
    row = _section(refused, ("fp32", "bf16"))["rows"][1]
    assert row["skipped"].startswith("EngineError: precision: received 'bf16'")


def test_fp16_copy_of_an_export_runs_close_to_fp32(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setenv("KSAMPLER_RT_CACHE", str(tmp_path / "cache"))
    from ksampler_rt.engines import load_engines
    from ksampler_rt.engines.spec import EngineError
    from ksampler_rt.engines.testing import make_tiny_export

    export = make_tiny_export(tmp_path / "export", "sd15")
    loader = gp.EngineLoader("openvino-cpu", export, [(64, 64)], (1, 4, 8, 8), tmp_path / "work", True,
                             log=lambda m: None)
    real_load = loader._load

    def refusing(export_dir, precision, source):  # as ONNX Runtime CUDA / TensorRT 11 refuse a conversion
        if precision is not None:
            raise EngineError(f"precision: received {precision!r}, expected the export's own precision 'fp32'")
        return real_load(export_dir, precision, source)

    loader._load = refusing
    loaded = loader("fp16")
    try:
        half = tmp_path / "work" / "export-fp16"
        manifest = json.loads((half / "manifest.json").read_text())
        assert manifest["precision"] == "fp16" and set(manifest["models"]) == {"unet", "vae_decoder"}
        assert loaded.unet.inputs[0].dtype == "float16" and loaded.source.startswith("fp16 export derived")
        ref = load_engines(export, "onnxruntime-cpu", cache=tmp_path / "cache", models=["unet"])
        with ref:
            feeds = gp.make_inputs(ref.unet, [(64, 64)], (1,), 8, "sd15").unet[(64, 64, 1)]
            err = gp.relative_l2(gp._run(loaded.unet, feeds), gp._run(ref.unet, feeds))
        assert 0 < err < 1e-2
    finally:
        loaded.close()
