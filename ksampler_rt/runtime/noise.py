"""Bit-exact numpy reproduction of torch's CPU ``randn`` and of ComfyUI's noise sources.

Nothing here imports torch; torch is only a test-time oracle.

Behaviour reproduced (torch 2.13, read from ``ATen/native/cpu/DistributionTemplates.h``,
``ATen/core/DistributionsHelper.h``, ``ATen/core/TransformationHelper.h``,
``ATen/native/cpu/avx_mathfun.h``; see /work/shared/reference/torch-cpu-randn.md):

* Engine: ``at::mt19937`` seeded with ``init_genrand(seed & 0xffffffff)``. This is the same stream
  as numpy's ``MT19937`` with legacy seeding, so numpy's C implementation supplies the raw words.
* ``numel >= 16`` (contiguous float32): ``normal_fill`` -- all ``n`` float uniforms
  ``(u32 & 0xFFFFFF) * 2**-24`` are drawn first, then Box-Muller runs on each block of 16
  (``u1 = 1 - d[0:8]``, ``u2 = d[8:16]``). If ``n % 16 != 0``, 16 *fresh* uniforms are drawn and
  their Box-Muller result overwrites the last 16 elements.
* ``numel < 16``: ``at::normal_distribution<double>`` per element: two 53-bit doubles
  (``random64 = hi32 << 32 | lo32``), ``r = sqrt(-2 log1p(-u2))``, ``theta = 2 pi u1``, returns
  ``r cos(theta)`` and caches ``r sin(theta)`` in the generator for the next scalar draw. The cache
  survives across calls (the >= 16 path neither reads nor clears it) and ``manual_seed`` clears it.
* The Box-Muller arithmetic of the >= 16 path depends on the ATen CPU capability:
  - ``"avx2"``: ``NormalFill16<float>`` AVX2 specialisation with the Cephes-style ``log256_ps`` and
    ``sincos256_ps`` of ``avx_mathfun.h`` in float32, with GCC's FMA contractions (found
    empirically, see the reference doc). FMA is emulated as an exact float64 product plus the
    addend, rounded to float32 (double rounding is possible in principle; never observed).
  - ``"default"`` (scalar template; also what torch uses with AVX512 and on non-x86): glibc
    ``logf``/``cosf``/``sinf`` with ``theta = (float)(2*pi_double * u2)``. glibc's float functions
    are emulated with float64 numpy functions rounded to float32; glibc is not always correctly
    rounded, so about 1-2 % of elements may differ by 1 ulp from torch (|diff| <= 2.4e-7 for
    |x| < 4). See ``_box_muller_default``.
"""
from __future__ import annotations

import math
import os
import platform
import threading
from typing import Callable, Optional

import numpy as np

from . import jit

__all__ = [
    "TorchCPUGenerator",
    "default_kernel",
    "prepare_noise",
    "NoiseSource",
    "BrownianNoiseSampler",
    "DefaultNoiseSampler",
    "KERNELS",
]

KERNELS = ("avx2", "default")
_ENV_KERNEL = "KSAMPLER_RT_RANDN_KERNEL"
_MAX_SEED = 2**64 - 1

_F32 = np.float32
_F64 = np.float64

# ---------------------------------------------------------------------------------------------
# kernel selection
# ---------------------------------------------------------------------------------------------
_detected_kernel: Optional[str] = None


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", "r", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def default_kernel() -> str:
    """The Box-Muller kernel torch's CPU randn uses on this machine.

    Order: env ``KSAMPLER_RT_RANDN_KERNEL`` (``avx2``/``default``), then torch's own override
    ``ATEN_CPU_CAPABILITY`` (``avx2`` -> avx2, anything else -> default), then /proc/cpuinfo:
    ``avx2`` when the CPU has avx2+fma and no avx512 (torch prefers its AVX512 build, whose
    normal_fill is the scalar template), else ``default``.
    """
    env = os.environ.get(_ENV_KERNEL, "").strip().lower()
    if env:
        if env not in KERNELS:
            raise ValueError(
                f"{_ENV_KERNEL}: got {env!r}; accepted values are 'avx2' or 'default'"
            )
        return env
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if aten:
        return "avx2" if aten == "avx2" else "default"
    global _detected_kernel
    if _detected_kernel is None:
        machine = platform.machine().lower()
        flags = _cpu_flags() if machine in ("x86_64", "amd64", "i686", "i386") else set()
        has_avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
        _detected_kernel = "avx2" if ("avx2" in flags and "fma" in flags and not has_avx512) else "default"
    return _detected_kernel


def _check_kernel(kernel: Optional[str]) -> str:
    if kernel is None:
        return default_kernel()
    if kernel not in KERNELS:
        raise ValueError(f"kernel: got {kernel!r}; accepted values are 'avx2', 'default' or None")
    return kernel


def _check_seed(seed, name: str = "seed") -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(
            f"{name}: got {seed!r} of type {type(seed).__name__}; accepted: an int in [0, 2**64-1]"
        )
    seed = int(seed)
    if seed < 0 or seed > _MAX_SEED:
        raise ValueError(f"{name}: got {seed}; accepted: an int in [0, 2**64-1]")
    return seed


def _check_shape(shape) -> tuple:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape: got {shape!r}; accepted: a tuple of non-negative ints") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"shape: got {shape}; accepted: a tuple of non-negative ints")
    return shape


# ---------------------------------------------------------------------------------------------
# AVX2 kernel: avx_mathfun.h log256_ps / sincos256_ps with GCC's FMA contractions
# ---------------------------------------------------------------------------------------------
_LOG_P = [_F32(v) for v in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
    -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)]
_LOG_Q1 = _F32(-2.12194440e-4)
_LOG_Q2 = _F32(0.693359375)
_SQRTHF = _F32(0.707106781186547524)
_MIN_NORM = np.uint32(0x00800000).view(_F32)
_MDP1 = _F64(_F32(-0.78515625))
_MDP2 = _F64(_F32(-2.4187564849853515625e-4))
_MDP3 = _F64(_F32(-3.77489497744594108e-8))
_SINCOF = [_F32(v) for v in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)]
_COSCOF = [_F32(v) for v in (2.443315711809948e-005, -1.388731625493765e-003, 4.166664568298827e-002)]
_FOPI = _F32(1.27323954473516)
_TWO_PI_F32 = _F32(2.0 * math.pi)
_HALF = _F32(0.5)
_ONE = _F32(1.0)
_SIGN = np.uint32(0x80000000)


