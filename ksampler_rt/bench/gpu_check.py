"""The one-command acceptance run of the GPU path: ``ksampler-rt gpu-check``
(``python -m ksampler_rt.bench.gpu_check``).

On a GPU machine with onnxruntime-gpu (and TensorRT where installed), without network and within a time
budget (default 540 s), it builds the half-width SD1.5 model locally (``ksampler_rt.bench.models``), exports
it, builds the engines, then measures and checks, per GPU backend, and prints a table and JSON:

* UNet latency: plain (ONNX Runtime ``session.run``, no IO binding), IO binding (the engine without CUDA
  graphs), CUDA graph (the engine with graphs), the graph replay alone (launch + sync, no copies) and the
  host overhead per step (graph call minus replay);
* H2D / D2H cost of one step's inputs and output (pinned, cuda-python);
* error against ONNX Runtime CPU (fp32) over steps whose latents and timestep **change between replays**
  (CFG's context stays), plus proof that the check would catch a stale replay (each output is also compared
  with the previous step's reference, which must fail);
* several shape buckets (sizes x batch 1..2), a call from a second thread, device memory per bucket;
* NaN/inf check of the VAE decoder at SDXL's latent shape (1, 4, 128, 128) with large latents, in the
  export's own precision (an overflow check of fp16 only with an fp16 export; the precision rows below run it
  per precision);
* a LoRA-style weight swap (TensorRT: refit of a ``--refit`` plan; ONNX Runtime: second session), checked
  against ORT CPU with the same weights, and the base weights back afterwards; for TensorRT, how many of the
  export's initializer names the plan can refit (names folded through Transpose nodes do not survive);
* library, driver and GPU versions;
* ``precisions`` (``--precisions fp32,fp16,bf16[,fp8]``, ``ksampler_rt.bench.gpu_precision``): per backend and
  precision, ms per UNet call, relative L2 of the UNet output and of a short sampled latent against the fp32
  engine, NaN / inf counts, the VAE's overflow check (fp32 fallback) and decoded-image PSNR against fp32.

Without a GPU backend it runs the same steps on the CPU backends and a tiny hand-made export (small latents),
so CI runs it (tests/bench/test_gpu_check.py). Nothing here imports torch unless the half-width model must be
built. Exit status 0 when every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .gpu_precision import DEFAULT_PRECISIONS

DESCRIPTION = "Acceptance run of the GPU path (the CPU backends on a machine without a GPU)"
GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-trt")
CPU_BACKENDS = ("onnxruntime-cpu", "openvino-cpu")
SDXL_VAE_LATENT = (1, 4, 128, 128)
CPU_VAE_LATENT = (1, 4, 16, 16)  # the VAE overflow check's latent on the CPU backends (small: CI runs it)


def _precisions(value: str) -> tuple[str, ...]:
    from .gpu_precision import parse_precisions

    try:
        return parse_precisions(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --------------------------------------------------------------------------------------------- helpers

def _time(fn: Callable[[], object], repeat: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(ts), "min_ms": min(ts)}


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Library, driver and GPU versions (what every figure must be recorded with)."""
    from ..engines.envinfo import gpu_info, module_version, openvino_version

    out = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform()}
    try:
        import onnxruntime as ort

        out["onnxruntime"] = ort.__version__
        out["onnxruntime_providers"] = list(ort.get_available_providers())
    except ImportError:
        out["onnxruntime"] = None
    out["tensorrt"] = module_version("tensorrt")
    out["cuda_python"] = _dist_version("cuda-python")
    out["onnxruntime_gpu_wheel"] = _dist_version("onnxruntime-gpu")
    out["openvino"] = openvino_version()
    out["gpu"] = gpu_info(0)
    return out


