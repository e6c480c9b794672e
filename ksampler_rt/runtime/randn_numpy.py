"""Fast numpy AVX2 Box-Muller kernel: the same float32 operations as
:func:`.randn_reference.box_muller_avx2`, restructured for speed (the numpy path of randn).

Verified bit-identical to the reference over the *whole* input domain: u1 and u2 take only 2**24
values each (24-bit uniforms), the radius depends only on u1 and (sin, cos) only on u2, so
exhaustive checks are cheap (tests/runtime/test_noise.py::test_fast_kernel_exhaustive).

Speed-ups (one numpy pass per operation, all into preallocated per-thread buffers):

* the raw words are de-interleaved once into (u1 words | u2 words);
* log256: u1 = 1 - k*2**-24 exactly; the exponent/mantissa split uses the glibc-style
  ``bits - bits(sqrt(1/2))`` trick (k = that >> 23, mantissa in [sqrt(1/2), sqrt(2))), which
  gives the same e and xm as Cephes' ``m < SQRTHF`` adjustment;
* an FMA fma(a, b, c) of float32s is ``float32(a*b + c)`` in float64 (a*b exact). Where the
  result of a Horner step stays inside one binade [2**k, 2**(k+1)) for every input (checked
  exhaustively, see ``_ONE_BINADE``), the rounding to float32 is done with a float64 "magic"
  constant C = 1.5*2**(k+29) whose ulp equals the float32 ulp: ``(a*b + (c + C)) - C`` is a
  single correctly rounded result (no double rounding), and saves two casts;
* range reduction: the first two Cephes FMAs are exact, so x - j*(DP1+DP2) - j*DP3 is formed
  exactly in float64 and rounded once, as the third FMA does;
* the sin/cos polynomial selection and sign flips are integer bit operations (no np.where).

Per-call numpy overhead matters at these sizes (about 1 us per call), so constants are 0-d arrays
of the operand dtype (scalar type resolution is slower) and nothing is chunked. The ``"default"``
kernel has no fast numpy form: :func:`normal_fill_raw` runs the reference for it.
"""
from __future__ import annotations

import threading
from typing import Optional

import numpy as np

from . import randn_reference as R
from .randn_reference import F32, F64

__all__ = ["borrow_workspace", "fill_blocks_avx2", "normal_fill_raw", "return_workspace", "workspace"]

_I32 = np.int32
_U32 = np.uint32

_I32 = np.int32
_U32 = np.uint32


def _c(v, dt):
    return np.array(v, dtype=dt)


_K_LOG_P64 = [_c(F64(p), F64) for p in R.LOG_P]
_K_LOG_Q1 = _c(R.LOG_Q1, F32)
_K_LOG_Q2 = _c(R.LOG_Q2, F32)


def _magic(binade: int) -> float:
    """float64 constant whose ulp is the float32 ulp in [2**binade, 2**(binade+1))."""
    return 1.5 * 2.0 ** (binade + 29)


# binade of |result| of each single-binade FMA over the whole input domain (exhaustively checked)
_ONE_BINADE = {"log_p8": -2, "cos_1": -10, "cos_2": -5, "sin_1": -7, "sin_2": -3}
_M_LOG8 = _magic(_ONE_BINADE["log_p8"])
_K_LOG8_PC = _c(F64(R.LOG_P[-1]) + _M_LOG8, F64)
_K_LOG8_C = _c(_M_LOG8, F64)
_M_C1, _M_C2 = _magic(_ONE_BINADE["cos_1"]), _magic(_ONE_BINADE["cos_2"])
_M_S1, _M_S2 = _magic(_ONE_BINADE["sin_1"]), _magic(_ONE_BINADE["sin_2"])
_K_COS0 = _c(F64(R.COSCOF[0]), F64)
_K_COS1_PC, _K_COS1_C = _c(F64(R.COSCOF[1]) + _M_C1, F64), _c(_M_C1, F64)
_K_COS2_PC, _K_COS2_C = _c(F64(R.COSCOF[2]) + _M_C2, F64), _c(_M_C2, F64)
_K_SIN0 = _c(F64(R.SINCOF[0]), F64)
_K_SIN1_PC, _K_SIN1_C = _c(F64(R.SINCOF[1]) + _M_S1, F64), _c(_M_S1, F64)
_K_SIN2_PC, _K_SIN2_C = _c(F64(R.SINCOF[2]) + _M_S2, F64), _c(_M_S2, F64)
_K_C12 = _c(R.MDP1 + R.MDP2, F64)  # exact: -13176794 * 2**-24
_K_DP3 = _c(R.MDP3, F64)
_K_THETA = _c(R.TWO_PI_F32 * R.TWO_M24, F32)  # 2pi_f32 * (k * 2**-24) == (k * this)
_K_FOPI = _c(R.FOPI, F32)
_K_HALF = _c(R.HALF, F32)
_K_ONE32 = _c(1.0, F32)
_K_ZERO32 = _c(0.0, F32)
_K_M2 = _c(-2.0, F32)
_K_MU = _c(-(2.0**-24), F32)
_K_SQRTHF_BITS = _c(0x3F3504F3, _I32)
_K_EXPMASK = _c(-0x800000, _I32)
_K_I1, _K_INOT1, _K_I23, _K_I30, _K_I31 = (_c(v, _I32) for v in (1, ~1, 23, 30, 31))
_K_U2, _K_U29, _K_USIGN, _K_U24MASK = (_c(v, _U32) for v in (2, 29, 0x80000000, 0xFFFFFF))