def _fma(a, b, c):
    """float32 fma(a, b, c): the float64 product of two floats is exact; one rounding to f64 of the
    sum, then to f32 (double rounding is theoretically possible, never observed)."""
    t = np.multiply(a, b, dtype=_F64)
    t += c
    return t.astype(_F32)


def _log256_ps(x: np.ndarray) -> np.ndarray:
    """avx_mathfun.h ``log256_ps`` for float32 x > 0 (FMA contraction points as GCC emits)."""
    x = np.maximum(x, _MIN_NORM)
    bits = x.view(np.uint32)
    e = ((bits >> np.uint32(23)).astype(np.int32) - 127).astype(_F32)
    e += _ONE
    m = ((bits & np.uint32(0x807FFFFF)) | np.uint32(0x3F000000)).view(_F32)
    mask = m < _SQRTHF
    xm = m - _ONE
    xm += np.where(mask, m, _F32(0))
    e -= mask.astype(_F32)
    z = xm * xm
    y = _fma(_LOG_P[0], xm, _LOG_P[1])
    for p in _LOG_P[2:]:
        y = _fma(y, xm, p)
    y *= xm
    y = _fma(y, z, e * _LOG_Q1)
    y -= z * _HALF
    xm += y
    return _fma(e, _LOG_Q2, xm)


def _sincos256_ps(x: np.ndarray):
    """avx_mathfun.h ``sincos256_ps`` for float32 x >= 0 (FMA contraction points as GCC emits)."""
    j = (x * _FOPI).astype(np.int32)
    j += 1
    j &= ~1
    y = j.astype(_F64)
    # x = ((x - y*DP1) - y*DP2) - y*DP3, each step an FMA
    xr = (y * _MDP1 + x).astype(_F32)
    xr = (y * _MDP2 + xr).astype(_F32)
    xr = (y * _MDP3 + xr).astype(_F32)
    z = xr * xr
    yc = _fma(_fma(_COSCOF[0], z, _COSCOF[1]), z, _COSCOF[2])
    yc = _fma(yc * z, z, -(z * _HALF))
    yc += _ONE
    ys = _fma(_fma(_SINCOF[0], z, _SINCOF[1]), z, _SINCOF[2])
    ys = _fma(ys * z, xr, xr)
    poly = (j & 2) == 0
    s = np.where(poly, ys, yc)
    c = np.where(poly, yc, ys)
    ju = j.view(np.uint32)
    s.view(np.uint32)[...] ^= (ju & np.uint32(4)) << np.uint32(29)
    c.view(np.uint32)[...] ^= (~(ju - np.uint32(2)) & np.uint32(4)) << np.uint32(29)
    return s, c


def _box_muller_avx2(u1: np.ndarray, u2: np.ndarray):
    """``NormalFill16<float>`` AVX2 specialisation (mean 0, std 1): returns (r cos, r sin)."""
    radius = np.sqrt(_F32(-2.0) * _log256_ps(u1))
    s, c = _sincos256_ps(_TWO_PI_F32 * u2)
    return radius * c, radius * s


def _box_muller_default(u1: np.ndarray, u2: np.ndarray):
    """Scalar ``NormalFill16`` primary template (mean 0, std 1).

    torch: ``radius = sqrtf(-2 * logf(u1))``, ``theta = (float)(2*pi_double * (double)u2)``,
    ``out = radius * cosf(theta)`` / ``radius * sinf(theta)``. glibc's logf/cosf/sinf are emulated
    by float64 numpy functions rounded to float32 (correctly rounded almost always; glibc is
    not always, so a small fraction of elements can be 1 ulp off torch).
    """
    lg = np.log(u1.astype(_F64)).astype(_F32)
    radius = np.sqrt(_F32(-2.0) * lg)
    theta = ((2.0 * math.pi) * u2.astype(_F64)).astype(_F32).astype(_F64)
    return radius * np.cos(theta).astype(_F32), radius * np.sin(theta).astype(_F32)


_BOX_MULLER = {"avx2": _box_muller_avx2, "default": _box_muller_default}


# ---------------------------------------------------------------------------------------------
# Fast AVX2 kernel: the same float32 operation sequence as _box_muller_avx2, restructured for
# speed. Verified bit-identical to it over the *whole* input domain: u1 and u2 take only 2**24
# values each (24-bit uniforms), the radius depends only on u1 and (sin, cos) only on u2, so
# exhaustive checks are cheap (tests/runtime/test_noise.py::test_fast_kernel_exhaustive, opt-in).
#
# Speed-ups (one numpy pass per operation, all into preallocated per-thread buffers):
# * the raw words are de-interleaved once into (u1 words | u2 words);
# * log256: u1 = 1 - k*2**-24 exactly; the exponent/mantissa split uses the glibc-style
#   ``bits - bits(sqrt(1/2))`` trick (k = that >> 23, mantissa in [sqrt(1/2), sqrt(2))), which
#   gives the same e and xm as Cephes' ``m < SQRTHF`` adjustment;
# * an FMA fma(a, b, c) of float32s is ``float32(a*b + c)`` in float64 (a*b exact). Where the
#   result of a Horner step stays inside one binade [2**k, 2**(k+1)) for every input (checked
#   exhaustively, see ``_ONE_BINADE``), the rounding to float32 is done with a float64 "magic"
#   constant C = 1.5*2**(k+29) whose ulp equals the float32 ulp: ``(a*b + (c + C)) - C`` is a
#   single correctly rounded result (no double rounding), and saves two casts;
# * range reduction: the first two Cephes FMAs are exact, so x - j*(DP1+DP2) - j*DP3 is formed
#   exactly in float64 and rounded once, as the third FMA does;
# * the sin/cos polynomial selection and sign flips are integer bit operations (no np.where).
# Per-call numpy overhead matters at these sizes (about 1 us per call), so constants are 0-d
# arrays of the operand dtype (scalar type resolution is slower) and nothing is chunked.
# ---------------------------------------------------------------------------------------------
_I32 = np.int32
_U32 = np.uint32


def _c(v, dt):
    return np.array(v, dtype=dt)


_K_LOG_P64 = [_c(_F64(p), _F64) for p in _LOG_P]
_K_LOG_Q1 = _c(_LOG_Q1, _F32)
_K_LOG_Q2 = _c(_LOG_Q2, _F32)


def _magic(binade: int) -> float:
    """float64 constant whose ulp is the float32 ulp in [2**binade, 2**(binade+1))."""
    return 1.5 * 2.0 ** (binade + 29)