def _unet_feeds(eng, rng, batch: int, lat_h: int, lat_w: int, tokens: int = 77) -> dict:
    specs = {s.name: s for s in eng.inputs}
    ctx = specs["encoder_hidden_states"]
    feeds = {"sample": rng.standard_normal((batch, 4, lat_h, lat_w)).astype(specs["sample"].dtype),
             "timestep": np.full((batch,), 999.0, dtype=specs["timestep"].dtype),
             "encoder_hidden_states": rng.standard_normal((batch, tokens, ctx.shape[2])).astype(ctx.dtype)}
    if "y" in specs:
        feeds["y"] = rng.standard_normal((batch, specs["y"].shape[1])).astype(specs["y"].dtype)
    return feeds


def _cast(eng, feeds: dict) -> dict:
    """``feeds`` in ``eng``'s input dtypes (an fp16 plan takes fp16; the reference's are the export's)."""
    dtypes = {s.name: np.dtype(s.dtype) for s in eng.inputs}
    return {n: (a if a.dtype == dtypes.get(n, a.dtype) else a.astype(dtypes[n])) for n, a in feeds.items()}


def _call(eng, feeds: dict) -> np.ndarray:
    return eng(**_cast(eng, feeds))[eng.output_names[0]]


def _err(a: np.ndarray, ref: np.ndarray) -> dict:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    scale = float(np.abs(ref).max()) or 1.0
    return {"max_abs": float(np.abs(a - ref).max()), "rel_to_max": float(np.abs(a - ref).max() / scale),
            "finite": bool(np.isfinite(a).all())}


def tolerance(precision: str, gpu: bool) -> float:
    """Max error relative to the reference's largest magnitude that passes: fp32 on the CPU 1e-3 (kernel and
    summation-order differences); fp32 on a GPU 1e-2 (cuDNN / cuBLAS and TensorRT use TF32 by default);
    half precision 3e-2."""
    if precision != "fp32":
        return 3e-2
    return 1e-2 if gpu else 1e-3


class Budget:
    """Wall-clock budget: steps after it ran out are reported as skipped, not run."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), float(seconds)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def ok(self, need: float = 0.0) -> bool:
        return self.left() > need


# --------------------------------------------------------------------------------------------- the steps

def changing_inputs_check(eng, ref_eng, rng, batch, lat_h, lat_w, tol, steps=4) -> dict:
    """Steps with new latents and timestep each time (same context, as CFG passes it): every output must
    match ORT CPU's for *its* inputs, and must not match the previous step's reference (else a stale replay
    would pass unnoticed)."""
    feeds = _unet_feeds(ref_eng, rng, batch, lat_h, lat_w)
    errs, stale, prev_ref = [], [], None
    for step in range(steps):
        feeds = dict(feeds, sample=rng.standard_normal(feeds["sample"].shape).astype(feeds["sample"].dtype),
                     timestep=np.full((batch,), 999.0 - 250 * step, dtype=feeds["timestep"].dtype))
        out = _call(eng, feeds)
        ref = _call(ref_eng, feeds)
        errs.append(_err(out, ref))
        if prev_ref is not None:
            stale.append(_err(out, prev_ref)["rel_to_max"])
        prev_ref = ref
    worst = max(e["rel_to_max"] for e in errs)
    return {"steps": steps, "worst_rel": worst, "finite": all(e["finite"] for e in errs),
            "stale_would_fail": bool(stale) and min(stale) > tol,
            "passed": worst <= tol and all(e["finite"] for e in errs) and bool(stale) and min(stale) > tol}


def second_thread_check(eng, ref_eng, rng, batch, lat_h, lat_w, tol) -> dict:
    feeds = _unet_feeds(ref_eng, rng, batch, lat_h, lat_w)
    box = {}

    def call():
        try:
            box["out"] = _call(eng, feeds)
        except Exception as exc:  # reported, not raised: the check fails
            box["error"] = f"{type(exc).__name__}: {exc}"

    t = threading.Thread(target=call, name="gpu-check-second-thread")
    t.start()
    t.join()
    if "error" in box:
        return {"passed": False, "error": box["error"]}
    e = _err(box["out"], _call(ref_eng, feeds))
    return {"passed": e["rel_to_max"] <= tol and e["finite"], "rel": e["rel_to_max"]}


def copy_costs(in_bytes: int, out_bytes: int, repeat: int) -> dict:
    """H2D and D2H of one step's bytes through pinned memory on one stream; host memcpy without cuda-python."""
    try:
        from ..engines.cuda import CudaRuntime

        cuda = CudaRuntime()
        n = max(in_bytes, out_bytes)
        host, dev, s = cuda.malloc_host(n), cuda.malloc(n), cuda.stream()
        try:
            def h2d():
                cuda.htod(dev, host, in_bytes, s)
                cuda.sync(s)

            def d2h():
                cuda.dtoh(host, dev, out_bytes, s)
                cuda.sync(s)

            return {"kind": "pinned cudaMemcpyAsync + sync", "in_bytes": in_bytes, "out_bytes": out_bytes,
                    "h2d_ms": _time(h2d, repeat)["median_ms"], "d2h_ms": _time(d2h, repeat)["median_ms"]}
        finally:
            cuda.free(dev), cuda.free_host(host), cuda.stream_destroy(s)
    except Exception as exc:
        src = np.empty(max(in_bytes, out_bytes), np.uint8)
        dst = np.empty_like(src)
        t_in = _time(lambda: np.copyto(dst[:in_bytes], src[:in_bytes]), repeat)["median_ms"]
        t_out = _time(lambda: np.copyto(dst[:out_bytes], src[:out_bytes]), repeat)["median_ms"]
        return {"kind": f"host memcpy (no CUDA: {type(exc).__name__})", "in_bytes": in_bytes,
                "out_bytes": out_bytes, "h2d_ms": t_in, "d2h_ms": t_out}


