"""``ksampler-rt bench``: a reduced run end to end (no timing assertions) and the bad-input errors."""
from __future__ import annotations

import json
import os

import pytest

from ksampler_rt.bench import harness
from ksampler_rt.bench.harness import BenchConfig, BenchError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_export():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from ksampler_rt.bench.models import resolve_model

    return resolve_model("tiny", log=lambda m: None)


def _reduced(**kw) -> BenchConfig:
    base = dict(model="tiny", backends=("onnxruntime-cpu",), width=64, height=64, steps=3, repeats=1,
                unet_samples=4, percentiles=(50.0,), stage_repeats=1, batches=(1, 2), throughput_steps=2,
                throughput_repeats=1, peers=("diffusers",), sampler_overhead=False, threads=1)
    base.update(kw)
    return BenchConfig(**base)


def test_reduced_run_reports_every_figure(tiny_export, tmp_path):
    result = harness.run(_reduced(), log=lambda m: None)
    (prod,) = result["products"]
    stages = prod["stages"]
    for key in ("text_encode", "unet_call", "host_per_step", "step", "vae_decode", "vae_encode"):
        assert stages[key]["n"] >= 1 and stages[key]["mean_ms"] >= 0, key
    assert "p50_ms" in stages["unet_call"] and 0 <= stages["host_fraction_of_step"] <= 1
    assert prod["cold"]["engine_load_s"] > 0 and prod["cold"]["first_job_s"] > 0
    assert prod["memory"]["peak_rss_mb"] > 0
    assert [t["batch"] for t in prod["throughput"]] == [1, 2]
    assert all(t["images_per_s"] > 0 and t["steps_per_s"] > 0 for t in prod["throughput"])
    (peer,) = result["peers"]
    assert peer["available"] and peer["name"] == "diffusers torch eager", peer
    peers = {c["peer"] for c in result["comparison"]}
    assert "diffusers torch eager" in peers and any(p.startswith("engine floor") for p in peers)
    env = result["environment"]
    assert env["versions"]["onnxruntime"] and env["cpu"]["cpu"] and env["shapes"]["latent"] == [4, 8, 8]
    text = harness.format_report(result)
    assert "diffusers torch eager" in text and "host %" in text and "images/s" in text
    paths = harness.save(result, tmp_path / "out")
    data = json.loads(open(paths["json"]).read())
    assert data["comparison"] and data["config"]["steps"] == 3
    if paths.get("chart"):
        assert os.path.getsize(paths["chart"]) > 1000


def test_cli_registers_and_reports_bad_backend(monkeypatch, capsys):
    from ksampler_rt import cli

    assert "ksampler_rt.bench.cli" in cli.COMMAND_MODULES
    assert cli.main(["bench", "--backend", "nope", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "unknown backend 'nope'" in err and "onnxruntime-cpu: available" in err
    assert "tensorrt:" in err  # every backend is listed, with why it is (not) usable


def test_unknown_and_unavailable_backends():
    from ksampler_rt.engines import available_backends

    with pytest.raises(BenchError, match="unknown backend 'cuda'.*onnxruntime-cpu: available"):
        harness.resolve_backends(["cuda"])
    missing = [b for b, why in available_backends().items() if why]
    if missing:
        with pytest.raises(BenchError, match=f"backend {missing[0]} is not available"):
            harness.resolve_backends([missing[0]])
    assert "onnxruntime-cpu" in harness.resolve_backends(None)


def test_too_few_samples_for_a_percentile():
    with pytest.raises(BenchError, match="p99 samples: received 50, expected at least 100"):
        harness.percentiles([1.0] * 50, [99.0])
    with pytest.raises(BenchError, match="--unet-samples: received 10, expected at least 20 for p95"):
        harness.validate_config(BenchConfig(unet_samples=10, percentiles=(50.0, 95.0)))
    assert harness.required_samples(99) == 100 and harness.required_samples(95) == 20
    assert harness.percentiles([1.0, 2.0, 3.0], [50.0]) == {"p50": 2.0}


@pytest.mark.parametrize("kw, match", [
    (dict(width=100, height=100), "multiple of 8"),
    (dict(steps=1), "--steps: received 1, expected at least 2"),
    (dict(peers=("comfyui",)), "--peers: received unknown comfyui, expected some of"),
    (dict(sampler="nope"), "--sampler: received 'nope', expected one of"),
    (dict(batches=(0,)), "--batches"),
])
def test_bad_config(kw, match):
    with pytest.raises(BenchError, match=match):
        harness.validate_config(_reduced(**kw))


def test_unknown_model_path():
    from ksampler_rt.bench.models import resolve_model

    with pytest.raises(FileNotFoundError, match="tiny or half-sd15"):
        resolve_model("/no/such/model")


def test_shape_outside_built_engines_offers_a_build(tiny_export):
    from ksampler_rt.engines import load_engines

    engines = load_engines(tiny_export.export_dir, "onnxruntime-cpu", shapes="64x64", batch="1-2")
    harness.check_shapes(engines, 64, 64, (1,))
    with pytest.raises(BenchError, match=r"128x128 at batch 1 .*ksampler-rt build .*--shapes 64x64,128x128"):
        harness.check_shapes(engines, 128, 128, (1,))
    with pytest.raises(BenchError, match=r"batch 2 .*--batch 1-4"):
        harness.check_shapes(engines, 64, 64, (2,))