# binade of |result| of each single-binade FMA over the whole input domain (exhaustively checked)
_ONE_BINADE = {"log_p8": -2, "cos_1": -10, "cos_2": -5, "sin_1": -7, "sin_2": -3}
_M_LOG8 = _magic(_ONE_BINADE["log_p8"])
_K_LOG8_PC = _c(_F64(_LOG_P[-1]) + _M_LOG8, _F64)
_K_LOG8_C = _c(_M_LOG8, _F64)
_M_C1, _M_C2 = _magic(_ONE_BINADE["cos_1"]), _magic(_ONE_BINADE["cos_2"])
_M_S1, _M_S2 = _magic(_ONE_BINADE["sin_1"]), _magic(_ONE_BINADE["sin_2"])
_K_COS0 = _c(_F64(_COSCOF[0]), _F64)
_K_COS1_PC, _K_COS1_C = _c(_F64(_COSCOF[1]) + _M_C1, _F64), _c(_M_C1, _F64)
_K_COS2_PC, _K_COS2_C = _c(_F64(_COSCOF[2]) + _M_C2, _F64), _c(_M_C2, _F64)
_K_SIN0 = _c(_F64(_SINCOF[0]), _F64)
_K_SIN1_PC, _K_SIN1_C = _c(_F64(_SINCOF[1]) + _M_S1, _F64), _c(_M_S1, _F64)
_K_SIN2_PC, _K_SIN2_C = _c(_F64(_SINCOF[2]) + _M_S2, _F64), _c(_M_S2, _F64)
_K_C12 = _c(_MDP1 + _MDP2, _F64)  # exact: -13176794 * 2**-24
_K_DP3 = _c(_MDP3, _F64)
_K_THETA = _c(_TWO_PI_F32 * _F32(2.0**-24), _F32)  # 2pi_f32 * (k * 2**-24) == (k * this)
_K_FOPI = _c(_FOPI, _F32)
_K_HALF = _c(_HALF, _F32)
_K_ONE32 = _c(1.0, _F32)
_K_M2 = _c(-2.0, _F32)
_K_MU = _c(-(2.0**-24), _F32)
_K_SQRTHF_BITS = _c(0x3F3504F3, _I32)
_K_EXPMASK = _c(-0x800000, _I32)
_K_I1, _K_INOT1, _K_I23, _K_I30, _K_I31 = (_c(v, _I32) for v in (1, ~1, 23, 30, 31))
_K_U2, _K_U29, _K_USIGN, _K_U24MASK = (_c(v, _U32) for v in (2, 29, 0x80000000, 0xFFFFFF))

_FAST_MAX_HALF = 1 << 16  # elements per half-block array handled per kernel call (bounds buffers)


class _Workspace:
    """Per-thread scratch buffers for the fast kernel (grown on demand, at most _FAST_MAX_HALF)."""

    def __init__(self, h: int):
        self.h = h
        self.f64 = [np.empty(h, _F64) for _ in range(3)]
        self.f32 = [np.empty(h, _F32) for _ in range(7)]
        self.u32 = [np.empty(h, _U32) for _ in range(3)]
        self.k = np.empty(2 * h, _U32)
        self.p = np.empty(2 * h, _F32)


_tls = threading.local()


def _workspace(h: int) -> _Workspace:
    ws = getattr(_tls, "ws", None)
    if ws is None or ws.h < h:
        ws = _tls.ws = _Workspace(max(h, 4096))
    return ws


# Short-lived threads (the prefetch threads, one per sampler run) borrow a workspace from this
# free list instead of allocating (and page-faulting) fresh buffers in every run.
_WS_FREE: list = []
_WS_FREE_MAX = 4


def _borrow_workspace() -> None:
    if getattr(_tls, "ws", None) is None:
        try:
            _tls.ws = _WS_FREE.pop()
        except IndexError:
            pass


def _return_workspace() -> None:
    ws = getattr(_tls, "ws", None)
    _tls.ws = None
    if ws is not None and len(_WS_FREE) < _WS_FREE_MAX:
        _WS_FREE.append(ws)


def _radius_avx2(k1: np.ndarray, ws: _Workspace, h: int, r_out: np.ndarray) -> None:
    """r = sqrt(-2 * log256_ps(u1)) for u1 = 1 - k1 * 2**-24 (k1: 24-bit words, uint32)."""
    t, z64, x64 = (a[:h] for a in ws.f64)
    u1, xm, z, y, e, tmp, _ = (a[:h] for a in ws.f32)
    ti, ki = ws.u32[0][:h].view(_I32), ws.u32[1][:h].view(_I32)
    np.copyto(u1, k1.view(_I32), casting="unsafe")
    u1 *= _K_MU
    u1 += _K_ONE32                              # exact
    bits = u1.view(_I32)
    np.subtract(bits, _K_SQRTHF_BITS, out=ti)
    np.right_shift(ti, _K_I23, out=ki)          # u1 = mant * 2**ki, mant in [sqrt(1/2), sqrt(2))
    ti &= _K_EXPMASK
    np.subtract(bits, ti, out=ti)
    np.subtract(ti.view(_F32), _K_ONE32, out=xm)  # exact; == Cephes' adjusted x
    np.copyto(e, ki, casting="unsafe")          # == Cephes' adjusted e
    np.multiply(xm, xm, out=z)
    np.copyto(x64, xm)
    np.multiply(x64, _K_LOG_P64[0], out=t)      # Horner, each step fma(y, xm, p)
    t += _K_LOG_P64[1]
    np.copyto(y, t, casting="same_kind")
    for p in _K_LOG_P64[2:-1]:
        np.copyto(t, y)
        t *= x64
        t += p
        np.copyto(y, t, casting="same_kind")
    np.copyto(t, y)
    t *= x64
    t += _K_LOG8_PC                             # last step: one binade, magic rounding
    t -= _K_LOG8_C
    t *= x64
    np.copyto(y, t, casting="same_kind")        # y *= xm (float32 product)
    np.multiply(e, _K_LOG_Q1, out=tmp)
    np.copyto(t, y)
    np.copyto(z64, z)
    t *= z64
    np.copyto(x64, tmp)
    t += x64
    np.copyto(y, t, casting="same_kind")        # fma(y, z, e*q1)
    np.multiply(z, _K_HALF, out=tmp)
    y -= tmp
    xm += y
    e *= _K_LOG_Q2                              # exact
    xm += e                                     # fma(e, q2, xm): the product is exact
    np.multiply(xm, _K_M2, out=r_out)
    np.sqrt(r_out, out=r_out)