def graph_replay_ms(eng, feeds, repeat) -> float | None:
    """The captured graph of ``feeds``' bucket replayed alone (launch + sync, no copies), or None."""
    from ..engines.ort_cuda import OrtCudaEngine
    from ..engines.trt_backend import TensorRTEngine

    if isinstance(eng, OrtCudaEngine) and eng.cuda_graph and eng.session is not None:
        key = tuple((n, feeds[n].shape) for n in eng.input_names)
        b = eng._buckets.get(key)
        if b is None or b.graph_id < 0:
            return None

        def replay():
            eng.session.run_with_iobinding(b.binding, b.run_options)
            if eng.cuda is not None:
                eng.cuda.sync(eng.stream)

        return eng._thread.call(lambda: _time(replay, repeat)["median_ms"])
    if isinstance(eng, TensorRTEngine) and eng.cuda_graph:
        b = eng._buckets.get(tuple(feeds[n].shape for n in eng.input_names))
        if b is None or b.exe is None:
            return None

        def launch():
            with eng.scratch.lock:
                eng.cuda.launch(b.exe, eng.stream)
                eng.cuda.sync(eng.stream)

        return _time(launch, repeat)["median_ms"]
    return None


def plain_ms(eng, feeds, repeat) -> float | None:
    """ONNX Runtime's ``session.run`` without IO binding (numpy in and out), on a session without graphs."""
    session = getattr(eng, "session", None)
    if session is None or getattr(eng, "cuda_graph", False):
        return None
    names, feeds = eng.output_names, _cast(eng, feeds)
    return _time(lambda: session.run(names, feeds), repeat)["median_ms"]


def device_memory(eng) -> dict | None:
    fn = getattr(eng, "device_bytes", None)
    return fn() if fn else None


def _free_device_bytes() -> int | None:
    try:
        from ..engines.cuda import CudaRuntime

        return CudaRuntime().mem_get_info()[0]
    except Exception:
        return None


