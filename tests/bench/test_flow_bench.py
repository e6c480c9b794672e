"""``ksampler-rt bench --model tiny-flux``: a reduced run through the CLI (no timing assertions) and the bad-input
errors. The agreement figure is independent of ksampler-rt: diffusers' FluxPipeline computes its latents itself
from the prompt, the seed and the sigma list."""
from __future__ import annotations

import json
import os

import pytest

from ksampler_rt.bench.flow import FlowBenchConfig, validate
from ksampler_rt.bench.harness import BenchError
from ksampler_rt.bench.models import is_flow_model, model_family

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from ksampler_rt.cli import main

    out = tmp_path_factory.mktemp("flow-bench")
    rc = main(["bench", "--model", "tiny-flux", "--backend", "onnxruntime-cpu", "--size", "64x64", "--steps", "2",
               "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert rc == 0
    (path,) = out.glob("bench-tiny-flux-*.json")
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
    return json.loads(path.read_text())


def test_reduced_flux_run_has_both_sides_and_they_agree(flux_run, capsys):
    r = flux_run
    assert r["kind"] == "flow" and r["model"]["family"] == "flux"
    assert r["config"]["cfg"] == 1.0 and r["config"]["guidance"] == 3.5 and r["config"]["sampler"] == "euler"
    (prod,) = r["products"]
    (peer,) = r["peers"]
    assert prod["name"] == "ksampler-rt onnxruntime-cpu"
    assert peer["available"] and "FluxPipeline" in peer["name"]
    for side in (prod, peer):
        for key in ("end_to_end", "per_step", "model_call", "text_encode", "vae_decode"):
            assert side[key]["n"] >= 1 and side[key]["median_ms"] > 0, (side["name"], key)
        assert side["model_calls_per_step"] == 1.0  # cfg 1: no uncond pass on either side
    # the diffusers side ran on ksampler-rt's sigmas (ComfyUI's flux shift), ending at 0
    sigmas = peer["cold"]["sigmas"]
    assert len(sigmas) == 3 and sigmas[-1] == 0.0 and sigmas[0] > sigmas[1] > 0
    (cmp,) = r["comparison"]
    assert cmp["product"] == prod["name"] and cmp["peer"] == peer["name"]
    assert cmp["end_to_end_speedup"] > 0 and cmp["per_step_speedup"] > 0
    assert cmp["latent_rel_l2"] <= 1e-4, cmp  # fp32 on both sides: the same work
    assert cmp["image_rel_l2"] <= 1e-4, cmp
    env = r["environment"]
    assert env["cpu"]["cpu"] and env["cpu"]["arch"] and env["threads"] == 1
    if os.path.isfile("/proc/cpuinfo"):  # the recorded ISA flags are the CPU's own
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
        assert all(isa in flags for isa in env["cpu"]["isa"].split(",") if isa), env["cpu"]
    assert env["precision"] == "fp32" and env["shapes"]["latent"] == [16, 8, 8]
    assert env["versions"]["torch"] and env["versions"]["diffusers"] and env["versions"]["onnxruntime"]


def test_flow_model_names():
    assert [model_family(n) for n in ("tiny-flux", "tiny-flux-schnell", "tiny-sd3")] == ["flux", "flux-schnell", "sd3"]
    assert is_flow_model("tiny-sd3") and not is_flow_model("tiny") and not is_flow_model("half-sd15")


@pytest.mark.parametrize("fields, match", [
    (dict(sampler="dpmpp_2m"), "--sampler: received 'dpmpp_2m'"),
    (dict(width=72), "--size: received 72 px"),
    (dict(steps=0), "--steps: received 0"),
    (dict(peers=("diffusers-compile",)), "--peers: received diffusers-compile"),
])
def test_bad_input_names_the_parameter(fields, match):
    with pytest.raises(BenchError, match=match):
        validate(FlowBenchConfig(**fields))
