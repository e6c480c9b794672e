"""Per-call latency of each engine, per shape and backend; ``python -m ksampler_rt.bench.engines``.

Rows: model x shape x backend variant (each backend's ``bench_variants``: CUDA graphs on/off for GPU
backends, plus ORT CUDA without IO binding; thread counts for CPU backends, plus spinning for ORT CPU). Also the host<->device copy cost that the
numpy contract adds per sampling step (UNet inputs in, output out), as a fraction of the UNet call.
Without ``--export`` it builds a small hand-made export (needs the ``onnx`` package) in a temp dir.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _feeds(eng, batch, w, h, scale=8, tokens=77, rng=None):
    rng = rng or np.random.default_rng(0)
    out = {}
    for i, s in enumerate(eng.inputs):
        shape = []
        for k, d in enumerate(s.shape):
            if isinstance(d, int):
                shape.append(d)
            elif k == 0:
                shape.append(batch)
            elif eng.model in ("clip", "clip2"):
                shape.append(77)
            elif s.rank == 3 and k == 1:
                shape.append(tokens)
            elif s.rank == 4 and k in (2, 3):
                px = h if k == 2 else w
                shape.append(px if eng.model == "vae_encoder" else px // scale)
            else:
                shape.append(1)
        if s.dtype == "int64":
            out[s.name] = rng.integers(0, 50, size=shape).astype(np.int64)
        else:
            out[s.name] = rng.standard_normal(shape).astype(s.dtype)
    return out


def _time(fn, repeat, warmup=2):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, min(ts) * 1e3


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run(export_dir, backends, sizes, batch, repeat, models=None, log=print):
    from ksampler_rt.engines import LoadOptions, available_backends, get_backend, load_engines
    from ksampler_rt.engines.ort_cuda import OrtCudaEngine

    avail = available_backends()
    rows = []
    for backend in backends:
        if avail.get(backend):
            log(f"[skip] {backend}: {avail[backend]}")
            continue
        impl = get_backend(backend)
        gpu = impl.device_type == "cuda"
        shapes = ",".join(f"{w}x{h}" for w, h in sizes)
        for label, fields in impl.bench_variants(_cores()):
            # GPU engines get shape buckets (CUDA graphs / TensorRT profiles); CPU ones accept any shape
            opts = LoadOptions(shapes=shapes if gpu else None, batch=f"1-{batch}" if gpu else None,
                               build_missing=True, **fields)
            es = load_engines(export_dir, backend, opts, models=models)
            with es:
                scale = es.manifest.latent_scale
                for name, eng in es.engines().items():
                    for w, h in sizes:
                        feeds = _feeds(eng, batch, w, h, scale)
                        med, best = _time(lambda: eng(**feeds), repeat)
                        io_bytes = sum(a.nbytes for a in feeds.values())
                        # graphs: whether the engine really ran with CUDA graphs (the "cuda-graph" row must)
                        rows.append(dict(model=name, shape=f"{w}x{h}", batch=batch, backend=backend,
                                         variant=label, median_ms=med, min_ms=best, in_bytes=io_bytes,
                                         graphs=bool(getattr(eng, "cuda_graph", False))))
                        if isinstance(eng, OrtCudaEngine) and not eng.tensorrt_ep and not eng.cuda_graph:
                            # the same graph-less session without IO binding: plain run() (a graph session
                            # must not be run without its binding: it would capture under graph id 0)
                            sess = eng.session
                            m2, b2 = _time(lambda: sess.run(None, feeds), repeat)
                            rows.append(dict(model=name, shape=f"{w}x{h}", batch=batch, backend=backend,
                                             variant="no-iobinding", median_ms=m2, min_ms=b2, in_bytes=io_bytes,
                                             graphs=False))
                        if name == "unet":
                            rows[-1]["copy"] = _copy_cost(gpu, eng, feeds, repeat)
    return rows


def _copy_cost(gpu, eng, feeds, repeat):
    """Seconds (ms) spent moving one UNet step's inputs in and output out through host memory."""
    out_bytes = sum(a.nbytes for a in eng(**feeds).values())
    in_bytes = sum(a.nbytes for a in feeds.values())
    if not gpu:
        # No device: the numpy contract costs the copies the runtime makes of inputs and outputs.
        src = np.empty(in_bytes + out_bytes, np.uint8)
        dst = np.empty_like(src)
        med, _ = _time(lambda: np.copyto(dst, src), repeat)
        return dict(bytes=in_bytes + out_bytes, ms=med, kind="host memcpy")
    try:
        from ksampler_rt.engines.cuda import CudaRuntime

        cuda = CudaRuntime()
        n = in_bytes + out_bytes
        host, dev, s = cuda.malloc_host(n), cuda.malloc(n), cuda.stream()

        def roundtrip():
            cuda.htod(dev, host, in_bytes, s)
            cuda.dtoh(host, dev, out_bytes, s)
            cuda.sync(s)

        med, _ = _time(roundtrip, repeat)
        cuda.free(dev), cuda.free_host(host), cuda.stream_destroy(s)
        return dict(bytes=n, ms=med, kind="pinned H2D+D2H")
    except Exception as exc:  # no cuda-python / cupy
        return dict(bytes=in_bytes + out_bytes, ms=float("nan"), kind=f"unmeasured ({exc})")