def pick_override(export_dir: Path, model: str = "unet") -> tuple[str, np.ndarray]:
    """A weight to swap like a LoRA would: the largest 2-D+ float initializer of the export's UNet, with a
    deterministic low-rank delta added (the LoRA merge's shape)."""
    import onnx
    from onnx import numpy_helper

    manifest = json.loads((Path(export_dir) / "manifest.json").read_text())
    path = Path(export_dir) / manifest["models"][model]["file"]
    proto = onnx.load(str(path), load_external_data=False)
    floats = [t for t in proto.graph.initializer if len(t.dims) >= 2 and t.data_type in (1, 10)]
    t = max(floats, key=lambda t: int(np.prod(t.dims)))
    base = numpy_helper.to_array(t, base_dir=str(path.parent))
    rng = np.random.default_rng(7)
    flat = base.reshape(base.shape[0], -1).astype(np.float32)
    up, down = rng.standard_normal((flat.shape[0], 4)), rng.standard_normal((4, flat.shape[1]))
    delta = (up @ down).astype(np.float32) * (0.5 * float(np.abs(flat).max() or 1.0) / 4.0 / 4.0)
    return t.name, (flat + delta).reshape(base.shape).astype(base.dtype)


def refit_name_coverage(eng, export_dir: Path) -> dict | None:
    """For a TensorRT engine: how many of the export UNet's initializer names the plan can refit."""
    from ..engines.trt_backend import TensorRTEngine

    if not isinstance(eng, TensorRTEngine) or not getattr(eng.engine, "refittable", False):
        return None
    import onnx

    manifest = json.loads((Path(export_dir) / "manifest.json").read_text())
    proto = onnx.load(str(Path(export_dir) / manifest["models"]["unet"]["file"]), load_external_data=False)
    names = {t.name for t in proto.graph.initializer if len(t.dims) >= 2}
    refittable = set(eng.trt.Refitter(eng.engine, eng._logger).get_all_weights())
    return {"export_weights": len(names), "refittable_by_name": len(names & refittable),
            "lost_names_sample": sorted(names - refittable)[:5]}


def lora_check(es, ref, export_dir, rng, batch, lat_h, lat_w, tol) -> dict:
    name, value = pick_override(export_dir)
    feeds = _unet_feeds(ref.unet, rng, batch, lat_h, lat_w)
    t0 = time.perf_counter()
    try:
        view = es.unet.with_weights({name: value})
        got = _call(view, feeds)
    except Exception as exc:
        return {"passed": False, "weight": name, "error": f"{type(exc).__name__}: {exc}"}
    switch_s = time.perf_counter() - t0
    ref_view = ref.unet.with_weights({name: value})
    want = _call(ref_view, feeds)
    base_ref = _call(ref.unet, feeds)
    back = _call(es.unet, feeds)  # the base weights again (TensorRT refits back)
    e_lora, e_back = _err(got, want), _err(back, base_ref)
    changed = _err(want, base_ref)["rel_to_max"] > tol  # the swap must matter, else the check proves nothing
    ref_view.release()
    return {"weight": name, "switch_s": switch_s, "lora_rel": e_lora["rel_to_max"],
            "base_back_rel": e_back["rel_to_max"], "swap_changes_output": changed,
            "passed": changed and e_lora["rel_to_max"] <= tol and e_back["rel_to_max"] <= tol}


def vae_nan_check(vae, lat: tuple) -> dict:
    spec = vae.inputs[0]
    rng = np.random.default_rng(11)
    z = (rng.standard_normal(lat) * 4.0 / 0.13025).astype(spec.dtype)  # SDXL-scaled latents, large values
    try:
        out = vae(**{spec.name: z})[vae.output_names[0]]
    except Exception as exc:
        return {"shape": list(lat), "passed": False, "error": f"{type(exc).__name__}: {exc}"}
    finite = bool(np.isfinite(out).all())
    return {"shape": list(lat), "dtype": str(out.dtype), "nan": int(np.isnan(out).sum()),
            "inf": int(np.isinf(out).sum()), "passed": finite}


