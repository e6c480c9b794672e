"""The numpy reference maths of torch's CPU ``randn`` (float32, numel >= 16): uniforms and Box-Muller.

Bottom of the noise stack: imports numpy only. Everything faster (:mod:`.randn_numpy`, the compiled
kernels of :mod:`.jit`) is checked against the functions here.

Reference: torch 2.13 ``ATen/native/cpu/DistributionTemplates.h`` (``normal_fill``,
``NormalFill16``), ``ATen/core/TransformationHelper.h``, ``ATen/native/cpu/avx_mathfun.h``; see
/work/shared/reference/torch-cpu-randn.md.

* Uniforms: ``uniform_real_distribution<float>(0, 1)`` is ``(u32 & 0xFFFFFF) * 2**-24`` (exact).
* ``normal_fill``: all ``n`` uniforms are drawn first, then Box-Muller runs on each block of 16
  (``u1 = 1 - d[0:8]``, ``u2 = d[8:16]``; out ``d[0:8] = r cos``, ``d[8:16] = r sin``). If
  ``n % 16 != 0``, 16 *fresh* uniforms are drawn and their block overwrites the last 16 elements.
  Every output is ``fma(r * cos, std=1, mean=0)``: exact, except that ``-0`` becomes ``+0``.
* Box-Muller kernels (which one torch runs depends on the ATen CPU capability, see
  :func:`.generator.kernel_for_capability`):

  - ``"avx2"``: ``NormalFill16<float>``'s AVX2 specialisation, Cephes ``log256_ps`` /
    ``sincos256_ps`` in float32 with GCC's FMA contractions. Emulated here exactly: an FMA of
    float32 values is the exact float64 product plus the addend, rounded to float32 (double
    rounding is possible in principle; the fast kernels are checked against this over the whole
    2**24-value input domain and do not double-round).
  - ``"default"``: the scalar primary template: glibc ``logf`` and ``sincosf`` in float, with
    ``theta = (float)(2*pi_double * (double)u2)``. :func:`box_muller_default` computes those
    functions in float64 and rounds to float32; glibc's float functions are not correctly
    rounded, so about 1.5 % of elements differ from torch: by 1 ulp mostly, at most 3 ulp in
    3 million elements measured (no proven bound). The compiled kernel calls the process's own
    libm and is bit-exact; see :mod:`.jit`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
from typing import Optional

import numpy as np

__all__ = [
    "box_muller_avx2",
    "box_muller_default",
    "box_muller_libm",
    "libm",
    "log256_ps",
    "normal_fill",
    "sincos256_ps",
    "u32_to_uniform",
]

F32 = np.float32
F64 = np.float64

# avx_mathfun.h constants (float32)
LOG_P = [F32(v) for v in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
    -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)]
LOG_Q1 = F32(-2.12194440e-4)
LOG_Q2 = F32(0.693359375)
SQRTHF = F32(0.707106781186547524)
MIN_NORM = np.uint32(0x00800000).view(F32)
MDP1 = F64(F32(-0.78515625))
MDP2 = F64(F32(-2.4187564849853515625e-4))
MDP3 = F64(F32(-3.77489497744594108e-8))
SINCOF = [F32(v) for v in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)]
COSCOF = [F32(v) for v in (2.443315711809948e-005, -1.388731625493765e-003, 4.166664568298827e-002)]
FOPI = F32(1.27323954473516)
TWO_PI_F32 = F32(2.0 * math.pi)      # the AVX2 kernel's theta factor
TWO_PI_F64 = 2.0 * math.pi           # the scalar kernel's (2.0f * c10::pi<double>)
TWO_M24 = F32(2.0**-24)
HALF = F32(0.5)
ONE = F32(1.0)
ZERO = F32(0.0)


def fma32(a, b, c):
    """float32 fma(a, b, c): the float64 product of two floats is exact; one rounding to f64 of the
    sum, then to f32 (double rounding is theoretically possible, never observed)."""
    t = np.multiply(a, b, dtype=F64)
    t += c
    return t.astype(F32)


def log256_ps(x: np.ndarray) -> np.ndarray:
    """avx_mathfun.h ``log256_ps`` for float32 x > 0 (FMA contraction points as GCC emits)."""
    x = np.maximum(x, MIN_NORM)
    bits = x.view(np.uint32)
    e = ((bits >> np.uint32(23)).astype(np.int32) - 127).astype(F32)
    e += ONE
    m = ((bits & np.uint32(0x807FFFFF)) | np.uint32(0x3F000000)).view(F32)
    mask = m < SQRTHF
    xm = m - ONE
    xm += np.where(mask, m, F32(0))
    e -= mask.astype(F32)
    z = xm * xm
    y = fma32(LOG_P[0], xm, LOG_P[1])
    for p in LOG_P[2:]:
        y = fma32(y, xm, p)
    y *= xm
    y = fma32(y, z, e * LOG_Q1)
    y -= z * HALF
    xm += y
    return fma32(e, LOG_Q2, xm)


def sincos256_ps(x: np.ndarray):
    """avx_mathfun.h ``sincos256_ps`` for float32 x >= 0 (FMA contraction points as GCC emits)."""
    j = (x * FOPI).astype(np.int32)
    j += 1
    j &= ~1
    y = j.astype(F64)
    # x = ((x - y*DP1) - y*DP2) - y*DP3, each step an FMA
    xr = (y * MDP1 + x).astype(F32)
    xr = (y * MDP2 + xr).astype(F32)
    xr = (y * MDP3 + xr).astype(F32)
    z = xr * xr
    yc = fma32(fma32(COSCOF[0], z, COSCOF[1]), z, COSCOF[2])
    yc = fma32(yc * z, z, -(z * HALF))
    yc += ONE
    ys = fma32(fma32(SINCOF[0], z, SINCOF[1]), z, SINCOF[2])
    ys = fma32(ys * z, xr, xr)
    poly = (j & 2) == 0
    s = np.where(poly, ys, yc)
    c = np.where(poly, yc, ys)
    ju = j.view(np.uint32)
    s.view(np.uint32)[...] ^= (ju & np.uint32(4)) << np.uint32(29)
    c.view(np.uint32)[...] ^= (~(ju - np.uint32(2)) & np.uint32(4)) << np.uint32(29)
    return s, c


def box_muller_avx2(u1: np.ndarray, u2: np.ndarray):
    """``NormalFill16<float>`` AVX2 specialisation (mean 0, std 1): returns (r cos, r sin)."""
    radius = np.sqrt(F32(-2.0) * log256_ps(u1))
    s, c = sincos256_ps(TWO_PI_F32 * u2)
    return radius * c + ZERO, radius * s + ZERO  # fma(., std, mean): -0 -> +0


def box_muller_default(u1: np.ndarray, u2: np.ndarray):
    """Scalar ``NormalFill16`` primary template (mean 0, std 1), glibc's float functions computed
    in float64 and rounded: about 1.5 % of elements differ from torch, by at most 3 ulp measured.

    torch: ``radius = sqrtf(-2 * logf(u1))``, ``theta = (float)(2*pi_double * (double)u2)``,
    ``out = fma(radius * cosf(theta), 1, 0)`` / the same with ``sinf``.
    """
    lg = np.log(u1.astype(F64)).astype(F32)
    radius = np.sqrt(F32(-2.0) * lg)
    theta = (TWO_PI_F64 * u2.astype(F64)).astype(F32).astype(F64)
    return (radius * np.cos(theta).astype(F32) + ZERO,
            radius * np.sin(theta).astype(F32) + ZERO)


BOX_MULLER = {"avx2": box_muller_avx2, "default": box_muller_default}


def u32_to_uniform(raw: np.ndarray) -> np.ndarray:
    """``uniform_real_distribution<float>(0,1)``: ``(u32 & 0xFFFFFF) * 2**-24`` (exact)."""
    bits = raw.astype(np.uint32)
    bits &= np.uint32(0xFFFFFF)
    return bits.view(np.int32).astype(F32) * TWO_M24


def normal_fill(u: np.ndarray, n: int, kernel: str) -> np.ndarray:
    """``normal_fill`` of ``n`` (>= 16) outputs from ``n`` uniforms (+16 fresh ones when n % 16).

    ``u``: float32 uniforms, one row per draw (``[..., n + tail]``); returns float32 ``[..., n]``.
    """
    lead = u.shape[:-1]
    u = u.reshape(-1, u.shape[-1])
    nb = n // 16
    tail = (n % 16) != 0
    blocks = np.concatenate([u[:, : nb * 16], u[:, n: n + 16]], axis=1) if tail else u[:, : nb * 16]
    blocks = blocks.reshape(-1, 2, 8)
    a, b = BOX_MULLER[kernel](ONE - blocks[:, 0, :], np.ascontiguousarray(blocks[:, 1, :]))
    res = np.empty(blocks.shape, dtype=F32)
    res[:, 0, :] = a
    res[:, 1, :] = b
    res = res.reshape(u.shape[0], -1)
    out = np.empty((u.shape[0], n), dtype=F32)
    out[:, : nb * 16] = res[:, : nb * 16]
    if tail:  # overlapping tail: the last 16 elements come from the fresh block
        out[:, n - 16:] = res[:, nb * 16:]
    return out.reshape(lead + (n,))


def libm() -> Optional[ctypes.CDLL]:
    """The C maths library this process resolves ``logf``/``sinf``/``cosf`` from (the one torch's
    scalar kernel and the compiled kernels call), with float signatures; None where unreachable."""
    for name in (None, ctypes.util.find_library("m")):
        try:
            lib = ctypes.CDLL(name)
            fns = [getattr(lib, f) for f in ("logf", "sinf", "cosf")]
        except (OSError, AttributeError, TypeError):
            continue
        for fn in fns:
            fn.restype = ctypes.c_float
            fn.argtypes = [ctypes.c_float]
        return lib
    return None


def box_muller_libm(u1: np.ndarray, u2: np.ndarray, lib) -> tuple:
    """The scalar ``NormalFill16`` exactly, calling libm's float functions one element at a time
    (``lib`` from :func:`libm`): the oracle of the compiled DEFAULT kernel (slow: ~1 us/element)."""
    lg = np.array([lib.logf(float(v)) for v in u1.reshape(-1)], F32).reshape(u1.shape)
    radius = np.sqrt(F32(-2.0) * lg)
    theta = (TWO_PI_F64 * u2.astype(F64)).astype(F32)
    cos = np.array([lib.cosf(float(v)) for v in theta.reshape(-1)], F32).reshape(u2.shape)
    sin = np.array([lib.sinf(float(v)) for v in theta.reshape(-1)], F32).reshape(u2.shape)
    return radius * cos + ZERO, radius * sin + ZERO