def _sincos_avx2(k2: np.ndarray, ws: _Workspace, h: int, s_out: np.ndarray,
                 c_out: np.ndarray) -> None:
    """sincos256_ps(2pi_f32 * u2) for u2 = k2 * 2**-24 (k2: 24-bit words, uint32)."""
    t, z64, x64 = (a[:h] for a in ws.f64)
    x, xr, z, yc, ys, tmp, _ = (a[:h] for a in ws.f32)
    j, m1, m2 = (a[:h] for a in ws.u32)
    ji, m1i = j.view(_I32), m1.view(_I32)
    np.copyto(x, k2.view(_I32), casting="unsafe")
    x *= _K_THETA                               # theta = 2pi_f32 * u2 (power-of-two scaling)
    np.multiply(x, _K_FOPI, out=tmp)
    np.copyto(ji, tmp, casting="unsafe")        # truncation, as cvttps
    ji += _K_I1
    ji &= _K_INOT1
    np.copyto(t, ji)
    np.multiply(t, _K_DP3, out=z64)
    t *= _K_C12
    np.copyto(x64, x)
    t += x64                                    # exact (the first two Cephes FMAs)
    t += z64                                    # exact
    np.copyto(xr, t, casting="same_kind")       # the third FMA's single rounding
    np.multiply(xr, xr, out=z)
    np.copyto(z64, z)
    # cos: fma(fma(c0, z, c1), z, c2) -- both steps single-binade
    np.multiply(z64, _K_COS0, out=t)
    t += _K_COS1_PC
    t -= _K_COS1_C
    t *= z64
    t += _K_COS2_PC
    t -= _K_COS2_C
    t *= z64
    np.copyto(yc, t, casting="same_kind")       # yc * z (float32 product)
    np.copyto(t, yc)
    t *= z64
    np.multiply(z, _K_HALF, out=tmp)
    np.copyto(x64, tmp)
    t -= x64
    np.copyto(yc, t, casting="same_kind")       # fma(yc*z, z, -(z*0.5))
    yc += _K_ONE32
    # sin: fma(fma(s0, z, s1), z, s2) -- both steps single-binade
    np.multiply(z64, _K_SIN0, out=t)
    t += _K_SIN1_PC
    t -= _K_SIN1_C
    t *= z64
    t += _K_SIN2_PC
    t -= _K_SIN2_C
    t *= z64
    np.copyto(ys, t, casting="same_kind")       # ys * z (float32 product)
    np.copyto(t, ys)
    np.copyto(x64, xr)
    t *= x64
    t += x64
    np.copyto(ys, t, casting="same_kind")       # fma(ys*z, xr, xr)
    # (j & 2) == 0 ? (ys, yc) : (yc, ys), then the sign bits, as integer ops
    np.left_shift(ji, _K_I30, out=m1i)
    np.right_shift(m1i, _K_I31, out=m1i)        # all ones where j & 2
    ycv, ysv = yc.view(_U32), ys.view(_U32)
    sv, cv = s_out.view(_U32), c_out.view(_U32)
    np.bitwise_xor(ycv, ysv, out=m2)
    m2 &= m1
    np.bitwise_xor(ysv, m2, out=sv)
    np.bitwise_xor(ycv, m2, out=cv)
    np.left_shift(j, _K_U29, out=m1)
    m1 &= _K_USIGN                              # (j & 4) << 29
    sv ^= m1
    np.add(j, _K_U2, out=m1)
    m1 <<= _K_U29
    m1 &= _K_USIGN                              # (~(j - 2) & 4) << 29 for even j
    cv ^= m1


def _fill_blocks_avx2(raw_blocks: np.ndarray, out_blocks: np.ndarray) -> None:
    """Box-Muller (AVX2 kernel) of ``m`` blocks of 16 raw mt19937 words.

    raw_blocks: (m, 16) uint32/uint64 words (any strides); out_blocks: (m, 16) float32, written.
    """
    m = raw_blocks.shape[0]
    per = _FAST_MAX_HALF // 8
    for b0 in range(0, m, per):
        b1 = min(m, b0 + per)
        mb = b1 - b0
        h = mb * 8
        ws = _workspace(h)
        k = ws.k[: 2 * h].reshape(2, mb, 8)
        np.copyto(k, raw_blocks[b0:b1].reshape(mb, 2, 8).transpose(1, 0, 2), casting="unsafe")
        k &= _K_U24MASK
        p = ws.p[: 2 * h].reshape(2, mb, 8)
        r = ws.f32[6][:h]
        _radius_avx2(k[0].reshape(h), ws, h, r)
        c = p[0].reshape(h)
        s = p[1].reshape(h)
        _sincos_avx2(k[1].reshape(h), ws, h, s, c)
        c *= r
        s *= r
        np.copyto(out_blocks[b0:b1].reshape(mb, 2, 8), p.transpose(1, 0, 2))


def _normal_fill_raw(raw: np.ndarray, n: int, kernel: str, out: Optional[np.ndarray] = None):
    """``normal_fill`` from raw mt19937 words: ``raw`` holds n (+16 when n % 16) words."""
    if out is None:
        out = np.empty(n, dtype=_F32)
    if kernel != "avx2":
        out[...] = _normal_fill(_u32_to_uniform(raw), n, kernel)
        return out
    nb = n // 16
    if nb:
        _fill_blocks_avx2(raw[: nb * 16].reshape(nb, 16), out[: nb * 16].reshape(nb, 16))
    if n % 16:
        tmp = np.empty((1, 16), _F32)
        _fill_blocks_avx2(raw[n: n + 16].reshape(1, 16), tmp)
        out[n - 16:] = tmp[0]
    return out


def _normal_fill(u: np.ndarray, n: int, kernel: str) -> np.ndarray:
    """``normal_fill`` on ``n`` uniforms (plus 16 tail uniforms when n % 16 != 0)."""
    nb = n // 16
    tail = (n % 16) != 0
    blocks = u[: nb * 16].reshape(nb, 2, 8)
    if tail:
        blocks = np.concatenate([blocks, u[n: n + 16].reshape(1, 2, 8)], axis=0)
    u1 = _ONE - blocks[:, 0, :]
    u2 = np.ascontiguousarray(blocks[:, 1, :])
    a, b = _BOX_MULLER[kernel](u1, u2)
    res = np.empty((blocks.shape[0], 2, 8), dtype=_F32)
    res[:, 0, :] = a
    res[:, 1, :] = b
    res = res.reshape(-1)
    if not tail:
        return res
    out = np.empty(n, dtype=_F32)
    out[: nb * 16] = res[: nb * 16]
    # overlapping tail: the last 16 elements come from the fresh block
    out[n - 16:] = res[nb * 16:]
    return out


_TWO_M24 = _F32(2.0**-24)