_FAST_MAX_HALF = 1 << 16  # elements per half-block array handled per kernel call (bounds buffers)


class _Workspace:
    """Per-thread scratch buffers for the fast kernel (grown on demand, at most _FAST_MAX_HALF)."""

    def __init__(self, h: int):
        self.h = h
        self.f64 = [np.empty(h, F64) for _ in range(3)]
        self.f32 = [np.empty(h, F32) for _ in range(7)]
        self.u32 = [np.empty(h, _U32) for _ in range(3)]
        self.k = np.empty(2 * h, _U32)
        self.p = np.empty(2 * h, F32)


_tls = threading.local()


def workspace(h: int) -> _Workspace:
    ws = getattr(_tls, "ws", None)
    if ws is None or ws.h < h:
        ws = _tls.ws = _Workspace(max(h, 4096))
    return ws


# Short-lived threads (the prefetch threads, one per sampler run) borrow a workspace from this
# free list instead of allocating (and page-faulting) fresh buffers in every run.
_WS_FREE: list = []
_WS_FREE_MAX = 4


def borrow_workspace() -> None:
    if getattr(_tls, "ws", None) is None:
        try:
            _tls.ws = _WS_FREE.pop()
        except IndexError:
            pass


def return_workspace() -> None:
    ws = getattr(_tls, "ws", None)
    _tls.ws = None
    if ws is not None and len(_WS_FREE) < _WS_FREE_MAX:
        _WS_FREE.append(ws)


def radius_avx2(k1: np.ndarray, ws: _Workspace, h: int, r_out: np.ndarray) -> None:
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
    np.subtract(ti.view(F32), _K_ONE32, out=xm)  # exact; == Cephes' adjusted x
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


def sincos_avx2(k2: np.ndarray, ws: _Workspace, h: int, s_out: np.ndarray,
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


def fill_blocks_avx2(raw_blocks: np.ndarray, out_blocks: np.ndarray) -> None:
    """Box-Muller (AVX2 kernel) of ``m`` blocks of 16 raw mt19937 words.

    raw_blocks: (m, 16) uint32/uint64 words (any strides); out_blocks: (m, 16) float32, written.
    """
    m = raw_blocks.shape[0]
    per = _FAST_MAX_HALF // 8
    for b0 in range(0, m, per):
        b1 = min(m, b0 + per)
        mb = b1 - b0
        h = mb * 8
        ws = workspace(h)
        k = ws.k[: 2 * h].reshape(2, mb, 8)
        np.copyto(k, raw_blocks[b0:b1].reshape(mb, 2, 8).transpose(1, 0, 2), casting="unsafe")
        k &= _K_U24MASK
        p = ws.p[: 2 * h].reshape(2, mb, 8)
        r = ws.f32[6][:h]
        radius_avx2(k[0].reshape(h), ws, h, r)
        c = p[0].reshape(h)
        s = p[1].reshape(h)
        sincos_avx2(k[1].reshape(h), ws, h, s, c)
        c *= r
        s *= r
        # the copy out adds torch's mean (+0): fma(r*cos, std, mean) turns -0 into +0
        np.add(p.transpose(1, 0, 2), _K_ZERO32, out=out_blocks[b0:b1].reshape(mb, 2, 8))


def normal_fill_raw(raw: np.ndarray, n: int, kernel: str, out: Optional[np.ndarray] = None):
    """``normal_fill`` from raw mt19937 words: ``raw`` holds n (+16 when n % 16) words."""
    if out is None:
        out = np.empty(n, dtype=F32)
    if kernel != "avx2":
        out[...] = R.normal_fill(R.u32_to_uniform(raw), n, kernel)
        return out
    nb = n // 16
    if nb:
        fill_blocks_avx2(raw[: nb * 16].reshape(nb, 16), out[: nb * 16].reshape(nb, 16))
    if n % 16:
        tmp = np.empty((1, 16), F32)
        fill_blocks_avx2(raw[n: n + 16].reshape(1, 16), tmp)
        out[n - 16:] = tmp[0]
    return out
