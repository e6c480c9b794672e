"""ONNX Runtime CPU session settings for the UNet, measured side by side (``ksampler-rt bench --tune-ort``).

Every variant is its own session on the same export, called in turn (variant A, B, C, A, B, ...)
with the same inputs, so that machine load hits all alike; the figure is the median per variant.

Variants: the product's engine (the engine cache's optimized model, loaded with optimisations off),
the raw exported ONNX at graph optimisation levels all / extended / basic, thread counts, intra-op
spinning, and ONNX Runtime's transformer fusions for UNets (``onnxruntime.transformers.optimizer``,
``model_type="unet"``: attention, GELU, LayerNorm/GroupNorm fusions) followed by level all.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _unet_feeds(session, batch, width, height, downscale=8):
    rng = np.random.default_rng(0)
    feeds = {}
    for a in session.get_inputs():
        if a.name == "sample":
            feeds[a.name] = rng.standard_normal((batch, 4, height // downscale, width // downscale)).astype(np.float32)
        elif a.name == "timestep":
            feeds[a.name] = np.full((batch,) if len(a.shape) == 1 else (), 500.0, np.float32)
        elif a.name == "encoder_hidden_states":
            dim = a.shape[2] if isinstance(a.shape[2], int) else 768
            feeds[a.name] = rng.standard_normal((batch, 77, dim)).astype(np.float32)
        elif a.name == "y":
            feeds[a.name] = rng.standard_normal((batch, a.shape[1])).astype(np.float32)
    return feeds


def _fused_model(raw: Path, manifest: dict, out_dir: Path, log) -> Path:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions("unet")
    # CUDA-only contrib ops (NhwcConv, GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd, packed QKV
    # for the CUDA kernels) have no CPU kernel: keep the fusions the CPU provider can run.
    for name in ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                 "enable_bias_add", "enable_packed_qkv", "enable_packed_kv"):
        setattr(opts, name, False)
    model = optimize_model(str(raw), model_type="unet", opt_level=0, use_gpu=False, optimization_options=opts,
                           only_onnxruntime=False)
    out = out_dir / "unet-fused.onnx"
    model.save_model_to_file(str(out), use_external_data_format=raw.stat().st_size > (1 << 31) - (64 << 20))
    log(f"  transformer fusions: {dict(sorted(model.get_fused_operator_statistics().items()))}")
    return out


def measure_variants(export_dir, width: int, height: int, batch: int = 2, repeats: int = 5,
                     threads: int | None = None, fusions: bool = True, log=print) -> list[dict]:
    """UNet latency (ms) per session variant; ``batch`` is the UNet batch (2 = one image with CFG)."""
    import json

    import onnxruntime as ort

    from ..engines import LoadOptions, load_engines
    from ..engines.ort import CPU_EP, cpu_session_options, default_cpu_threads

    export_dir = Path(export_dir)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    raw = export_dir / manifest["models"]["unet"]["file"]
    n = threads or default_cpu_threads()
    engines = load_engines(export_dir, "onnxruntime-cpu", LoadOptions(threads=n), models=("unet",))
    product_model = engines.unet.path
    variants = [
        (f"product: cached optimized model, {n} threads", product_model, dict(threads=n, level="disable")),
        (f"raw ONNX, level all, {n} threads", raw, dict(threads=n, level="all")),
        (f"raw ONNX, level extended, {n} threads", raw, dict(threads=n, level="extended")),
        (f"raw ONNX, level basic, {n} threads", raw, dict(threads=n, level="basic")),
        (f"product model, {n} threads, spinning", product_model, dict(threads=n, level="disable", spinning=True)),
    ]
    if n > 1:
        variants.append(("product model, 1 thread", product_model, dict(threads=1, level="disable")))
    scratch = tempfile.TemporaryDirectory(prefix="ksampler-rt-tune-")
    if fusions:
        try:
            t = time.perf_counter()
            fused = _fused_model(raw, manifest, Path(scratch.name), log)
            log(f"  fused model written in {time.perf_counter() - t:.0f}s")
            variants.append((f"transformer fusions (unet) + level all, {n} threads", fused,
                             dict(threads=n, level="all")))
        except Exception as exc:  # an optimizer that cannot handle this graph is a result too
            log(f"  transformer fusions unavailable: {type(exc).__name__}: {exc}")
    sessions, rows = [], []
    for label, path, kw in variants:
        t = time.perf_counter()
        so = cpu_session_options(kw["threads"], kw.get("spinning", False), kw["level"])
        sess = ort.InferenceSession(str(path), sess_options=so, providers=[CPU_EP])
        load_s = time.perf_counter() - t
        feeds = _unet_feeds(sess, batch, width, height, manifest.get("latent_downscale", 8))
        sess.run(None, feeds)  # warm-up
        sessions.append((label, sess, feeds))
        rows.append({"variant": label, "load_s": load_s, "samples_ms": []})
    for _ in range(repeats):
        for (label, sess, feeds), row in zip(sessions, rows):
            t = time.perf_counter()
            sess.run(None, feeds)
            row["samples_ms"].append((time.perf_counter() - t) * 1e3)
    base = statistics.median(rows[0]["samples_ms"])
    for row in rows:
        row["median_ms"] = statistics.median(row["samples_ms"])
        row["min_ms"] = min(row["samples_ms"])
        row["vs_product"] = row["median_ms"] / base
    del sessions
    engines.release()
    scratch.cleanup()
    return rows


def format_rows(rows, width, height, batch) -> str:
    lines = [f"ONNX Runtime CPU settings, UNet {width}x{height} batch {batch} (medians of interleaved calls):",
             f"  {'variant':<56} {'median ms':>10} {'min ms':>9} {'vs product':>10} {'load s':>7}"]
    for r in rows:
        lines.append(f"  {r['variant']:<56} {r['median_ms']:>10.1f} {r['min_ms']:>9.1f} {r['vs_product']:>10.2f} "
                     f"{r['load_s']:>7.1f}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m ksampler_rt.bench.ort_tuning EXPORT_DIR [SIZE] [REPEATS]
    import sys

    from .models import resolve_model

    spec = sys.argv[1] if len(sys.argv) > 1 else "tiny"
    m = resolve_model(spec, log=print)
    size = int(sys.argv[2]) if len(sys.argv) > 2 else m.default_size
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    rows = measure_variants(m.export_dir, size, size, 2, reps, threads=int(os.environ.get("THREADS", 0)) or None)
    print(format_rows(rows, size, size, 2))
