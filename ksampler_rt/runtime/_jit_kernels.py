"""numba kernels of :mod:`.jit` (imported only through it; see there): torch's CPU randn (mt19937,
both Box-Muller kernels), the Brownian tree's bridge and numpy's SeedSequence pool mixing.

Defined at module level so numba's on-disk cache (``cache=True``) finds them again in the next
process. Importing this module imports numba. Constants come from :mod:`.randn_reference`, the
only runtime module imported here.
"""
import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from . import randn_reference as R

_N = 624          # mt19937 state words
_M = 397
_BLOCKS = 256     # Box-Muller blocks of 16 per chunk: the scratch stays in L1/L2


@intrinsic
def fma32(typingctx, a, b, c):
    """float32 fused multiply-add, one rounding (vfmadd on x86-64 with FMA3)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f, [f, f, f]),
                                            "llvm.fma.f32")
        return builder.call(fn, args)

    return sig, codegen


f32, i32, u32 = np.float32, np.int32, np.uint32
# numba widens int32/uint32 arithmetic to 64 bits; every integer step of the Box-Muller and
# mt19937 twist / tempering loops is cast back to 32 bits so that LLVM keeps the lanes 32 wide (AVX2 has no int64 -> float conversion: a widened
# lane index made the sincos loop partly scalar, and the mt19937 loops half as wide).
P0, P1, P2, P3, P4, P5, P6, P7, P8 = (f32(p) for p in R.LOG_P)
Q1, Q2 = f32(R.LOG_Q1), f32(R.LOG_Q2)
ONE, HALF, M2, ZERO = f32(1.0), f32(0.5), f32(-2.0), f32(0.0)
MU = f32(-(2.0**-24))
SQRTHF = f32(R.SQRTHF)
THETA = f32(R.TWO_PI_F32 * R.TWO_M24)   # 2pi_f32 * (k * 2**-24) == k * THETA exactly
FOPI = f32(R.FOPI)
D1, D2, D3 = f32(R.MDP1), f32(R.MDP2), f32(R.MDP3)
C0, C1, C2 = (f32(v) for v in R.COSCOF)
S0, S1, S2 = (f32(v) for v in R.SINCOF)
TWO_PI_F64 = np.float64(R.TWO_PI_F64)
TWO_M24_F64 = np.float64(2.0**-24)
I0, I1, I2, I4, I23, I127 = (i32(v) for v in (0, 1, 2, 4, 23, 127))
INOT1 = i32(~1)
MANT_MASK = i32(0x807FFFFF - (1 << 32))
HALF_EXP = i32(0x3F000000)
U24 = u32(0xFFFFFF)

@numba.njit(inline="always")
def radius(k1):
    """sqrt(-2 * log256_ps(u1)) for u1 = 1 - k1 * 2**-24 (always a normal float in (0, 1])."""
    u1 = f32(k1) * MU + ONE                     # exact
    bits = f32(u1).view(np.int32)
    e = f32(i32(i32(bits >> I23) - I127)) + ONE
    m = i32(i32(bits & MANT_MASK) | HALF_EXP).view(np.float32)
    small = m < SQRTHF
    xm = m - ONE
    xm = xm + (m if small else ZERO)
    e = e - (ONE if small else ZERO)
    z = xm * xm
    y = fma32(P0, xm, P1)
    y = fma32(y, xm, P2)
    y = fma32(y, xm, P3)
    y = fma32(y, xm, P4)
    y = fma32(y, xm, P5)
    y = fma32(y, xm, P6)
    y = fma32(y, xm, P7)
    y = fma32(y, xm, P8)
    y = y * xm
    y = fma32(y, z, e * Q1)
    y = y - z * HALF
    xm = xm + y
    return np.sqrt(fma32(e, Q2, xm) * M2)

@numba.njit(inline="always")
def sincos(k2):
    """sincos256_ps(2pi_f32 * u2) for u2 = k2 * 2**-24."""
    x = f32(k2) * THETA
    j = i32(x * FOPI)                           # truncation, as cvttps2dq
    j = i32(i32(j + I1) & INOT1)
    y = f32(j)
    xr = fma32(y, D1, x)
    xr = fma32(y, D2, xr)
    xr = fma32(y, D3, xr)
    z = xr * xr
    yc = fma32(fma32(C0, z, C1), z, C2)
    yc = fma32(yc * z, z, -(z * HALF))
    yc = yc + ONE
    ys = fma32(fma32(S0, z, S1), z, S2)
    ys = fma32(ys * z, xr, xr)
    swap = i32(j & I2) != I0
    s = yc if swap else ys
    c = ys if swap else yc
    s = -s if i32(j & I4) != I0 else s
    c = -c if i32(i32(j + I2) & I4) != I0 else c
    return s, c

_LOW24_PAIR = np.uint64((int(U24) << 32) | int(U24))


@numba.njit(inline="always")
def _aligned8(a, start):
    """Whether element ``start`` of the 4-byte array ``a`` sits on an 8-byte boundary."""
    return (a.ctypes.data + 4 * start) % 8 == 0


@numba.njit(nogil=True, boundscheck=False, cache=True)
def fill_blocks(words, w0, nb, out, o0, k1, k2, r, s, c):
    """Box-Muller of nb blocks of 16 words (words[w0:]) into out[o0:] (<= _BLOCKS blocks).

    Per block: u1 from words 0..7, u2 from words 8..15; out 0..7 = r cos, 8..15 = r sin.
    De-interleaved into flat scratch (k1, k2, s, c: 8-byte aligned allocations) so LLVM vectorises
    the Box-Muller loop 8 lanes wide. The copies into and out of the scratch move two 32-bit words
    per 64-bit element (a block's halves are 8 words, so no pair straddles them, and the mask is the
    same on both halves of a pair, so byte order does not matter): LLVM leaves word-by-word copy
    loops scalar, and they took half the kernel's time. Where ``words[w0]`` or ``out[o0]`` is not
    8-byte aligned (a row of an odd-length batch), that copy goes word by word.
    """
    h = nb * 8
    if _aligned8(words, w0):
        w64 = words[w0:w0 + nb * 16].view(np.uint64)
        a64 = k1[:h].view(np.uint64)
        b64 = k2[:h].view(np.uint64)
        for b in range(nb):
            for i in range(4):
                a64[b * 4 + i] = w64[b * 8 + i] & _LOW24_PAIR
                b64[b * 4 + i] = w64[b * 8 + 4 + i] & _LOW24_PAIR
    else:
        for b in range(nb):
            for i in range(8):
                k1[b * 8 + i] = i32(words[w0 + b * 16 + i] & U24)
                k2[b * 8 + i] = i32(words[w0 + b * 16 + 8 + i] & U24)
    for q in range(h):
        rq = radius(k1[q])
        sq, cq = sincos(k2[q])
        s[q] = sq * rq + ZERO                   # torch's fma(., std, mean): -0 -> +0
        c[q] = cq * rq + ZERO
    if _aligned8(out, o0):
        o64 = out[o0:o0 + nb * 16].view(np.uint64)
        s64 = s[:h].view(np.uint64)
        c64 = c[:h].view(np.uint64)
        for b in range(nb):
            for i in range(4):
                o64[b * 8 + i] = c64[b * 4 + i]
                o64[b * 8 + 4 + i] = s64[b * 4 + i]
    else:
        for b in range(nb):
            for i in range(8):
                out[o0 + b * 16 + i] = c[b * 8 + i]
                out[o0 + b * 16 + 8 + i] = s[b * 8 + i]


@numba.njit(nogil=True, boundscheck=False, cache=True)
def fill_blocks_default(words, w0, nb, out, o0, k1, k2, r, s, c):
    """:func:`fill_blocks` with the scalar ``NormalFill16`` (ATen's DEFAULT kernel): ``logf`` and
    ``sincosf`` of the process's libm, as torch's scalar template calls them (numba lowers float32
    ``math.log`` to ``logf`` and a sin/cos pair of one argument to ``sincosf``; the self-check in
    :mod:`.jit` compares against libm's ``logf``/``sinf``/``cosf`` through ctypes). Same arguments
    as :func:`fill_blocks`; the scratch arrays are unused."""
    for b in range(nb):
        for i in range(8):
            u1 = ONE - f32(i32(words[w0 + b * 16 + i] & U24)) * f32(TWO_M24_F64)   # exact
            rq = np.sqrt(M2 * math.log(u1))
            u2 = f32(i32(words[w0 + b * 16 + 8 + i] & U24)) * f32(TWO_M24_F64)     # exact
            theta = f32(TWO_PI_F64 * np.float64(u2))  # (float)(2.0f * pi<double> * u2)
            out[o0 + b * 16 + i] = rq * math.cos(theta) + ZERO
            out[o0 + b * 16 + 8 + i] = rq * math.sin(theta) + ZERO


@numba.njit(inline="always")
def fill_any(scalar, words, w0, nb, out, o0, k1, k2, r, s, c):
    """:func:`fill_blocks_default` when ``scalar`` else :func:`fill_blocks`."""
    if scalar:
        fill_blocks_default(words, w0, nb, out, o0, k1, k2, r, s, c)
    else:
        fill_blocks(words, w0, nb, out, o0, k1, k2, r, s, c)


@numba.njit(nogil=True, boundscheck=False, cache=True)
def mt_seed(st, seed):
    """numpy ``MT19937._legacy_seeding`` / torch ``mt19937(seed)``: init_genrand; pos = 624."""
    x = np.uint64(seed) & np.uint64(0xFFFFFFFF)
    for i in range(_N):
        st[i] = u32(x)
        x = (np.uint64(1812433253) * (x ^ (x >> np.uint64(30))) + np.uint64(i + 1)) \
            & np.uint64(0xFFFFFFFF)
    st[_N] = u32(_N)

_UPPER, _LOWER, _MATRIX_A = u32(0x80000000), u32(0x7FFFFFFF), u32(0x9908B0DF)
_U0, _U1, _S7, _S11, _S15, _S18 = (u32(v) for v in (0, 1, 7, 11, 15, 18))
_TEMPER_B, _TEMPER_C = u32(0x9D2C5680), u32(0xEFC60000)


@numba.njit(inline="always")
def _twisted(word, next_word, far_word):
    y = u32(u32(word & _UPPER) | u32(next_word & _LOWER))
    return u32(u32(far_word ^ u32(y >> _U1)) ^ u32(u32(_U0 - u32(y & _U1)) & _MATRIX_A))


@numba.njit(nogil=True, boundscheck=False, inline="always")
def mt_twist(st):
    for i in range(_N - _M):
        st[i] = _twisted(st[i], st[i + 1], st[i + _M])
    for i in range(_N - _M, _N - 1):
        st[i] = _twisted(st[i], st[i + 1], st[i + _M - _N])
    st[_N - 1] = _twisted(st[_N - 1], st[0], st[_M - 1])
    st[_N] = _U0


@numba.njit(nogil=True, boundscheck=False, cache=True)
def mt_words(st, out, n):
    """The next n tempered words of the generator in ``st`` (key[624] + pos) into out[:n]."""
    done = 0
    while done < n:
        pos = np.int64(st[_N])
        if pos >= _N:
            mt_twist(st)
            pos = 0
        cnt = min(_N - pos, n - done)
        key = st[pos:pos + cnt]
        dst = out[done:done + cnt]
        for i in range(cnt):
            y = key[i]
            y = u32(y ^ u32(y >> _S11))
            y = u32(y ^ u32(u32(y << _S7) & _TEMPER_B))
            y = u32(y ^ u32(u32(y << _S15) & _TEMPER_C))
            dst[i] = u32(y ^ u32(y >> _S18))
        done += cnt
        st[_N] = u32(pos + cnt)


@numba.njit(inline="always")
def _chunk_scratch():
    """Scratch of one chunk of _BLOCKS Box-Muller blocks: words, k1, k2, r, s, c (see fill_blocks)."""
    return (np.empty(_BLOCKS * 16, np.uint32), np.empty(_BLOCKS * 8, np.int32), np.empty(_BLOCKS * 8, np.int32),
            np.empty(_BLOCKS * 8, np.float32), np.empty(_BLOCKS * 8, np.float32), np.empty(_BLOCKS * 8, np.float32))


@numba.njit(nogil=True, boundscheck=False, cache=True)
def randn_state(st, n, out, scalar):
    """torch ``normal_fill`` (n >= 16) drawing from the mt19937 state ``st`` into out[:n]
    (``scalar``: the DEFAULT Box-Muller kernel, else the AVX2 one)."""
    words, k1, k2, r, s, c = _chunk_scratch()
    nb = n // 16
    for b0 in range(0, nb, _BLOCKS):
        m = min(_BLOCKS, nb - b0)
        mt_words(st, words, m * 16)
        fill_any(scalar, words, 0, m, out, b0 * 16, k1, k2, r, s, c)
    rest = n - nb * 16
    if rest:
        # torch draws all n uniforms first, then 16 fresh ones whose block overwrites the
        # last 16 outputs
        mt_words(st, words, rest)
        mt_words(st, words, 16)
        tail = np.empty(16, np.float32)
        fill_any(scalar, words, 0, 1, tail, 0, k1, k2, r, s, c)
        for i in range(16):
            out[n - 16 + i] = tail[i]

@numba.njit(nogil=True, boundscheck=False, cache=True)
def randn_seeds(seeds, n, out, scalar):
    """out[i, :n] = randn(n) of a generator seeded with seeds[i] (uint32); kernel as randn_state."""
    st = np.empty(_N + 1, np.uint32)
    for i in range(seeds.shape[0]):
        mt_seed(st, seeds[i])
        randn_state(st, n, out[i], scalar)


@numba.njit(nogil=True, boundscheck=False, cache=True)
def bridge(w, z, l_diff, h_rec, z_scale, left, right):
    """Brownian bridge split of a parent value w (torchsde, float32 as torch evaluates it):
    left = (w * l_diff) * h_rec + z * z_scale, right = w - left. No contraction into FMAs."""
    for i in range(w.shape[0]):
        a = (w[i] * l_diff) * h_rec + z[i] * z_scale
        left[i] = a
        right[i] = w[i] - a


@numba.njit(nogil=True, boundscheck=False, cache=True)
def bridge_seeded(seed, w, l_diff, h_rec, z_scale, left, right, scalar):
    """:func:`bridge` with z = randn(n) of a generator seeded with ``seed`` (n = w.size >= 16),
    drawn chunk by chunk and used at once: the noise never leaves the L1/L2-sized scratch."""
    n = w.shape[0]
    st = np.empty(_N + 1, np.uint32)
    mt_seed(st, seed)
    words, k1, k2, r, s, c = _chunk_scratch()
    z = np.empty(_BLOCKS * 16, np.float32)
    nb = n // 16
    for b0 in range(0, nb, _BLOCKS):
        m = min(_BLOCKS, nb - b0)
        mt_words(st, words, m * 16)
        fill_any(scalar, words, 0, m, z, 0, k1, k2, r, s, c)
        o, e = b0 * 16, (b0 + m) * 16
        bridge(w[o:e], z[:m * 16], l_diff, h_rec, z_scale, left[o:e], right[o:e])
    rest = n - nb * 16
    if rest:
        # torch's tail rule (see randn_state): a fresh block overwrites the last 16 outputs
        mt_words(st, words, rest)
        mt_words(st, words, 16)
        fill_any(scalar, words, 0, 1, z, 0, k1, k2, r, s, c)
        bridge(w[n - 16:], z[:16], l_diff, h_rec, z_scale, left[n - 16:], right[n - 16:])

_MASK32 = np.uint64(0xFFFFFFFF)
_SS_INIT_A = np.uint64(0x43B0D7E5)
_SS_MULT_A = np.uint64(0x931E8875)
_SS_MIX_L = np.uint64(0xCA01F9DD)
_SS_MIX_R = np.uint64(0x4973F715)
_SS_SHIFT = np.uint64(16)


@numba.njit(inline="always")
def _hashmix(value, hash_const):
    value = (value ^ hash_const) & _MASK32
    hash_const = (hash_const * _SS_MULT_A) & _MASK32
    value = (value * hash_const) & _MASK32
    return value ^ (value >> _SS_SHIFT), hash_const


@numba.njit(inline="always")
def _mix(x, y):
    r = (_SS_MIX_L * x - _SS_MIX_R * y) & _MASK32
    return r ^ (r >> _SS_SHIFT)


@numba.njit(nogil=True, boundscheck=False, cache=True)
def seed_sequence_pool(entropy, pool):
    """numpy ``SeedSequence.mix_entropy``: the pool (len(pool) words) of an assembled entropy
    array (uint64 holding uint32 words), as numpy/random/bit_generator.pyx computes it."""
    n = pool.shape[0]
    hc = _SS_INIT_A
    for i in range(n):
        v = entropy[i] if i < entropy.shape[0] else np.uint64(0)
        pool[i], hc = _hashmix(v, hc)
    for i_src in range(n):
        for i_dst in range(n):
            if i_src != i_dst:
                h, hc = _hashmix(pool[i_src], hc)
                pool[i_dst] = _mix(pool[i_dst], h)
    for i_src in range(n, entropy.shape[0]):
        for i_dst in range(n):
            h, hc = _hashmix(entropy[i_src], hc)
            pool[i_dst] = _mix(pool[i_dst], h)