# --------------------------------------------------------------------------------------------- the run

def check_backend(backend: str, export_dir: Path, ref, sizes, args, budget: Budget, log) -> dict:
    from ..engines import load_engines

    gpu = backend in GPU_BACKENDS
    shapes = ",".join(f"{w}x{h}" for w, h in sizes)
    common = dict(shapes=shapes, batch="1-2", build_missing=True)
    res: dict = {"backend": backend, "buckets": []}
    t0 = time.perf_counter()
    graph_set = load_engines(export_dir, backend, cuda_graph=True, **common)
    plain_set = load_engines(export_dir, backend, cuda_graph=False, **common) if gpu else graph_set
    res["load_s"] = time.perf_counter() - t0
    tol = tolerance(graph_set.manifest.precision, gpu)
    res["tolerance"] = tol
    scale = graph_set.manifest.latent_scale
    rng = np.random.default_rng(0)
    with graph_set, plain_set:
        for (w, h) in sizes:
            for batch in (1, 2):
                if not budget.ok(15):
                    res["buckets"].append({"size": f"{w}x{h}", "batch": batch, "skipped": "time budget"})
                    continue
                lat_h, lat_w = h // scale, w // scale
                feeds = _cast(graph_set.unet, _unet_feeds(ref.unet, rng, batch, lat_h, lat_w))
                free0 = _free_device_bytes() if gpu else None
                row = {"size": f"{w}x{h}", "batch": batch}
                row["cuda_graph_ms" if gpu else "engine_ms"] = _time(lambda: graph_set.unet(**feeds),
                                                                     args.repeat)["median_ms"]
                if gpu:
                    row["iobinding_ms"] = _time(lambda: plain_set.unet(**feeds), args.repeat)["median_ms"]
                    row["plain_ms"] = plain_ms(plain_set.unet, feeds, args.repeat)
                    row["graph_replay_ms"] = graph_replay_ms(graph_set.unet, feeds, args.repeat)
                    if row["graph_replay_ms"] is not None:
                        row["host_overhead_ms"] = row["cuda_graph_ms"] - row["graph_replay_ms"]
                    free1 = _free_device_bytes()
                    row["device_mem_delta_bytes"] = (free0 - free1) if free0 is not None and free1 is not None else None
                else:
                    row["plain_ms"] = plain_ms(graph_set.unet, feeds, args.repeat)
                row["memory"] = device_memory(graph_set.unet)
                out_bytes = int(np.prod(feeds["sample"].shape)) * np.dtype(graph_set.unet.outputs[0].dtype).itemsize
                row["copies"] = copy_costs(sum(a.nbytes for a in feeds.values()), out_bytes, args.repeat)
                row["changing_inputs"] = changing_inputs_check(graph_set.unet, ref.unet, rng, batch, lat_h, lat_w,
                                                               tol)
                res["buckets"].append(row)
        w, h = sizes[0]
        lat_h, lat_w = h // scale, w // scale
        res["second_thread"] = second_thread_check(graph_set.unet, ref.unet, rng, 1, lat_h, lat_w, tol)
        lat = SDXL_VAE_LATENT if gpu else CPU_VAE_LATENT
        if budget.ok(30):
            with load_vae(export_dir, backend, lat, scale) as vae:
                res["vae_nan"] = vae_nan_check(vae, lat)
        else:
            res["vae_nan"] = {"skipped": "time budget"}
        res["stats"] = {k: (sorted(v) if isinstance(v, set) else v)
                        for k, v in getattr(graph_set.unet, "stats", {}).items() if k != "thread_ids"}
    if args.lora and budget.ok(60):
        refit = {"refit": True} if backend == "tensorrt" else {}
        lora_set = load_engines(export_dir, backend, cuda_graph=True, **common, **refit)
        with lora_set:
            res["refit_names"] = refit_name_coverage(lora_set.unet, export_dir)
            res["lora"] = lora_check(lora_set, ref, export_dir, rng, 1, lat_h, lat_w, tol)
    else:
        res["lora"] = {"skipped": "--no-lora" if not args.lora else "time budget"}
    res["passed"] = all_passed(res)
    log(f"{backend}: {'PASS' if res['passed'] else 'FAIL'} ({time.perf_counter() - t0:.1f} s)")
    return res


