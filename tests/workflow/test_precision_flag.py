"""``--precision`` on ``ksampler-rt run`` / ``serve`` (issue #25): parsed, checked against the backend before
anything loads, and the engines the pipeline loads are built in it (OpenVINO bf16 where the CPU runs it)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ksampler_rt.cli import build_parser, main
from ksampler_rt.engines.precision import cpu_runs_natively, describe_cpu

EXAMPLES = Path(__file__).resolve().parents[2] / "ksampler_rt" / "workflow" / "examples"
BF16_HERE = cpu_runs_natively("bf16")
NO_BF16 = f"this CPU has no AVX-512-BF16 / AMX (it has {describe_cpu()}): openvino-cpu refuses bf16 here"


def _has_openvino() -> bool:
    from ksampler_rt.engines.backends import get_backend

    return get_backend("openvino-cpu").unavailable_reason() is None


needs_openvino = pytest.mark.skipif(not _has_openvino(), reason="openvino is not installed")


def _needs_server(command) -> None:
    if command[0] == "serve":  # serve imports its server (the [serve] extra) before checking its arguments
        pytest.importorskip("aiohttp")


# --- parsing and refusals: nothing loads --------------------------------------------------------------------
@pytest.mark.parametrize("command", [["run", "wf.json"], ["serve"]])
def test_precision_parses_to_the_canonical_spec(command):
    parser = build_parser()
    assert parser.parse_args(command).precision is None
    assert parser.parse_args(command + ["--precision", "BF16"]).precision == "bf16"
    # per-network items sorted, as the engine cache key spells them
    assert parser.parse_args(command + ["--precision", "vae=fp32,unet=bf16"]).precision == "unet=bf16,vae=fp32"


@pytest.mark.parametrize("command", [["run", "wf.json"], ["serve"]])
def test_precision_syntax_errors_exit_2_naming_the_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(command + ["--precision", "int4"])
    assert exc.value.code == 2
    assert "--precision: received 'int4', expected one of fp32, fp16, bf16, fp8, int8, auto" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["run", str(EXAMPLES / "txt2img.json")], ["serve", "--port", "0"]])
@pytest.mark.parametrize("backend, precision, expected", [
    ("onnxruntime-cpu", "bf16", "expected one of fp32, auto"),
    ("onnxruntime-cpu", "unet=fp16", "expected one of fp32, auto"),
    pytest.param("openvino-cpu", "fp8", "expected one of fp32, bf16, fp16, int8, auto", marks=needs_openvino),
])
def test_unsupported_precision_is_refused_naming_the_backend(command, backend, precision, expected, tmp_path,
                                                             capsys):
    _needs_server(command)
    rc = main(command + ["--backend", backend, "--precision", precision, "--models", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    received = precision.rpartition("=")[2]
    assert f"--precision: received {received} for --backend {backend}, {expected}" in err


@needs_openvino
@pytest.mark.skipif(BF16_HERE, reason="this CPU runs bf16 natively: the refusal cannot happen here")
def test_bf16_refused_on_a_cpu_without_it(tmp_path, capsys):
    rc = main(["run", str(EXAMPLES / "txt2img.json"), "--backend", "openvino-cpu", "--precision", "bf16",
               "--models", str(tmp_path)])
    assert rc == 2
    assert "needs AVX-512-BF16 or AMX; this CPU has" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["run", str(EXAMPLES / "txt2img.json")], ["serve", "--port", "0"]])
def test_precision_with_stand_ins_is_refused(command, capsys):
    _needs_server(command)
    assert main(command + ["--fake-checkpoint", "tiny-sd15", "--precision", "fp32"]) == 2
    assert "--precision: received fp32 with --fake-checkpoint, expected no --precision" in capsys.readouterr().err


def test_serve_precision_with_ray_workers_is_refused(capsys):
    _needs_server(["serve"])
    assert main(["serve", "--port", "0", "--workers", "ray", "--precision", "fp32"]) == 2
    assert "--precision: received fp32 with --workers ray, expected --workers local" in capsys.readouterr().err


# --- the engines loaded ----------------------------------------------------------------------------------
def _unet_output(pipe, name: str = "tiny-sd15") -> np.ndarray:
    """One UNet call (CFG batch 2, 8x8 latent) on the checkpoint's own text conditioning."""
    model, clip, _ = tuple(pipe.load_checkpoint(name))[:3]
    cond = clip.encode("a red apple")[0][0]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    return model.unet(x, np.array([500.0, 500.0], np.float32), np.concatenate([cond, cond]))


def _pipeline(tiny, tmp_path, backend: str, precision: str | None):
    from ksampler_rt.workflow.pipeline import Pipeline

    return Pipeline(tiny.models_dir, backend=backend, precision=precision, output_dir=tmp_path / "out",
                    input_dir=EXAMPLES, temp_dir=tmp_path / "temp", log=None)


@pytest.fixture(scope="module")
def openvino_fp32(tiny_sd15, tmp_path_factory, session_cache):
    """The openvino-cpu engines loaded with --precision fp32 and one UNet output (the reference)."""
    if not _has_openvino():
        pytest.skip("openvino is not installed")
    with pytest.MonkeyPatch.context() as mp:  # the session's engine cache (module scope: no autouse fixture)
        mp.setenv("KSAMPLER_RT_CACHE", str(session_cache))
        pipe = _pipeline(tiny_sd15, tmp_path_factory.mktemp("ov32"), "openvino-cpu", "fp32")
        out = _unet_output(pipe)
    yield pipe, out
    pipe.release()


