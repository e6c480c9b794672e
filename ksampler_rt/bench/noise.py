"""Noise micro-benchmark: ``python -m ksampler_rt.bench.noise``.

Prints prepare_noise vs torch.randn for [1,4,64,64] and [1,4,128,128] (median of repeats, one
thread), for both Box-Muller kernels (``avx2``; ``default``, torch's scalar one), and the
Brownian-tree query time vs torchsde for a dpmpp_2m_sde-like query sequence. Ours runs on the
compiled kernels (numba, extra ``[jit]``) when present and on the numpy path, side by side. torch's peer is ``torch.randn`` on a generator of its own (the kernel alone,
the strict comparison) and with ``torch.manual_seed`` as ComfyUI's prepare_noise calls it.
torch/torchsde are optional peers, imported only here.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
import warnings

import numpy as np

from ksampler_rt.runtime import jit
from ksampler_rt.runtime.brownian import BrownianTree
from ksampler_rt.runtime.cpu_capability import aten_capability
from ksampler_rt.runtime.noise import KERNELS, default_kernel, prepare_noise


@contextlib.contextmanager
def _numpy_path():
    """Run the noise stack on its numpy path (compiled kernels reported unavailable)."""
    saved = jit.available
    jit.available = lambda: False
    try:
        yield
    finally:
        jit.available = saved


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


def _karras(n, smin=0.0291675, smax=14.614642, rho=7.0):
    ramp = np.linspace(0, 1, n)
    mi, ma = smin ** (1 / rho), smax ** (1 / rho)
    return ((ma + ramp * (mi - ma)) ** rho).astype(np.float32)


def _tree_queries(tree_factory, sig):
    tree = tree_factory()
    ts = []
    for i in range(len(sig) - 1):
        t = time.perf_counter()
        tree(float(sig[i + 1]), float(sig[i]))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3), float(np.sum(ts) * 1e3)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        torch = None
        print("torch not installed: skipping the torch.randn peer")
    here = default_kernel()
    print(f"ATen CPU capability: {aten_capability()}; torch's randn kernel here: {here}; compiled kernels: "
          f"{'yes' if jit.available() else 'no (' + jit.disable_reason() + ')'}")
    for kernel, shape in [(k, s) for k in sorted(KERNELS, key=lambda k: k != here)
                          for s in [(1, 4, 64, 64), (1, 4, 128, 128)]]:
        lat = np.zeros(shape, np.float32)
        ours = {}
        if jit.has_kernel(kernel):
            ours["compiled"] = _median_ms(lambda: prepare_noise(lat, 42, kernel=kernel), args.repeats)
        with _numpy_path():
            ours["numpy"] = _median_ms(lambda: prepare_noise(lat, 42, kernel=kernel), args.repeats)
        line = f"prepare_noise {list(shape)} ({kernel} kernel): " + ", ".join(
            f"{k} {v:.3f} ms" for k, v in ours.items())
        if torch is not None and kernel == here:  # in-process torch runs this machine's kernel only
            gen = torch.Generator()
            own = _median_ms(lambda: torch.randn(shape, generator=gen.manual_seed(42)), args.repeats)
            comfy = _median_ms(lambda: torch.randn(shape, generator=torch.manual_seed(42)),
                               args.repeats)
            line += (f" | torch.randn own generator {own:.3f} ms, with torch.manual_seed "
                     f"{comfy:.3f} ms | ratio " + ", ".join(
                         f"{k} {v / own:.2f}x / {v / comfy:.2f}x" for k, v in ours.items()))
        print(line)

    sig = _karras(args.steps)
    shape = (1, 4, 64, 64)
    t0, t1 = float(sig[-1]), float(sig[0])
    med, tot = _tree_queries(lambda: BrownianTree(t0, t1, shape, 42), sig)
    path = "compiled" if jit.available() else "numpy"
    line = (f"BrownianTree {list(shape)}, {args.steps - 1} decreasing queries: ours ({path}) median "
            f"{med:.2f} ms/query (total {tot:.1f} ms)")
    try:
        import torchsde
    except ImportError:
        torchsde = None
        print(line)
        print("torchsde not installed: skipping the torchsde peer")
    if torchsde is not None and torch is not None:
        def make():
            return torchsde.BrownianTree(torch.tensor(t0), torch.zeros(shape), torch.tensor(t1),
                                         entropy=42)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rmed, rtot = _tree_queries(make, sig)
        line += f" | torchsde median {rmed:.2f} ms/query (total {rtot:.1f} ms) | ratio {med / rmed:.2f}x"
        print(line)
    print(f"(cpu count {os.cpu_count()}; timings are wall-clock medians)")


if __name__ == "__main__":
    main()