def load_vae(export_dir, backend, lat, scale, precision: str | None = None):
    """The VAE decoder alone for latents of shape ``lat`` (a shape-bound backend builds it for that size only),
    in ``precision`` (None: the export's own)."""
    from ..engines import LoadOptions
    from ..engines.backends import LoadJob, get_backend
    from ..engines.build import build_model, model_profiles, profile_request
    from ..engines.cache import EngineCache
    from ..engines.manifest import load_manifest

    manifest, impl, cache = load_manifest(export_dir), get_backend(backend), EngineCache()
    load = LoadOptions(shapes=f"{lat[3] * scale}x{lat[2] * scale}", batch="1", build_missing=True,
                       precision=precision)
    opts = load.build_options(backend)
    entry = manifest.models["vae_decoder"]
    found = build_model(manifest, "vae_decoder", opts, cache)
    req = profile_request(manifest, opts, required=impl.shape_bound)
    return impl.make_engine(LoadJob(entry, found.file(found.meta.get("artefact", "model.onnx")),
                                    model_profiles(entry, req), req, str(export_dir), load, cache,
                                    impl.open_set(load)))


def all_passed(res: dict) -> bool:
    checks = [b["changing_inputs"]["passed"] for b in res["buckets"] if "changing_inputs" in b]
    for key in ("second_thread", "vae_nan", "lora"):
        v = res.get(key)
        if isinstance(v, dict) and "passed" in v:
            checks.append(v["passed"])
    return bool(checks) and all(checks)


def prepare_export(model: str | None, gpu: bool, workdir: Path, log) -> tuple[Path, str]:
    """The export to check: ``model`` (a built-in name or a path); default half-sd15 on a GPU machine (falling
    back to the hand-made one when torch / diffusers are missing there), else a tiny hand-made export (onnx
    only, seconds)."""
    from ..engines.testing import make_tiny_export

    if model is None and gpu:
        try:
            return prepare_export("half-sd15", gpu, workdir, log)
        except ImportError as exc:
            log(f"half-sd15 needs torch, diffusers and transformers ({exc}); checking the hand-made export")
            return make_tiny_export(workdir / "export", "sd15", unet_width=64, unet_depth=4), \
                f"hand-made (half-sd15 unavailable: {exc})"
    if model in (None, "hand-made"):
        return make_tiny_export(workdir / "export", "sd15", unet_width=16, unet_depth=2), "hand-made"
    from .models import resolve_model

    return Path(resolve_model(model, log=log, need_source=False).export_dir), model