def _compiled_precisions(engine) -> set[str]:
    """What OpenVINO compiled the engine's shapes in (its own report, not the engine's setting)."""
    return {c.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            for c in engine._compiled.values()}  # noqa: SLF001


def test_fp32_everywhere(tiny_sd15, tmp_path, openvino_fp32):
    pipe, out32 = openvino_fp32
    engines = pipe.load_checkpoint("tiny-sd15").engines
    assert {name: e.precision for name, e in engines.engines().items()} == \
        {name: "fp32" for name in engines.engines()}
    assert _compiled_precisions(engines.unet) == {"f32"}
    # onnxruntime-cpu with --precision fp32 runs the fp32 export: the same numbers as OpenVINO fp32
    ort = _pipeline(tiny_sd15, tmp_path, "onnxruntime-cpu", "fp32")
    try:
        ort_out = _unet_output(ort)
        assert all(s.dtype == "float32" for e in ort.load_checkpoint("tiny-sd15").engines.engines().values()
                   for s in e.inputs if s.dtype.startswith("float"))
    finally:
        ort.release()
    assert np.linalg.norm(ort_out - out32) / np.linalg.norm(out32) < 1e-4


@needs_openvino
@pytest.mark.skipif(not BF16_HERE, reason=NO_BF16)
def test_openvino_bf16_engines_compute_in_bf16(tiny_sd15, tmp_path, openvino_fp32):
    from ksampler_rt.engines.precision import QUALITY_BOUNDS

    _, out32 = openvino_fp32
    pipe = _pipeline(tiny_sd15, tmp_path, "openvino-cpu", "bf16")
    try:
        out16 = _unet_output(pipe)
        engines = pipe.load_checkpoint("tiny-sd15").engines
        assert {e.precision for e in engines.engines().values()} == {"bf16"}
        assert _compiled_precisions(engines.unet) == {"bf16"}
    finally:
        pipe.release()
    # bf16 really ran (8 mantissa bits move the output), within the documented bound
    rel = float(np.linalg.norm(out16 - out32) / np.linalg.norm(out32))
    assert 1e-4 < rel < QUALITY_BOUNDS[("unet", "bf16")]["rel_l2"]


@needs_openvino
@pytest.mark.skipif(not BF16_HERE, reason=NO_BF16)
def test_run_precision_auto_reaches_the_engines(tiny_sd15, tmp_path, capsys, monkeypatch):
    """``ksampler-rt run --precision auto``: says what auto picked, and the workflow's engines are built in it."""
    from ksampler_rt.engines.precision import auto_precision
    from ksampler_rt.workflow import checkpoint

    loaded = []
    real = checkpoint.load_checkpoint

    def spy(*args, **kwargs):  # the real loader; records what the run's engines were built in
        ckpt = real(*args, **kwargs)
        loaded.append({name: e.precision for name, e in ckpt.engines.engines().items()})
        return ckpt

    monkeypatch.setattr(checkpoint, "load_checkpoint", spy)
    rc = main(["run", str(EXAMPLES / "txt2img.json"), "--out", str(tmp_path), "--input", str(EXAMPLES),
               "--models", str(tiny_sd15.models_dir), "--backend", "openvino-cpu", "--precision", "auto",
               "--set", "5.width=64", "--set", "5.height=64", "--set", "3.steps=1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    picks = {n: auto_precision("openvino-cpu", n) for n in ("unet", "clip", "vae")}
    assert "precision auto on openvino-cpu: " + ", ".join(f"{n}={p}" for n, p in picks.items()) in captured.err
    assert loaded == [{"unet": picks["unet"], "clip": picks["clip"], "vae_decoder": picks["vae"],
                       "vae_encoder": picks["vae"]}]


@needs_openvino
def test_serve_precision_reaches_the_pipeline_and_the_startup_log(tiny_sd15, tmp_path, monkeypatch, caplog):
    """``ksampler-rt serve --precision auto``: logged at startup; the checkpoints it loads are built in it."""
    pytest.importorskip("aiohttp")
    import logging

    from ksampler_rt.engines.precision import auto_precision
    from ksampler_rt.serve import server as server_module

    servers = []

    async def no_serving(server, stop):  # everything up to binding the port ran; no socket needed
        servers.append(server)

    monkeypatch.setattr(server_module, "serve_forever", no_serving)
    with caplog.at_level(logging.INFO, logger="ksampler_rt.serve"):
        assert main(["serve", "--port", "0", "--backend", "openvino-cpu", "--precision", "auto", "--models",
                     str(tiny_sd15.models_dir), "--output", str(tmp_path / "out"), "--input", str(tmp_path / "in"),
                     "--no-ui"]) == 0
    picks = {n: auto_precision("openvino-cpu", n) for n in ("unet", "clip", "vae")}
    assert "engines: precision auto on openvino-cpu: " + ", ".join(f"{n}={p}" for n, p in picks.items()) \
        in caplog.text
    (server,) = servers
    try:
        engines = server.pipeline.load_checkpoint("tiny-sd15").engines
        assert {name: e.precision for name, e in engines.engines().items()} == \
            {"unet": picks["unet"], "clip": picks["clip"], "vae_decoder": picks["vae"], "vae_encoder": picks["vae"]}
    finally:
        server.pipeline.release()
