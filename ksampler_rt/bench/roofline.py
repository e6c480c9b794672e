"""How fast can a UNet call get on this CPU? ``python -m ksampler_rt.bench.roofline``.

Measures, side by side in one run:

* the machine's fp32 peak as the best of a large sgemm (torch) and 3x3 convolutions (OpenVINO when
  installed, else torch), with ``--threads`` threads;
* the work of one UNet call of a benchmark model (``--model``, see ``bench/models.py``) at the CFG
  batch of 2: torch's FLOP counter over the diffusers UNet (convolutions, linear layers, attention);
* torch eager's time for that call, and the product's engines' (every available CPU backend).

It prints the floor (work / peak) and the best end-to-end ratio against torch eager that any fp32
runtime could reach on this machine: the bound behind the benchmark issue's 2x target on CPUs.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def _best_s(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def peak_gflops(threads: int, repeats: int = 5) -> dict:
    """Best measured fp32 GFLOP/s: sgemm 2048^3 and 3x3 convolutions of UNet-like sizes."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    out["torch sgemm 2048"] = 2 * n ** 3 / _best_s(lambda: a @ b, repeats) / 1e9
    try:
        import openvino as ov
        import openvino.opset13 as ops
    except ImportError:
        ov = None
    for c, hw in ((320, 16), (160, 32)):
        flops = 2 * 2 * c * c * 9 * hw * hw
        x = np.random.default_rng(0).standard_normal((2, c, hw, hw)).astype(np.float32)
        w = np.random.default_rng(1).standard_normal((c, c, 3, 3)).astype(np.float32)
        if ov is not None:
            p = ops.parameter([2, c, hw, hw], np.float32)
            conv = ops.convolution(p, ops.constant(w), [1, 1], [1, 1], [1, 1], [1, 1])
            compiled = ov.Core().compile_model(ov.Model([conv], [p]), "CPU", {
                "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
            req = compiled.create_infer_request()
            out[f"openvino conv3x3 {c}ch {hw}x{hw}"] = flops / _best_s(lambda r=req, v=x: r.infer([v]), repeats) / 1e9
        xt, wt = torch.from_numpy(x), torch.from_numpy(w)
        out[f"torch conv3x3 {c}ch {hw}x{hw}"] = flops / _best_s(
            lambda a=xt, k=wt: torch.nn.functional.conv2d(a, k, padding=1), repeats) / 1e9
    return out


def unet_work(source_dir, latent_hw: int, threads: int, repeats: int = 3) -> tuple[float, float, int]:
    """(GFLOP, torch eager seconds, context width) of one UNet call at batch 2 (CFG), 77 tokens."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(threads)
    unet = UNet2DConditionModel.from_pretrained(str(source_dir), subfolder="unet").eval()
    width = unet.config.cross_attention_dim
    x = torch.randn(2, unet.config.in_channels, latent_hw, latent_hw)
    t = torch.full((2,), 500.0)
    ctx = torch.randn(2, 77, width)
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            unet(x, t, ctx)
        seconds = _best_s(lambda: unet(x, t, ctx), repeats)
    return counter.get_total_flops() / 1e9, seconds, width


def engine_call_s(export_dir, backend: str, latent_hw: int, width: int, threads: int, repeats: int = 3) -> float:
    """Best time of one UNet engine call (batch 2, 77 tokens) on ``backend``."""
    from ..engines import LoadOptions, load_engines

    with load_engines(export_dir, backend, LoadOptions(threads=threads, build_missing=True),
                      models=["unet"]) as engines:
        channels = int(engines.manifest.data.get("latent_channels", 4))
        x = np.random.default_rng(0).standard_normal((2, channels, latent_hw, latent_hw)).astype(np.float32)
        t = np.full((2,), 500.0, np.float32)
        ctx = np.random.default_rng(1).standard_normal((2, 77, width)).astype(np.float32)
        unet = engines.unet_callable()
        return _best_s(lambda: unet(x, t, ctx), repeats)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="half-sd15", help="tiny, half-sd15 or a diffusers folder")
    ap.add_argument("--sizes", default="128,256", help="image sizes in pixels (square), comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="onnxruntime-cpu,openvino-cpu")
    args = ap.parse_args(argv)
    from .models import resolve_model

    model = resolve_model(args.model, log=lambda m: None)
    if model.source_dir is None:
        raise SystemExit(f"--model {args.model}: no diffusers folder to count the UNet's work with; pass the "
                         "diffusers folder (or an export whose manifest names one)")
    peaks = peak_gflops(args.threads)
    peak = max(peaks.values())
    print(f"fp32 peak with {args.threads} threads: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items())
          + f" GFLOP/s -> peak {peak:.1f}")
    for size in (int(s) for s in args.sizes.split(",")):
        hw = size // 8
        gflop, torch_s, width = unet_work(model.source_dir, hw, args.threads)
        floor = gflop / peak
        print(f"{model.name} UNet call, batch 2, {size}x{size}: {gflop:.1f} GFLOP; floor at peak {floor:.3f} s; "
              f"torch eager {torch_s:.3f} s ({gflop / torch_s:.1f} GFLOP/s); best possible ratio vs eager "
              f"{torch_s / floor:.2f}x")
        for backend in (b for b in args.backends.split(",") if b):
            try:
                s = engine_call_s(model.export_dir, backend, hw, width, args.threads)
            except Exception as exc:  # noqa: BLE001 - a missing backend is reported, not fatal
                print(f"  {backend}: unavailable ({exc})")
                continue
            print(f"  {backend}: {s:.3f} s ({gflop / s:.1f} GFLOP/s, {s / floor:.2f}x the floor, "
                  f"{torch_s / s:.2f}x faster than torch eager)")


if __name__ == "__main__":
    main()