def run(args, log=print) -> dict:
    from ..engines import available_backends

    budget = Budget(args.budget_s)
    avail = available_backends()
    gpu_here = [b for b in GPU_BACKENDS if avail.get(b, "unknown") is None]
    wanted = [b.strip() for b in args.backends.split(",")] if args.backends else (gpu_here or [
        b for b in CPU_BACKENDS if avail.get(b, "unknown") is None])
    gpu = any(b in GPU_BACKENDS for b in wanted)
    report: dict = {"versions": versions(), "mode": "gpu" if gpu else "cpu", "backends": {}, "skipped": {},
                    "precisions": {}}
    with tempfile.TemporaryDirectory(prefix="ksrt-gpu-check-") as tmp:
        if not args.cache:
            os.environ.setdefault("KSAMPLER_RT_CACHE", str(Path(tmp) / "cache"))
        else:
            os.environ["KSAMPLER_RT_CACHE"] = args.cache
        t0 = time.perf_counter()
        export_dir, model = prepare_export(args.model, gpu, Path(tmp), log)
        report["model"] = {"name": model, "export_dir": str(export_dir), "prepare_s": time.perf_counter() - t0}
        from ..engines import load_engines
        from ..engines.spec import parse_shapes

        sizes = parse_shapes(args.sizes or ("512x512,768x512" if gpu else "64x64,96x64"))
        quick = getattr(args, "quick", False)
        sizes = sizes[:1] if quick else sizes
        ref = load_engines(export_dir, "onnxruntime-cpu", models=["unet", "vae_decoder"])
        with ref:
            for backend in wanted:
                why = avail.get(backend, f"unknown backend {backend!r}")
                if why is not None:
                    report["skipped"][backend] = why
                    continue
                if not budget.ok(30):
                    report["skipped"][backend] = "time budget"
                    continue
                try:
                    report["backends"][backend] = check_backend(backend, export_dir, ref, sizes, args, budget, log)
                except Exception as exc:  # one backend's failure is a finding, not the end of the run
                    report["backends"][backend] = {"backend": backend, "passed": False,
                                                   "error": f"{type(exc).__name__}: {exc}"}
            report["precisions"] = run_precisions(args, list(report["backends"]), export_dir, ref, sizes, budget,
                                                  Path(tmp), report["versions"], log)
    report["elapsed_s"] = time.perf_counter() - budget.t0
    report["passed"] = bool(report["backends"]) and all(r.get("passed") for r in report["backends"].values()) \
        and all(s.get("passed", True) for s in report["precisions"].values())
    return report