def _u32_to_uniform(raw: np.ndarray) -> np.ndarray:
    """``uniform_real_distribution<float>(0,1)``: ``(u32 & 0xFFFFFF) * 2**-24`` (exact)."""
    bits = raw.astype(np.uint32)
    bits &= np.uint32(0xFFFFFF)
    return bits.view(np.int32).astype(_F32) * _TWO_M24
# np.random.MT19937(...) construction costs ~0.1-0.3 ms (it runs SeedSequence.generate_state(624))
# while re-seeding with _legacy_seeding is ~1 us, so bit generators are recycled: every use
# fully re-seeds (or sets the whole state of) the object it takes.
_BG_FREE: list = []
_BG_FREE_MAX = 32


def _take_bg() -> np.random.MT19937:
    try:
        return _BG_FREE.pop()
    except IndexError:
        return np.random.MT19937(0)


def _give_bg(bg) -> None:
    if len(_BG_FREE) < _BG_FREE_MAX:
        _BG_FREE.append(bg)


_TWO_M53 = 2.0**-53
_MASK53 = (1 << 53) - 1


class TorchCPUGenerator:
    """``torch.Generator().manual_seed(seed)`` on the CPU, as a numpy stream.

    ``randn(shape)`` returns float32 values identical to successive ``torch.randn(shape,
    generator=g)`` calls on one torch generator (bit-exact for ``kernel="avx2"``).
    ``get_state()`` / ``set_state()`` give a picklable snapshot of the stream position.
    """

    __slots__ = ("_seed", "_bg", "_next_double_normal", "kernel")

    def __init__(self, seed: int = 67280421310721, kernel: Optional[str] = None):
        self.kernel = _check_kernel(kernel)
        self._bg = None
        seed = _check_seed(seed)
        self._bg = _take_bg()
        self.manual_seed(seed)

    def __del__(self):
        bg = getattr(self, "_bg", None)
        if bg is not None and _give_bg is not None:  # module globals may be gone at shutdown
            self._bg = None
            _give_bg(bg)

    def manual_seed(self, seed: int) -> "TorchCPUGenerator":
        """Same as ``torch.Generator.manual_seed``: mt19937 from the low 32 bits; clears the cache."""
        seed = _check_seed(seed)
        self._seed = seed
        self._bg._legacy_seeding(seed & 0xFFFFFFFF)
        self._next_double_normal = None
        return self

    def initial_seed(self) -> int:
        return self._seed

    # -- raw draws -------------------------------------------------------------------------
    def _random_u32(self, n: int) -> np.ndarray:
        return self._bg.random_raw(n)  # uint64 holding 32-bit words

    def uniform_float(self, n: int) -> np.ndarray:
        """``n`` draws of ``uniform_real_distribution<float>(0, 1)``."""
        raw = self._random_u32(n)
        return _u32_to_uniform(raw)

    def _uniform_double(self) -> float:
        hi, lo = (int(v) for v in self._random_u32(2))
        return (((hi << 32) | lo) & _MASK53) * _TWO_M53

    def _normal_double(self) -> float:
        if self._next_double_normal is not None:
            v = self._next_double_normal
            self._next_double_normal = None
            return v
        u1 = self._uniform_double()
        u2 = self._uniform_double()
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_double_normal = r * math.sin(theta)
        return r * math.cos(theta)

    # -- public draw -----------------------------------------------------------------------
    def randn(self, shape) -> np.ndarray:
        """``torch.randn(shape, dtype=float32, generator=self)``."""
        shape = _check_shape(shape)
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if n >= 16:
            if self.kernel == "avx2" and jit.available():
                return jit.randn_from_bitgen(self._bg, n, np.empty(shape, _F32))
            raw = self._random_u32(n + (16 if n % 16 else 0))
            return _normal_fill_raw(raw, n, self.kernel).reshape(shape)
        vals = [self._normal_double() for _ in range(n)]  # < 16 elements
        return np.asarray(vals, dtype=_F64).astype(_F32).reshape(shape)

    # -- state -----------------------------------------------------------------------------
    def get_state(self) -> dict:
        """Picklable snapshot (plain dict of numpy array / ints / float)."""
        st = self._bg.state["state"]
        return {
            "seed": self._seed,
            "kernel": self.kernel,
            "mt_key": np.array(st["key"], dtype=np.uint32, copy=True),
            "mt_pos": int(st["pos"]),
            "next_double_normal": self._next_double_normal,
        }

    def set_state(self, state: dict) -> "TorchCPUGenerator":
        key = np.asarray(state["mt_key"], dtype=np.uint32)
        if key.shape != (624,):
            raise ValueError(f"state['mt_key']: got shape {key.shape}; accepted: shape (624,)")
        self._seed = _check_seed(state["seed"], "state['seed']")
        self.kernel = _check_kernel(state.get("kernel", self.kernel))
        self._bg.state = {"bit_generator": "MT19937",
                          "state": {"key": key.copy(), "pos": int(state["mt_pos"])}}
        v = state.get("next_double_normal")
        self._next_double_normal = None if v is None else float(v)
        return self

    @classmethod
    def from_state(cls, state: dict) -> "TorchCPUGenerator":
        g = cls(0, kernel=state.get("kernel"))
        return g.set_state(state)

    def __getstate__(self):
        return self.get_state()

    def __setstate__(self, state):
        self._bg = _take_bg()
        self.kernel = _check_kernel(state.get("kernel"))
        self.set_state(state)


_POOL = None


