"""``ksampler-rt gpu-check`` on the CPU backends (what CI can run), and its checks against a broken engine."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnx")

from ksampler_rt.bench import gpu_check  # noqa: E402


def test_gpu_check_runs_green_on_the_cpu_backends(tmp_path, monkeypatch):
    monkeypatch.setenv("KSAMPLER_RT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report.json"
    rc = gpu_check.main(["--repeat", "2", "--json", str(out), "--backends", "onnxruntime-cpu,openvino-cpu"])
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