def run_precisions(args, backends, export_dir, ref, sizes, budget, workdir, versions_, log) -> dict:
    """The ``precisions`` section: each backend's precision rows (``gpu_precision.precision_section``)."""
    from . import gpu_precision as gp

    out: dict = {}
    manifest = json.loads((Path(export_dir) / "manifest.json").read_text())
    cc = (versions_.get("gpu") or {}).get("compute_capability")
    precisions, quick = getattr(args, "precisions", DEFAULT_PRECISIONS), getattr(args, "quick", False)
    for backend in backends if precisions else ():
        on_gpu = backend in GPU_BACKENDS
        big_lat = SDXL_VAE_LATENT if on_gpu else CPU_VAE_LATENT  # as check_backend's vae_nan
        loader = gp.EngineLoader(backend, export_dir, sizes, big_lat, workdir / f"prec-{backend}", on_gpu, log)
        try:
            out[backend] = gp.precision_section(
                backend, loader, precisions, ref_unet=ref.unet, sizes=sizes,
                batches=(1,) if quick else (1, 2), scale=int(manifest.get("latent_scale", 8)),
                family=manifest.get("family"), quantized=bool(manifest.get("quantized")), compute_capability=cc,
                gpu=on_gpu, repeat=min(args.repeat, 5) if quick else args.repeat, big_lat=big_lat,
                budget_ok=budget.ok, log=log)
        except Exception as exc:  # the section's own failure is a finding, as a backend's is
            out[backend] = {"passed": False, "error": f"{type(exc).__name__}: {exc}", "rows": []}
    return out


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def format_table(report: dict) -> str:
    v = report["versions"]
    gpu = v.get("gpu") or {}
    lines = [f"gpu-check ({report['mode']}): model {report['model']['name']}; GPU {gpu.get('gpu')} "
             f"(cc {gpu.get('compute_capability')}, driver {gpu.get('nvidia_driver')}, CUDA {gpu.get('cuda')}); "
             f"onnxruntime {v.get('onnxruntime')}, TensorRT {v.get('tensorrt')}, OpenVINO {v.get('openvino')}",
             f"{'backend':<17} {'size':<9} {'b':>1} {'plain':>8} {'iobind':>8} {'graph':>8} {'replay':>8} "
             f"{'host':>7} {'h2d':>7} {'d2h':>7} {'err':>9} {'stale?':>6} {'io MB':>7}"]
    for name, r in report["backends"].items():
        if "error" in r:
            lines.append(f"{name:<17} ERROR {r['error']}")
            continue
        for b in r["buckets"]:
            if "skipped" in b:
                lines.append(f"{name:<17} {b['size']:<9} {b['batch']:>1} skipped: {b['skipped']}")
                continue
            ci, cp = b["changing_inputs"], b["copies"]
            mem = (b.get("memory") or {}).get("io_buffers")
            lines.append(
                f"{name:<17} {b['size']:<9} {b['batch']:>1} {_fmt(b.get('plain_ms')):>8} "
                f"{_fmt(b.get('iobinding_ms', b.get('engine_ms'))):>8} {_fmt(b.get('cuda_graph_ms')):>8} "
                f"{_fmt(b.get('graph_replay_ms')):>8} {_fmt(b.get('host_overhead_ms')):>7} {_fmt(cp['h2d_ms']):>7} "
                f"{_fmt(cp['d2h_ms']):>7} {ci['worst_rel']:>9.2e} {'yes' if ci['stale_would_fail'] else 'NO':>6} "
                f"{_fmt(None if mem is None else mem / 1e6, '.2f'):>7}")
        extras = []
        for key in ("second_thread", "vae_nan", "lora"):
            x = r.get(key) or {}
            state = x.get("skipped") or ("pass" if x.get("passed") else f"FAIL {x.get('error', '')}".strip())
            extras.append(f"{key}: {state}")
        lines.append(f"{'':<17} " + "; ".join(extras) + f"; tolerance {r.get('tolerance')}")
    for name, why in report["skipped"].items():
        lines.append(f"{name:<17} skipped: {why}")
    if report.get("precisions"):
        from .gpu_precision import format_rows

        lines.append("precisions (against the fp32 engine of the same backend, same inputs):")
        for name, sec in report["precisions"].items():
            lines += format_rows(sec, name) if "error" not in sec else [f"{name:<17} ERROR {sec['error']}"]
    lines.append(f"{'PASSED' if report['passed'] else 'FAILED'} in {report['elapsed_s']:.1f} s")
    return "\n".join(lines)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m ksampler_rt.bench.gpu_check", description=DESCRIPTION)
    p.add_argument("--model", default=None, help="half-sd15 (default with a GPU), tiny, hand-made (default "
                                                 "without a GPU: tiny onnx-only export), or an export directory")
    p.add_argument("--backends", default=None, help="comma separated (default: every available GPU backend, "
                                                    "else the CPU backends)")
    p.add_argument("--sizes", default=None, help="image sizes, e.g. 512x512,768x512 (default; 64x64,96x64 on CPU)")
    p.add_argument("--repeat", type=int, default=20, help="timed calls per figure")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget; later steps are skipped")
    p.add_argument("--no-lora", dest="lora", action="store_false", help="skip the LoRA / refit check")
    p.add_argument("--cache", default=None, help="engine cache root (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the JSON report here")
    p.add_argument("--precisions", type=_precisions, default=DEFAULT_PRECISIONS,
                   help="precision rows per backend against its fp32 engine: fp32,fp16,bf16 (default), also fp8 / "
                        "int8 (quantized exports on a GPU), or none")
    p.add_argument("--quick", action="store_true", help="first size only, batch 1 in the precision rows, 5 timed "
                                                        "calls: to stay inside a short device budget")
    return p


def main_args(args) -> int:
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    report = run(args, log=log)
    text = json.dumps(report, indent=1, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    print(format_table(report))
    return 0 if report["passed"] else 1


def register(subparsers) -> None:
    p = subparsers.add_parser("gpu-check", help="acceptance run of the GPU path (CPU backends without a GPU)",
                              description=DESCRIPTION + ". " + __doc__.split("\n\n")[1])
    build_parser(p)
    p.set_defaults(func=main_args)


def main(argv=None) -> int:
    return main_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