def _thread_count() -> int:
    env = os.environ.get("KSAMPLER_RT_NOISE_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"KSAMPLER_RT_NOISE_THREADS: got {env!r}; accepted: a positive int") from None
    cpus = os.cpu_count() or 1
    return min(4, cpus) if cpus >= 4 else 1


def _pool(workers: int):
    global _POOL
    if _POOL is None or _POOL._max_workers < workers:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ksrt-randn")
    return _POOL


def _randn_chunk(seeds, n: int, kernel: str, out: np.ndarray) -> None:
    if kernel == "avx2" and out.flags.c_contiguous and jit.available():
        jit.randn_seeds(np.asarray(seeds, dtype=np.uint64), n, out)
        return
    tail = n % 16 != 0
    m = n + (16 if tail else 0)
    nb = n // 16
    bg = _take_bg()
    raw = np.empty((len(seeds), m), dtype=np.uint64)
    try:
        for i, s in enumerate(seeds):
            bg._legacy_seeding(s & 0xFFFFFFFF)
            raw[i] = bg.random_raw(m)
    finally:
        _give_bg(bg)
    if kernel == "avx2":
        if not tail and out.flags.c_contiguous:
            _fill_blocks_avx2(raw.reshape(-1, 16), out.reshape(-1, 16))
            return
        blocks = np.concatenate([raw[:, : nb * 16], raw[:, n:]], axis=1) if tail else raw
        res = np.empty(blocks.shape, dtype=_F32)
        _fill_blocks_avx2(blocks.reshape(-1, 16), res.reshape(-1, 16))
        out[:, : nb * 16] = res[:, : nb * 16]
        if tail:
            out[:, n - 16:] = res[:, nb * 16:]
        return
    u = _u32_to_uniform(raw.reshape(-1)).reshape(len(seeds), m)
    blocks = np.concatenate([u[:, : nb * 16], u[:, n:]], axis=1) if tail else u
    blocks = blocks.reshape(-1, 2, 8)
    u1 = _ONE - blocks[:, 0, :]
    u2 = np.ascontiguousarray(blocks[:, 1, :])
    a, b = _BOX_MULLER[kernel](u1, u2)
    res = np.empty(blocks.shape, dtype=_F32)
    res[:, 0, :] = a
    res[:, 1, :] = b
    res = res.reshape(len(seeds), -1)
    out[:, : nb * 16] = res[:, : nb * 16]
    if tail:
        out[:, n - 16:] = res[:, nb * 16:]


def randn_many(seeds, shape, kernel: Optional[str] = None, max_chunk: int = 1 << 16,
               workers: Optional[int] = None) -> np.ndarray:
    """``stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])``.

    Same values as one ``TorchCPUGenerator(s).randn(shape)`` per seed, but the Box-Muller math of
    several seeds runs in vectorised chunks of about ``max_chunk`` elements, spread over
    ``workers`` threads (numpy releases the GIL in its loops; default
    ``KSAMPLER_RT_NOISE_THREADS``, else min(4, cpu_count) on >= 4 cores, else 1). Results do not depend on either.
    """
    kernel = _check_kernel(kernel)
    shape = _check_shape(shape)
    seeds = [_check_seed(s, "seeds[]") for s in seeds]
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    out = np.empty((len(seeds), n), dtype=_F32)
    if n < 16:
        for i, s in enumerate(seeds):
            out[i] = TorchCPUGenerator(s, kernel=kernel).randn((n,))
        return out.reshape((len(seeds),) + shape)
    per = max(1, max_chunk // (n + 16))
    chunks = [(c0, seeds[c0: c0 + per]) for c0 in range(0, len(seeds), per)]
    workers = _thread_count() if workers is None else max(1, int(workers))
    if workers == 1 or len(chunks) == 1:
        for c0, ch in chunks:
            _randn_chunk(ch, n, kernel, out[c0: c0 + len(ch)])
    else:
        futs = [_pool(workers).submit(_randn_chunk, ch, n, kernel, out[c0: c0 + len(ch)])
                for c0, ch in chunks]
        for f in futs:
            f.result()
    return out.reshape((len(seeds),) + shape)


def torch_randn(shape, seed: int, kernel: Optional[str] = None) -> np.ndarray:
    """``torch.randn(shape, generator=torch.Generator().manual_seed(seed))``."""
    return TorchCPUGenerator(seed, kernel=kernel).randn(shape)


# ---------------------------------------------------------------------------------------------
# comfy.sample.prepare_noise
# ---------------------------------------------------------------------------------------------
def prepare_noise(samples, seed: int, batch_index=None, kernel: Optional[str] = None) -> np.ndarray:
    """ComfyUI ``comfy.sample.prepare_noise(latent_image, seed, noise_inds)`` (0.3.64), float32.

    One ``randn`` of the latent's shape from a generator seeded with ``seed``. With
    ``batch_index``: for i in 0..max(unique indices) draw a ``[1, C, H, W]`` noise in sequence,
    keep the draws whose i is requested, and give each latent row the draw of its index.
    """
    if not isinstance(samples, np.ndarray):
        raise TypeError(
            f"samples: got {type(samples).__name__}; accepted: a 4-D float numpy array [B, C, H, W]"
        )
    if samples.ndim != 4 or not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(
            f"samples: got a {samples.ndim}-D {samples.dtype} array of shape {samples.shape}; "
            f"accepted: a 4-D float array [B, C, H, W]"
        )
    seed = _check_seed(seed)
    gen = TorchCPUGenerator(seed, kernel=kernel)
    if batch_index is None:
        return gen.randn(samples.shape)
    try:
        inds = np.asarray(batch_index)
    except Exception:  # pragma: no cover - defensive
        inds = None
    if (inds is None or inds.ndim != 1 or inds.size == 0
            or not (np.issubdtype(inds.dtype, np.integer)) or (inds < 0).any()):
        raise ValueError(
            f"batch_index: got {batch_index!r}; accepted: None or a non-empty list of "
            f"non-negative ints, one per latent row"
        )
    if inds.size != samples.shape[0]:
        raise ValueError(
            f"batch_index: got {inds.size} indices for a batch of {samples.shape[0]}; "
            f"accepted: one index per latent row"
        )
    unique, inverse = np.unique(inds, return_inverse=True)
    wanted = set(int(i) for i in unique)
    row_shape = (1,) + tuple(samples.shape[1:])
    kept = []
    for i in range(int(unique[-1]) + 1):
        noise = gen.randn(row_shape)
        if i in wanted:
            kept.append(noise)
    return np.concatenate([kept[i] for i in np.asarray(inverse).reshape(-1)], axis=0)


# ---------------------------------------------------------------------------------------------
# noise sources used by the samplers
# ---------------------------------------------------------------------------------------------
class NoiseSource:
    """What samplers draw noise from; mirrors ComfyUI's noise samplers for one node seed.

    * ``default(x)`` -> ComfyUI ``default_noise_sampler(x, seed)``: a fresh CPU generator seeded
      with ``seed``; every call of the returned sampler returns ``randn(x.shape)`` from it
      (a :class:`DefaultNoiseSampler`).
    * ``brownian(x, sigma_min, sigma_max, queries=None)`` -> ``BrownianTreeNoiseSampler(x,
      sigma_min, sigma_max, seed, cpu=True)`` (torchsde ``BrownianTree`` port, see
      ``brownian.py``).

    Default-noise prefetch: the default stream does not depend on x's values, only on its shape
    (draw i is the i-th ``randn(shape)`` of the generator), so a background thread draws it
    ahead (at most ``lookahead`` unconsumed draws; one before the first call, so a sampler that
    never draws wastes at most one) while the sampler waits on a denoiser call that releases
    the GIL. Values and order are bit-identical with or without it. Env
    ``KSAMPLER_RT_NOISE_PREFETCH=0`` turns it off.

    Brownian prefetch: the SDE samplers query the tree at ``(sigma_i, sigma_{i+1})`` pairs that
    are known before sampling starts. Given those pairs (``queries=``, or derived from the sigma
    list passed as ``NoiseSource(seed, sigmas=...)`` / :meth:`expect`), a background thread
    computes the increments ahead of the sampler (at most ``lookahead`` unconsumed results), so
    the tree's cost overlaps a denoiser call that releases the GIL (ONNX Runtime does; numpy's
    large ops release it too). Values are bit-identical with or without prefetch: every tree
    value is a deterministic function of its dyadic node, whatever the query order, and a
    query that was not predicted (e.g. dpmpp_sde's midpoint) is computed synchronously.
    Env ``KSAMPLER_RT_BROWNIAN_PREFETCH=0`` turns it off.

    ``prefetch=True/False`` forces both prefetchers on/off (``None``: the env variables, default
    on). :meth:`close` (or ``with NoiseSource(...)``) stops every background thread this source
    started; they also stop when their sampler is garbage-collected.

    State is kept in plain attributes (``generator``, ``tree``). With default-noise prefetch,
    ``generator`` runs ahead of the sampler; ``last_default.get_state()`` is the generator state
    at the sampler's position.
    """

    def __init__(self, seed: int, kernel: Optional[str] = None, *, sigmas=None,
                 prefetch: Optional[bool] = None, lookahead: int = 2):
        self.seed = _check_seed(seed)
        self.kernel = _check_kernel(kernel)
        self.generator: Optional[TorchCPUGenerator] = None
        self.tree = None
        self.tree_sign = 1
        self.sigmas = None
        self.prefetch = prefetch
        if int(lookahead) < 1:
            raise ValueError(f"lookahead: got {lookahead!r}; accepted: an int >= 1")
        self.lookahead = int(lookahead)
        self.last_brownian = None
        self.last_default = None
        import weakref
        self._open = weakref.WeakSet()  # samplers with a prefetch thread, closed by close()
        if sigmas is not None:
            self.expect(sigmas)

    def expect(self, sigmas) -> "NoiseSource":
        """Declare the sigma list the sampler will run over (enables Brownian prefetch)."""
        s = np.asarray(sigmas, dtype=_F32)
        if s.ndim != 1:
            raise ValueError(f"sigmas: got shape {s.shape}; accepted: a 1-D list of sigmas")
        self.sigmas = s
        return self

    def _prefetch_on(self, env: str = "KSAMPLER_RT_BROWNIAN_PREFETCH") -> bool:
        if self.prefetch is not None:
            return bool(self.prefetch)
        return os.environ.get(env, "1").strip().lower() not in ("0", "false", "no", "off")

    def default(self, x) -> "DefaultNoiseSampler":
        shape = tuple(np.shape(x))
        gen = TorchCPUGenerator(self.seed, kernel=self.kernel)
        self.generator = gen
        sampler = DefaultNoiseSampler(gen, shape, prefetch=self._prefetch_on(_ENV_NOISE_PREFETCH),
                                      lookahead=self.lookahead)
        self.last_default = sampler
        if sampler.prefetching:
            self._open.add(sampler)
        return sampler

    def brownian(self, x, sigma_min, sigma_max, queries=None) -> Callable:
        """ComfyUI ``BrownianTreeNoiseSampler``; ``queries``: expected ``(sigma, sigma_next)``
        calls in order, to prefetch (default: consecutive pairs of :meth:`expect`'s sigmas)."""
        from .brownian import BrownianTree

        t0 = _F32(sigma_min)
        t1 = _F32(sigma_max)
        t0, t1, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        tree = BrownianTree(float(t0), float(t1), tuple(np.shape(x)), entropy=self.seed,
                            kernel=self.kernel)
        self.tree = tree
        self.tree_sign = sign
        if queries is None and self.sigmas is not None:
            s = self.sigmas
            queries = [(s[i], s[i + 1]) for i in range(len(s) - 1) if s[i + 1] > 0 and s[i] != s[i + 1]]
        if not self._prefetch_on():
            queries = None
        sampler = BrownianNoiseSampler(tree, sign, queries, self.lookahead)
        self.last_brownian = sampler
        if queries:
            self._open.add(sampler)
        return sampler

    def close(self) -> None:
        """Stop (and join) every prefetch thread started by this source. Idempotent."""
        for sampler in list(self._open):
            sampler.close()
        self._open.clear()

    def __enter__(self) -> "NoiseSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_ENV_NOISE_PREFETCH = "KSAMPLER_RT_NOISE_PREFETCH"


class _StreamState:
    """Shared by a :class:`DefaultNoiseSampler` and its prefetch thread (never the sampler itself,
    so the sampler can be garbage-collected while the thread runs)."""

    __slots__ = ("gen", "shape", "cv", "queue", "limit", "lookahead", "pending_state", "closed",
                 "error")

    def __init__(self, gen, shape, lookahead):
        from collections import deque

        self.gen = gen
        self.shape = shape
        self.cv = threading.Condition()
        self.queue = deque()        # (generator state before the draw, draw), oldest first
        self.limit = 1              # draws ahead before the first call; then ``lookahead``
        self.lookahead = lookahead
        self.pending_state = None   # generator state before the draw in progress / abandoned
        self.closed = False
        self.error = None

    def close(self):
        with self.cv:
            self.closed = True
            self.cv.notify_all()


def _stream_worker(st: _StreamState) -> None:
    _borrow_workspace()
    try:
        _stream_loop(st)
    finally:
        _return_workspace()


def _stream_loop(st: _StreamState) -> None:
    gen, shape = st.gen, st.shape
    while True:
        with st.cv:
            while not st.closed and len(st.queue) >= st.limit:
                st.cv.wait()
            if st.closed:
                return
            st.pending_state = gen.get_state()  # the thread owns ``gen`` until the draw is queued
        try:
            v = gen.randn(shape)
        except BaseException as e:  # the synchronous fallback raises it again in the caller
            with st.cv:
                st.error = e
                st.cv.notify_all()
            return
        with st.cv:
            if st.closed:  # keep pending_state: the stream position before this discarded draw
                st.cv.notify_all()
                return
            st.queue.append((st.pending_state, v))
            st.pending_state = None
            st.cv.notify_all()


class DefaultNoiseSampler:
    """ComfyUI's ``default_noise_sampler``: ``sampler(sigma, sigma_next)`` returns the next
    ``randn(shape)`` of ``generator`` (the arguments are ignored).

    With ``prefetch``, a daemon thread draws the stream ahead (at most ``lookahead`` draws not yet
    consumed). ``randn(other_shape)`` or a failure in the thread stops the prefetch, rewinds the
    generator to the consumer's position and continues synchronously, so the values never depend
    on prefetching. ``hits`` / ``misses`` count draws served by the thread / drawn on the spot.
    ``close()`` stops and joins the thread (garbage collection stops it too, without joining).
    """

    def __init__(self, generator: TorchCPUGenerator, shape, *, prefetch: bool = False,
                 lookahead: int = 2):
        self.generator = generator
        self.shape = _check_shape(shape)
        self.hits = 0
        self.misses = 0
        self._st = None
        self._thread = None
        if prefetch:
            import weakref

            self._st = _StreamState(generator, self.shape, max(1, int(lookahead)))
            self._thread = threading.Thread(target=_stream_worker, args=(self._st,),
                                            name="ksrt-noise-prefetch", daemon=True)
            weakref.finalize(self, self._st.close)
            self._thread.start()

    @property
    def prefetching(self) -> bool:
        return self._st is not None

    def __call__(self, sigma=None, sigma_next=None) -> np.ndarray:
        return self.randn()

    def randn(self, shape=None) -> np.ndarray:
        """The next draw of the stream, of ``shape`` (default: the sampler's shape)."""
        shape = self.shape if shape is None else _check_shape(shape)
        st = self._st
        if st is not None:
            if shape == st.shape:
                with st.cv:
                    while not st.queue and not st.closed and st.error is None:
                        st.cv.wait()
                    if st.queue and not st.closed:
                        v = st.queue.popleft()[1]
                        st.limit = st.lookahead
                        st.cv.notify_all()
                        self.hits += 1
                        return v
            self._stop()
        self.misses += 1
        return self.generator.randn(shape)

    def get_state(self) -> dict:
        """The generator state at the consumer's position (what ``generator.get_state()`` would be
        without prefetching)."""
        st = self._st
        if st is None:
            return self.generator.get_state()
        with st.cv:
            if st.queue:
                return st.queue[0][0]
            if st.pending_state is not None:
                return st.pending_state
            return self.generator.get_state()

    def _stop(self) -> None:
        """Stop prefetching for good and rewind the generator to the consumer's position."""
        st = self._st
        self.close()
        with st.cv:
            state = st.queue[0][0] if st.queue else st.pending_state
            st.queue.clear()
        if state is not None:
            self.generator.set_state(state)
        self._st = None

    def close(self) -> None:
        """Stop the prefetch thread and wait for it (its draw in progress, if any, finishes)."""
        st = self._st
        if st is None:
            return
        st.close()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()
        with st.cv:  # free the unconsumed draws; keep the head's state for _stop / get_state
            while len(st.queue) > 1:
                st.queue.pop()


def _brownian_increment(tree, sign, lock, key):
    a, b = key
    lo, hi, s = (a, b, 1) if a < b else (b, a, -1)
    with lock:
        w = tree(float(lo), float(hi))
    if sign * s < 0:
        w = -w
    return w / np.sqrt(np.abs(b - a))


class _PrefetchState:
    __slots__ = ("tree", "sign", "lock", "cv", "plan", "pos", "ready", "computing", "consumed",
                 "lookahead", "closed")

    def __init__(self, tree, sign, plan, lookahead):
        self.tree = tree
        self.sign = sign
        self.lock = threading.Lock()      # serialises tree access (the tree is not thread-safe)
        self.cv = threading.Condition()   # guards the fields below
        self.plan = plan
        self.pos = {}
        for i, k in enumerate(plan):
            self.pos.setdefault(k, i)
        self.ready = {}
        self.computing = None
        self.consumed = 0
        self.lookahead = lookahead
        self.closed = False

    def close(self):
        with self.cv:
            self.closed = True
            self.ready.clear()
            self.cv.notify_all()


def _prefetch_worker(st: _PrefetchState) -> None:
    _borrow_workspace()
    try:
        _prefetch_loop(st)
    finally:
        _return_workspace()


def _prefetch_loop(st: _PrefetchState) -> None:
    i = 0
    while True:
        with st.cv:
            while not st.closed and i < len(st.plan) and i >= st.consumed + st.lookahead:
                st.cv.wait()
            i = max(i, st.consumed)
            if st.closed or i >= len(st.plan):
                return
            key = st.plan[i]
            if key in st.ready:
                i += 1
                continue
            st.computing = key
        try:
            w = _brownian_increment(st.tree, st.sign, st.lock, key)
        except BaseException:  # the synchronous path will raise it again where it matters
            w = None
        with st.cv:
            st.computing = None
            if w is not None and not st.closed and st.pos.get(key, -1) >= st.consumed:
                st.ready[key] = w
            st.cv.notify_all()
        i += 1


class BrownianNoiseSampler:
    """``noise_sampler(sigma, sigma_next)`` over a :class:`BrownianTree`, with optional prefetch.

    ``hits`` / ``misses`` count calls served by the prefetch thread vs computed on the spot.
    ``close()`` stops the thread (it also stops by itself at the end of the plan, and when this
    object is garbage-collected).
    """

    def __init__(self, tree, sign, queries=None, lookahead: int = 2):
        self.tree = tree
        self.sign = sign
        self.hits = 0
        self.misses = 0
        plan = [(_F32(a), _F32(b)) for a, b in (queries or ())]
        self._st = _PrefetchState(tree, sign, plan, lookahead)
        self._thread = None
        if plan:
            import weakref
            self._thread = threading.Thread(target=_prefetch_worker, args=(self._st,),
                                            name="ksrt-brownian-prefetch", daemon=True)
            weakref.finalize(self, self._st.close)
            self._thread.start()

    def __call__(self, sigma, sigma_next):
        key = (_F32(sigma), _F32(sigma_next))
        st = self._st
        w = None
        if st.plan:
            with st.cv:
                idx = st.pos.get(key)
                if idx is not None:
                    while st.computing == key:
                        st.cv.wait()
                    w = st.ready.pop(key, None)
                    if idx + 1 > st.consumed:
                        st.consumed = idx + 1
                        # drop results the sampler skipped past
                        for k in [k for k in st.ready if st.pos[k] < st.consumed]:
                            del st.ready[k]
                        st.cv.notify_all()
        if w is not None:
            self.hits += 1
            return w
        self.misses += 1
        return _brownian_increment(self.tree, self.sign, st.lock, key)

    def close(self) -> None:
        self._st.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
