"""OpenVINO CPU UNet precisions side by side (issue 25, "measure both"): fp32, bf16, NNCF int8 weight
compression and NNCF int8 post-training quantization (int8 activations and weights, what VNNI / AMX-INT8
accelerate), on one model's UNet.

``python -m ksampler_rt.bench.ov_ptq --model half-sd15 [--latent 32 64] [--repeats 5]``

* speed: ms per UNet call at CFG batch 2 (latent ``L`` x ``L``, 77 tokens), each variant compiled for that
  static shape, warm-up then ``repeats`` rounds interleaved across the variants (a noisy shared machine
  slows all of them alike), median;
* quality: a full txt2img sampling (20 steps, euler / normal, CFG 8, latent 32 x 32) with each UNet variant
  from the same seed and the same seeded random contexts (different from the calibration's), against the
  fp32 variant: latent relative L2 and the PSNR of the image decoded by the fp32 VAE decoder
  (:func:`ksampler_rt.bench.precision.relative_l2` / ``psnr``).

PTQ variants (``nncf.quantize``, ``model_type=TRANSFORMER``, calibrated on :func:`unet_calibration_inputs`:
32 real UNet inputs recorded from two 16-step fp32 samplings through ``ksampler_rt.runtime`` with seeded
random contexts): ``int8-ptq`` (SmoothQuant on, the preset's default), ``int8-ptq-nosq`` (off),
``int8-ptq-mm`` (MatMuls only, convolutions left in float); ``+bf16``: the non-int8 ops compiled in bf16.
Results and the decision (openvino-cpu's int8 stays weight compression): docs/engines.md, "Precision".
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .harness import write_json
from .precision import cpu_flags_record, psnr, relative_l2

# variant -> (weights transform, INFERENCE_PRECISION_HINT)
VARIANTS = {"fp32": ("none", "f32"), "bf16": ("none", "bf16"), "int8-wc": ("wc", "f32"),
            "int8-wc+bf16": ("wc", "bf16"), "int8-ptq": ("ptq", "f32"), "int8-ptq-nosq": ("ptq-nosq", "f32"),
            "int8-ptq+bf16": ("ptq", "bf16"),
            "int8-ptq-mm": ("ptq-mm", "f32"), "int8-ptq-mm+bf16": ("ptq-mm", "bf16")}


# --- int8 post-training quantization (NNCF PTQ: int8 activations and weights) --------------------------------

#: How the UNet's calibration inputs are recorded (deterministic: same export -> same samples).
PTQ_CALIBRATION = {"runs": 2, "steps": 16, "latent": 32, "tokens": 77, "cfg": 8.0, "seed": 0,
                   "sampler": "euler", "scheduler": "normal"}


def unet_calibration_inputs(model, family: str, *, runs: int = 2, steps: int = 16, latent: int = 32,
                            tokens: int = 77, cfg: float = 8.0, seed: int = 0, sampler: str = "euler",
                            scheduler: str = "normal", threads: int | None = None) -> list[dict]:
    """Real UNet inputs for NNCF's calibration: ``runs`` txt2img samplings (``steps`` each, CFG batch 2,
    ``latent`` x ``latent``) of the fp32 ``model`` (an OpenVINO model of a 3-input UNet: latent, timestep,
    context) through ``ksampler_rt.runtime.ksampler``, with seeded random contexts of the UNet's width in
    place of text (no text encoder needed). Every UNet call's inputs are recorded: ``runs * steps`` samples
    for a one-call-per-step sampler, keyed by the model's input names."""
    import openvino as ov

    from ..runtime import Model, ksampler

    if len(model.inputs) != 3:
        raise ValueError(f"int8 calibration: received a UNet with {len(model.inputs)} inputs, expected 3 "
                          f"(latent, timestep, context)")
    names = [p.get_any_name() for p in model.inputs]
    width = model.inputs[2].get_partial_shape()[2].get_length()
    channels = model.inputs[0].get_partial_shape()[1].get_length()
    samples: list[dict] = []
    unet = _ov_unet(ov.Core(), model, "f32", threads,
                    record=lambda feeds: samples.append({n: a.copy() for n, a in zip(names, feeds)}))
    rng = np.random.default_rng(seed)
    for r in range(runs):
        pos, neg = ([[rng.standard_normal((1, tokens, width), dtype=np.float32), {}]] for _ in range(2))
        ksampler(Model(unet, family), seed + r, steps, cfg, sampler, scheduler, pos, neg,
                 {"samples": np.zeros((1, channels, latent, latent), np.float32)})
    return samples