def print_table(rows, out=print):
    out(f"{'model':<12} {'shape':<10} {'b':>2} {'backend':<17} {'variant':<18} {'graphs':>6} {'median ms':>10} "
        f"{'min ms':>9}")
    for r in rows:
        out(f"{r['model']:<12} {r['shape']:<10} {r['batch']:>2} {r['backend']:<17} {r['variant']:<18} "
            f"{'yes' if r.get('graphs') else 'no':>6} {r['median_ms']:>10.3f} {r['min_ms']:>9.3f}")
    copies = [r for r in rows if "copy" in r]
    if copies:
        out("\nnumpy contract copy cost per sampling step (UNet inputs + output):")
        for r in copies:
            c = r["copy"]
            frac = c["ms"] / r["median_ms"] if r["median_ms"] else float("nan")
            out(f"  {r['backend']:<17} {r['variant']:<18} {r['shape']:<10} {c['bytes'] / 1e6:8.3f} MB  "
                f"{c['ms']:8.4f} ms  {c['kind']:<16} = {100 * frac:6.2f}% of the UNet call")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ksampler_rt.bench.engines", description=__doc__.split("\n")[0])
    ap.add_argument("--export", help="export dir (default: a small hand-made one)")
    ap.add_argument("--backends", default="all", help="comma separated, or 'all' available")
    ap.add_argument("--shapes", default=None, help="image sizes WxH (default 512x512 with --export, else 256x256,512x512)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--models", help="comma separated subset")
    ap.add_argument("--cache", help="engine cache root (default: a temp dir without --export)")
    args = ap.parse_args(argv)
    from ksampler_rt.engines import backend_names
    from ksampler_rt.engines.spec import parse_shapes

    tmp = None
    export = args.export
    if not export:
        from ksampler_rt.engines.testing import make_tiny_export

        tmp = tempfile.TemporaryDirectory(prefix="ksrt-bench-")
        export = make_tiny_export(Path(tmp.name) / "export", "sd15", unet_width=64, unet_depth=4)
        os.environ.setdefault("KSAMPLER_RT_CACHE", str(Path(tmp.name) / "cache"))
        print(f"no --export: using a hand-made export (conv stack width 64, depth 4) in {export}")
    if args.cache:
        os.environ["KSAMPLER_RT_CACHE"] = args.cache
    sizes = parse_shapes(args.shapes or ("512x512" if args.export else "256x256,512x512"))
    backends = backend_names() if args.backends == "all" else [b.strip() for b in args.backends.split(",")]
    models = args.models.split(",") if args.models else None
    rows = run(export, backends, sizes, args.batch, args.repeat, models)
    print_table(rows)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
