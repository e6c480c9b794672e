"""``ksampler-rt bench --controlnet``: a reduced run through the CLI (tiny, 64x64, 2 steps, 1 repeat; no timing
assertions) and the bad-input errors. The agreement figures are against diffusers' own pipelines
(``StableDiffusionPipeline`` / ``StableDiffusionControlNetPipeline``), which compute their latents themselves
from the weights, the prompt embeddings, the sigma list and the hint."""
from __future__ import annotations

import json
import os

import pytest

from ksampler_rt.bench.controlnet import ControlBenchConfig, format_report, validate
from ksampler_rt.bench.harness import BenchError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROWS = ("ours_plain", "ours_controlnet", "diffusers_plain", "diffusers_controlnet")


@pytest.fixture(scope="module")
def cn_run(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("onnxruntime")
    from ksampler_rt.cli import main

    out = tmp_path_factory.mktemp("cn-bench")
    rc = main(["bench", "--controlnet", "--model", "tiny", "--backend", "onnxruntime-cpu", "--size", "64x64",
               "--steps", "2", "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert rc == 0
    (path,) = out.glob("bench-controlnet-tiny-*.json")
    assert not [p for p in os.listdir(out) if ".tmp-" in p]  # written atomically
    return json.loads(path.read_text())


def test_reduced_run_has_the_four_rows_and_they_agree(cn_run):
    r = cn_run
    assert r["kind"] == "controlnet" and r["config"]["cfg"] > 1 and r["config"]["steps"] == 2
    (b,) = r["backends"]
    assert b["backend"] == "onnxruntime-cpu" and b["threads"] == b["torch_threads"] == 1
    rows = b["rows"]
    assert set(rows) == set(ROWS)
    assert "StableDiffusionPipeline" in rows["diffusers_plain"]["name"]
    assert "StableDiffusionControlNetPipeline" in rows["diffusers_controlnet"]["name"]
    for key in ROWS:
        row = rows[key]
        assert row["per_step"]["n"] == 1 and row["per_step"]["median_ms"] > 0, key
        assert 0 <= row["host_per_step"]["median_ms"] < row["per_step"]["median_ms"], key
        # every step ran one CFG-batched UNet call (so both sides ran all the sigmas), and, with the ControlNet,
        # one ControlNet call
        assert row["unet_calls_per_step"] == 1.0, (key, row)
        assert row.get("controlnet_calls_per_step") == (1.0 if key.endswith("controlnet") else None), (key, row)
    for name in ("ours_controlnet_overhead", "diffusers_controlnet_overhead", "plain_speedup_vs_diffusers",
                 "controlnet_speedup_vs_diffusers"):
        assert b["ratios"][name] > 0
    err = b["latent_rel_l2"]
    assert err["plain"] <= 1e-4 and err["controlnet"] <= 1e-4, err  # fp32 on both sides: the same work
    assert err["controlnet_effect"] > 1e-2, err  # the ControlNet changes the latents: the agreement is not vacuous
    env = r["environment"]
    assert env["cpu"]["cpu"] and env["cpu"]["arch"] and env["threads"] == 1
    if os.path.isfile("/proc/cpuinfo"):  # the recorded ISA flags are the CPU's own
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
        assert all(isa in flags for isa in env["cpu_flags"] if isa), env["cpu_flags"]
        assert env["cpu_flags"] == env["cpu"]["isa"].split(",")
    report = format_report(r)  # the table the CLI printed, from the saved JSON
    assert all(f"({x}) " in report for x in "abcd") and "ControlNet overhead per step" in report


@pytest.mark.parametrize("fields, match", [
    (dict(sampler="dpmpp_2m"), "--sampler: received 'dpmpp_2m'"),
    (dict(cfg=1.0), "--cfg: received 1.0"),
    (dict(width=60), "--size: received 60 px"),
    (dict(steps=1), "--steps: received 1"),
])
def test_bad_input_names_the_parameter(fields, match):
    with pytest.raises(BenchError, match=match):
        validate(ControlBenchConfig(**fields))


def test_unknown_model_is_refused():
    from ksampler_rt.bench.models import resolve_control_model

    with pytest.raises(ValueError, match="--model: received 'sdxl-thing' with --controlnet, expected one of tiny"):
        resolve_control_model("sdxl-thing")