def quantize_int8(model, samples: list[dict], *, smooth_quant: bool = True, ignored_types: tuple = ()):
    """NNCF post-training quantization of ``model`` (int8 weights and activations, transformer preset) on
    the recorded ``samples``; ``smooth_quant=False`` turns SmoothQuant off (the transformer preset's default
    is on for MatMuls); ``ignored_types`` (e.g. ``("Convolution",)``) keeps those operations unquantized."""
    import nncf
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                       AdvancedSmoothQuantParameters)

    adv = None if smooth_quant else AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1))
    ignored = nncf.IgnoredScope(types=list(ignored_types)) if ignored_types else None
    return nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=len(samples), advanced_parameters=adv, ignored_scope=ignored)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_variants(unet_onnx: Path, family: str, names, threads: int | None) -> tuple[dict, dict]:
    """{variant: ov.Model} and the preparation facts (quantization seconds, calibration size)."""
    import nncf
    import openvino as ov

    core = ov.Core()
    base = core.read_model(str(unet_onnx))
    models, facts = {}, {}
    t0 = time.perf_counter()
    samples = unet_calibration_inputs(base, family, threads=threads, **PTQ_CALIBRATION)
    facts["calibration"] = {"samples": len(samples), "record_s": time.perf_counter() - t0, **PTQ_CALIBRATION}
    _log(f"calibration: {len(samples)} samples in {facts['calibration']['record_s']:.1f} s")
    quantized: dict[str, object] = {}
    for v in names:
        kind = VARIANTS[v][0]
        if kind == "none":
            models[v] = base
            continue
        if kind not in quantized:
            t0 = time.perf_counter()
            if kind == "wc":
                quantized[kind] = nncf.compress_weights(core.read_model(str(unet_onnx)),
                                                        mode=nncf.CompressWeightsMode.INT8_ASYM)
            else:
                quantized[kind] = quantize_int8(core.read_model(str(unet_onnx)), samples,
                                                smooth_quant=kind != "ptq-nosq",
                                                ignored_types=("Convolution",) if kind == "ptq-mm" else ())
            facts[f"{kind}_s"] = time.perf_counter() - t0
            _log(f"{kind}: {facts[f'{kind}_s']:.1f} s")
        models[v] = quantized[kind]
    return models, facts


def _compile(core, model, shapes, hint: str, threads: int | None):
    m = model.clone()
    m.reshape({i: list(s) for i, s in enumerate(shapes)})
    cfg = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return core.compile_model(m, "CPU", cfg).create_infer_request()


def _ov_unet(core, model, hint: str, threads: int | None, record: Callable[[list], None] | None = None):
    """A ``ksampler_rt.runtime.Model`` UNet callable on the OpenVINO ``model`` (latent, timestep, context), one
    static compile per shape signature (CFG batch 2: one in practice); ``record(feeds)`` sees every call's
    float32 inputs."""
    compiled: dict = {}

    def unet(x, timestep, context, **_):
        feeds = [np.ascontiguousarray(a, np.float32) for a in (x, timestep, context)]
        key = tuple(a.shape for a in feeds)
        if key not in compiled:
            compiled[key] = _compile(core, model, key, hint, threads)
        if record is not None:
            record(feeds)
        return np.array(compiled[key].infer(dict(enumerate(feeds)))[0])

    return unet


def time_calls(models: dict, latent: int, width: int, repeats: int, threads: int | None) -> dict:
    """Median ms per UNet call (CFG batch 2) per variant, rounds interleaved."""
    import openvino as ov

    core, rng = ov.Core(), np.random.default_rng(7)
    feeds = [rng.standard_normal((2, 4, latent, latent), dtype=np.float32), np.full((2,), 500.0, np.float32),
             rng.standard_normal((2, 77, width), dtype=np.float32)]
    reqs = {v: _compile(core, m, [f.shape for f in feeds], VARIANTS[v][1], threads) for v, m in models.items()}
    times: dict[str, list[float]] = {v: [] for v in reqs}
    for v, r in reqs.items():  # warm-up
        r.infer(dict(enumerate(feeds)))
    for i in range(repeats):
        for v, r in reqs.items():
            t0 = time.perf_counter()
            r.infer(dict(enumerate(feeds)))
            times[v].append((time.perf_counter() - t0) * 1e3)
        _log(f"latent {latent} round {i + 1}: " + ", ".join(f"{v} {t[-1]:.0f}" for v, t in times.items()))
    return {v: {"median_ms": statistics.median(t), "min_ms": min(t), "runs_ms": t} for v, t in times.items()}


