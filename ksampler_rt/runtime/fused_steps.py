"""Compiled fused passes (numba, extra ``[jit]``) for multistep sampler updates on big latents.

:func:`ipndm_step`: iPNDM's Adams-Bashforth update ``x + (sigma_next - sigma) * sum_k w_k d_k / div``
(ComfyUI ``sample_ipndm``) in one pass instead of ~2k+2 numpy passes, bit-identical to the numpy
expression in :mod:`.samplers.multistep` (the reference and fallback). Follows :func:`.jit.available`
and self-checks on first use; importing this module never imports numba.
"""
from __future__ import annotations

import numpy as np

from . import jit

__all__ = ["available", "fusable", "ipndm_step", "res_step"]

F32 = np.float32
_K: dict = {}


def available() -> bool:
    """True when the compiled kernels are on and passed their self-check."""
    return _KERNELS.available()


def fusable(*arrays) -> bool:
    """C-contiguous float32 arrays of one shape (anything else stays on numpy's promotion rules)."""
    shape = arrays[0].shape
    return all(isinstance(a, np.ndarray) and a.dtype == F32 and a.flags.c_contiguous and a.shape == shape
               for a in arrays)


def _compile() -> None:
    if not _K:
        from . import _fused_step_kernels as k

        _K.update(ipndm_step=k.ipndm_step, res_step=k.res_step)


def ipndm_step(x: np.ndarray, ds: list, weights, div: int, step) -> np.ndarray:
    """``x + step * (w0 ds[0] + w1 ds[1] + ...) / div`` (2 to 4 terms, left to right); integer weights
    and div exact in float32, ``step`` a float32 scalar. Callers check :func:`available` and
    :func:`fusable`."""
    if not 2 <= len(ds) <= 4 or len(weights) != len(ds):
        raise ValueError(f"ds: received {len(ds)} arrays, expected 2 to 4 matching weights")
    flat = [d.reshape(-1) for d in ds]
    flat += [flat[0]] * (4 - len(flat))
    w = [F32(v) for v in weights] + [F32(0)] * (4 - len(weights))
    out = np.empty_like(x)
    _K["ipndm_step"](x.reshape(-1), *flat, len(ds) - 1, *w, F32(step), F32(div), out.reshape(-1))
    return out


def res_step(x, denoised, guide, old, nz, cfg_pp: bool, a, h, b1, b2, s_noise, sigma_up) -> np.ndarray:
    """ComfyUI ``res_multistep``'s second-order step ``a * x + h * (b1 * guide + b2 * old)`` (x first
    shifted by ``denoised - guide`` under CFG++), then ``+ nz * s_noise * sigma_up`` when ``nz`` is not
    None; every scalar a float32 (callers check, with :func:`available` and :func:`fusable`)."""
    noisy = nz is not None
    out = np.empty_like(x)
    f = [v.reshape(-1) for v in (x, denoised, guide, old, nz if noisy else x)]
    _K["res_step"](*f, bool(cfg_pp), F32(a), F32(h), F32(b1), F32(b2), F32(s_noise), F32(sigma_up), noisy,
                   out.reshape(-1))
    return out


def _reference_ipndm(x, ds, weights, div, step):
    acc = weights[0] * ds[0]
    for w, d in zip(weights[1:], ds[1:]):
        acc = acc + w * d
    return x + step * acc / div


def _self_check() -> None:
    rng = np.random.default_rng(0)
    a = [rng.standard_normal((3, 5, 7)).astype(F32) for _ in range(5)]
    step = F32(-0.137)
    for weights, div in (((3, -1), 2), ((23, -16, 5), 12), ((55, -59, 37, -9), 24)):
        ds = a[1:1 + len(weights)]
        if not np.array_equal(ipndm_step(a[0], ds, weights, div, step), _reference_ipndm(a[0], ds, weights, div, step)):
            raise RuntimeError("self-check failed: ipndm_step")
    x, den, g, od, nz = a
    s = [F32(v) for v in (0.71, -0.33, 1.21, -0.45, 0.9, 0.27)]
    for pp in (False, True):
        xx = x + (den - g) if pp else x
        want = s[0] * xx + s[1] * (s[2] * g + s[3] * od)
        if not (np.array_equal(res_step(x, den, g, od, None, pp, *s), want)
                and np.array_equal(res_step(x, den, g, od, nz, pp, *s), want + nz * s[4] * s[5])):
            raise RuntimeError("self-check failed: res_step")


_KERNELS = jit.CheckedKernels("fused step passes", _compile, _self_check)
