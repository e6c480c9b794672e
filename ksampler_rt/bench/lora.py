"""Switching a LoRA on an engine vs rebuilding the engine, in the same run.

    python -m ksampler_rt.bench.lora [--backend onnxruntime-cpu] [--export DIR] [--lora FILE] [--repeat 3]

Defaults: the tiny SD1.5 export and the tiny LoRA (built / reused from the cache). Per backend it reports

* ``switch_first_s``: LoraLoader on a new (LoRA, strength): merge on the host + the engine with the merged
  weights (ONNX Runtime: a second session over the export's ONNX; TensorRT: ``Refitter`` with the changed
  weights only) + its first UNet call;
* ``switch_cached_s``: going back to a (LoRA, strength) seen before (cached engine, first call);
* ``refit_back_and_forth_s`` (TensorRT): base -> LoRA -> base, each with a refit;
* ``rebuild_s``: rebuilding the UNet engine from the export (``build_model(force=True)`` into a scratch
  cache) + loading it + its first call: what a backend without weight swapping would pay per LoRA change.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np


def _inputs(engine):
    ctx_dim = next(s for s in engine.inputs if s.name == "encoder_hidden_states").shape[-1]
    g = np.random.default_rng(0)
    return (g.standard_normal((1, 4, 32, 32), dtype=np.float32), np.array([500.0], np.float32),
            g.standard_normal((1, 77, int(ctx_dim)), dtype=np.float32))


def run(export_dir=None, lora=None, backend: str = "onnxruntime-cpu", repeat: int = 3, log=print) -> dict:
    from ..engines import LoadOptions, get_backend, load_engines
    from ..engines.build import BuildOptions, build_model
    from ..engines.cache import EngineCache
    from ..engines.manifest import load_manifest
    from ..workflow.checkpoint import load_checkpoint
    from ..workflow.lora import load_lora

    if export_dir is None:
        from ..demo import prepare_tiny_checkpoint

        export_dir = prepare_tiny_checkpoint(tempfile.mkdtemp(prefix="ksampler-rt-bench-lora-"), log=log)
    if lora is None:
        from ..export.tiny import ensure_tiny_lora

        lora = ensure_tiny_lora("sd15")
    ckpt = load_checkpoint(export_dir, backend=backend, log=None, models=("unet", "clip"))
    x, t, c = _inputs(ckpt.engines.unet)
    ckpt.model.unet(x, t, c)  # base engine loaded and warm
    out: dict = {"backend": backend, "export_dir": str(export_dir), "lora": str(lora), "unet_call_s": [],
                 "switch_first_s": [], "switch_cached_s": [], "rebuild_s": []}
    for _ in range(repeat):
        t0 = time.perf_counter()
        ckpt.model.unet(x, t, c)
        out["unet_call_s"].append(time.perf_counter() - t0)
    for i in range(repeat):
        strength = 0.5 + 0.1 * i  # a new strength: a new merged weight set
        t0 = time.perf_counter()
        model, _ = load_lora(ckpt.model, None, lora, strength, 0.0, log=None)
        model.unet(x, t, c)
        out["switch_first_s"].append(time.perf_counter() - t0)
        ckpt.model.unet(x, t, c)  # back to base
        t0 = time.perf_counter()
        model, _ = load_lora(ckpt.model, None, lora, strength, 0.0, log=None)
        model.unet(x, t, c)
        out["switch_cached_s"].append(time.perf_counter() - t0)
    if get_backend(backend).supports_refit:  # LoRA by refitting the plan: time switching back and forth
        model, _ = load_lora(ckpt.model, None, lora, 1.0, 0.0, log=None)
        t0 = time.perf_counter()
        for _ in range(repeat):
            model.unet(x, t, c)
            ckpt.model.unet(x, t, c)
        out["refit_back_and_forth_s"] = (time.perf_counter() - t0) / repeat
    manifest = load_manifest(export_dir)
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="ksampler-rt-rebuild-") as scratch:
            cache = EngineCache(scratch)
            t0 = time.perf_counter()
            build_model(manifest, "unet", BuildOptions(backend=backend, force=True, refit=get_backend(backend).supports_refit),
                        cache)
            engines = load_engines(export_dir, backend, LoadOptions(build_missing=False), cache=cache,
                                   models=("unet",))
            engines.unet_callable()(x, t, c)
            out["rebuild_s"].append(time.perf_counter() - t0)
            engines.release()
    ckpt.release()
    for k in ("unet_call_s", "switch_first_s", "switch_cached_s", "rebuild_s"):
        out[k + "_median"] = float(np.median(out[k]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="onnxruntime-cpu")
    p.add_argument("--export", default=None, help="export directory (default: the tiny SD1.5 export)")
    p.add_argument("--lora", default=None, help="LoRA file (default: the tiny LoRA)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    print(json.dumps(run(args.export, args.lora, args.backend, args.repeat), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