def quality(models: dict, export_dir: Path, family: str, width: int, threads: int | None, steps: int = 20) -> dict:
    """Each variant's 20-step latent and fp32-decoded image against the fp32 variant's."""
    import openvino as ov

    from ..runtime import Model, ksampler

    core = ov.Core()
    vae = core.read_model(str(export_dir / "vae_decoder.onnx"))
    rng = np.random.default_rng(1234)  # not the calibration's seed
    pos, neg = ([[rng.standard_normal((1, 77, width), dtype=np.float32), {}]] for _ in range(2))
    out = {}
    for v, m in models.items():
        unet = _ov_unet(core, m, VARIANTS[v][1], threads)
        lat = ksampler(Model(unet, family), 42, steps, 8.0, "euler", "normal", pos, neg,
                       {"samples": np.zeros((1, 4, 32, 32), np.float32)})["samples"]
        dec = _compile(core, vae, [lat.shape], "f32", threads)
        img = np.clip((np.array(dec.infer({0: lat})[0]) + 1) / 2, 0, 1)
        out[v] = (lat, img)
        _log(f"quality run {v} done")
    ref_lat, ref_img = out["fp32"]
    return {v: {"latent_rel_l2": relative_l2(lat, ref_lat), "image_psnr_db": psnr(img, ref_img)}
            for v, (lat, img) in out.items()}


def run(model_name: str, latents=(32,), repeats: int = 5, variants=tuple(VARIANTS), threads: int | None = None,
        quality_steps: int = 20) -> dict:
    from .models import resolve_model

    bm = resolve_model(model_name, log=_log, need_source=False)
    manifest = json.loads((bm.export_dir / "manifest.json").read_text())
    family = manifest["family"]
    unet = next(m for m in manifest["models"] if m["name"] == "unet") if isinstance(manifest["models"], list) \
        else manifest["models"]["unet"]
    width = unet["inputs"][2]["shape"][2]
    models, facts = build_variants(bm.export_dir / unet["file"], family, ["fp32", *variants], threads)
    res = {"model": bm.name, "environment": cpu_flags_record(), "prepare": facts, "speed": {}}
    import openvino
    import nncf

    res["environment"].update(openvino=openvino.get_version(), nncf=nncf.__version__)
    for lat in latents:
        res["speed"][str(lat)] = time_calls(models, lat, width, repeats, threads)
    if quality_steps:
        res["quality"] = quality(models, bm.export_dir, family, width, threads, quality_steps)
    return res


def format_report(res: dict) -> str:
    lines = [f"{res['model']} UNet on OpenVINO CPU ({res['environment']['cpu']}; "
             f"{', '.join(res['environment']['cpu_flags'])})"]
    lats = list(res["speed"])
    lines.append(f"{'variant':16s}" + "".join(f" {'ms L=' + lat:>10s}" for lat in lats) + "  latent relL2  PSNR dB")
    for v in next(iter(res["speed"].values())):
        q = res.get("quality", {}).get(v, {})
        lines.append(f"{v:16s}" + "".join(f" {res['speed'][lat][v]['median_ms']:10.1f}" for lat in lats)
                     + f"  {q.get('latent_rel_l2', float('nan')):12.4f}  {q.get('image_psnr_db', float('nan')):7.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:  # pragma: no cover - measurement script
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--latent", type=int, nargs="+", default=[32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "fp32"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quality-steps", type=int, default=20)
    ap.add_argument("--out", default="bench-results")
    a = ap.parse_args(argv)
    res = run(a.model, tuple(a.latent), a.repeats, tuple(a.variants.split(",")), a.threads, a.quality_steps)
    print(format_report(res))
    path = write_json(Path(a.out) / f"ov-ptq-{res['model']}-{time.strftime('%Y%m%d-%H%M%S')}.json", res, indent=1,
                      default=str)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
