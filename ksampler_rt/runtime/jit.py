"""Optional compiled kernels (numba, extra ``[jit]``) for the runtime's hottest host loops.

The numpy code stays the reference and the fallback; every kernel here computes the same float32
operations in the same order, fused into one or a few loops, so results are bit-identical:

* torch's CPU ``randn`` (:mod:`.generator`). In numpy it needs about 60 array passes per draw
  (float32 FMAs emulated in float64, one numpy loop per operation). Here:
  - mt19937 (seeding, twist, tempering) works directly on the state of a numpy ``MT19937`` bit
    generator, so the generator objects (their ``state``, ``random_raw``) stay the one source of
    truth and both paths can be mixed on one stream;
  - the AVX2 Box-Muller (``log256_ps`` / ``sincos256_ps`` of ATen's ``avx_mathfun.h``) is
    written with real float32 FMAs (``llvm.fma.f32``) at the contraction points GCC emits for
    torch's ``NormalFill16`` (see :mod:`.randn_reference`). An FMA is one correctly rounded
    operation, so this is bit-identical to torch's kernel by construction. LLVM gets no
    fast-math flags: it may neither contract nor reassociate anything else;
  - the scalar (DEFAULT) Box-Muller calls the process's libm ``logf`` and ``sincosf``, the
    functions torch's scalar template calls: bit-identical to torch (its numpy fallback,
    float64 maths rounded to float32, leaves about 1.5 % of elements a few ulp off);
* the Brownian tree's bridge and numpy's ``SeedSequence`` pool mixing (:mod:`.brownian`).

The compiled CFG head lives beside the CFG code (:mod:`.cfg_jit`) and uses this module's switch.

Every kernel is checked on first use (:func:`available`): the AVX2 one against the numpy code, the
scalar one against libm called through ctypes. On any mismatch or if numba is missing, the runtime
keeps the numpy path (:func:`disable_reason` says why; a failed compilation or check also warns
once); if only libm cannot be reached through ctypes, the scalar kernel alone stays on numpy
(:func:`has_kernel`). ``KSAMPLER_RT_JIT=0`` turns the kernels off. The exhaustive checks (all 2**24
inputs of each half of the Box-Muller kernels) are in the tests.

Compiled code is cached on disk by numba (``cache=True``; ``NUMBA_CACHE_DIR`` moves it), so only
the first process on a machine pays the compilation (a few seconds).
"""
from __future__ import annotations

import ctypes
import os
import threading
import warnings

import numpy as np

from . import randn_numpy, randn_reference

__all__ = [
    "available",
    "brownian_bridge",
    "brownian_bridge_seeded",
    "disable_reason",
    "has_kernel",
    "randn_from_bitgen",
    "randn_seeds",
    "register_warm_up",
    "seed_sequence_pool",
    "warm_up_in_background",
]

_ENV = "KSAMPLER_RT_JIT"

_lock = threading.Lock()
_state: dict = {"checked": False, "ok": False, "why": "", "scalar": False}
_WARM_UP: list = []  # more kernel groups to load in warm_up_in_background (register_warm_up)


def disable_reason() -> str:
    """Why the compiled kernels are not used ("" when they are)."""
    available()
    return _state["why"]


def available() -> bool:
    """True when numba is importable, not turned off, and the kernels passed the self-check."""
    if _state["checked"]:
        return _state["ok"]
    with _lock:
        if _state["checked"]:
            return _state["ok"]
        ok, why = _enable()
        _state.update(checked=True, ok=ok, why=why)
        if not ok and why.startswith(("numba compilation failed", "self-check failed")):
            warnings.warn(f"ksampler_rt: compiled kernels off, the numpy path runs instead ({why})",
                          RuntimeWarning, stacklevel=2)
        return ok


def has_kernel(kernel: str) -> bool:
    """Whether randn's Box-Muller ``kernel`` (``"avx2"`` / ``"default"``) runs compiled."""
    return available() and (kernel == "avx2" or _state["scalar"])


def register_warm_up(fn) -> None:
    """Have :func:`warm_up_in_background` also call ``fn()`` (a kernel group built on this switch,
    e.g. :mod:`.cfg_jit`, which imports this module, not the other way round)."""
    if fn not in _WARM_UP:
        _WARM_UP.append(fn)


def warm_up_in_background() -> None:
    """Import numba and load (or compile) the kernels in a daemon thread, so the first sampling
    run of a process does not wait for it (about 1.5 s with a warm cache). Idempotent."""
    if _state["checked"] or _state.get("warming"):
        return
    _state["warming"] = True

    def warm():
        if available():
            for fn in list(_WARM_UP):
                fn()

    threading.Thread(target=warm, name="ksrt-jit-warm-up", daemon=True).start()


def _enable():
    if os.environ.get(_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False, f"{_ENV}=0"
    try:
        _compile()
        _self_check()  # calls every kernel once: numba compiles (or loads) them here
    except ImportError:
        return False, "numba not installed (pip install 'ksampler-rt[jit]')"
    except _SelfCheckFailed as e:
        return False, f"self-check failed: {e}"
    except Exception as e:  # noqa: BLE001 - a numba/llvm failure must not break sampling
        return False, f"numba compilation failed: {type(e).__name__}: {e}"
    return True, ""


# ---------------------------------------------------------------------------------------------
# kernels (compiled lazily: importing this module never imports numba)
# ---------------------------------------------------------------------------------------------
_K: dict = {}

_N = 624          # mt19937 state words
_BLOCKS = 256     # Box-Muller blocks of 16 per chunk (as in _jit_kernels)


def _compile() -> None:
    if _K:
        return
    from . import _jit_kernels as k

    _K.update(randn_state=k.randn_state, randn_seeds=k.randn_seeds, mt_words=k.mt_words,
              mt_seed=k.mt_seed, fill_blocks=k.fill_blocks, fill_blocks_default=k.fill_blocks_default,
              bridge=k.bridge, bridge_seeded=k.bridge_seeded, seed_sequence_pool=k.seed_sequence_pool)


# ---------------------------------------------------------------------------------------------
# numpy MT19937 state access
# ---------------------------------------------------------------------------------------------
def _state_view(bg: np.random.MT19937) -> np.ndarray:
    """uint32[625] view of numpy's ``mt19937_state {uint32_t key[624]; int pos;}`` of ``bg``.

    The view aliases the bit generator's memory: keep ``bg`` alive while it is used. The layout is
    verified against ``bg.state`` / ``random_raw`` by :func:`_self_check` before any use.
    """
    buf = (ctypes.c_uint32 * (_N + 1)).from_address(bg.ctypes.state_address)
    return np.frombuffer(buf, dtype=np.uint32)


class _SelfCheckFailed(RuntimeError):
    pass


def _expect(ok, what: str) -> None:
    """A self-check condition (not ``assert``: it must also hold under ``python -O``)."""
    if not ok:
        raise _SelfCheckFailed(what)


def _self_check() -> None:
    # state layout and mt19937 stream, across a twist boundary, against numpy's own generator
    a, b = np.random.MT19937(0), np.random.MT19937(0)
    a._legacy_seeding(12345)
    b._legacy_seeding(12345)
    st = _state_view(a)
    _expect(np.array_equal(st[:_N], b.state["state"]["key"]), "state layout (key)")
    _expect(int(st[_N]) == int(b.state["state"]["pos"]), "state layout (pos)")
    got = np.empty(1000, np.uint32)
    _K["mt_words"](st, got, 1000)
    _expect(np.array_equal(got, b.random_raw(1000).astype(np.uint32)), "mt19937 words")
    _expect(np.array_equal(a.random_raw(7), b.random_raw(7)), "mt19937 state after words")
    for n in (37, 4096):  # the whole draw, tail rule included, against the numpy path
        a._legacy_seeding(7)
        b._legacy_seeding(7)
        got = randn_from_bitgen(a, n, np.empty(n, np.float32))
        want = randn_numpy.normal_fill_raw(b.random_raw(n + (16 if n % 16 else 0)), n, "avx2")
        _expect(np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"randn({n})")
        rows = randn_seeds(np.array([7, 2**32 + 7], np.uint64), n, np.empty((2, n), np.float32))
        _expect(np.array_equal(rows[0], want) and np.array_equal(rows[1], want), f"randn({n}) per seed")
    seeded = np.empty(_N + 1, np.uint32)
    _K["mt_seed"](seeded, np.uint64(4294967295))
    b._legacy_seeding(4294967295)
    _expect(np.array_equal(seeded[:_N], b.state["state"]["key"]), "mt19937 seeding")
    # Box-Muller on every 24-bit boundary value and a spread of others, against the numpy kernel
    k = np.concatenate([np.arange(0, 4096), np.arange(2**24 - 4096, 2**24),
                        np.linspace(0, 2**24 - 1, 8192).astype(np.int64)]).astype(np.uint32)
    words = _blocks_of(k, k[::-1])
    want = np.empty(words.size, np.float32)
    randn_numpy.fill_blocks_avx2(words.reshape(-1, 16), want.reshape(-1, 16))
    got = np.empty(words.size, np.float32)
    _fill_words(words, got)
    _expect(np.array_equal(got.view(np.uint32), want.view(np.uint32)), "Box-Muller kernel")
    _state["scalar"] = _check_scalar_kernel()
    # Brownian bridge: float32 operations in torch's order, no FMA contraction
    w, z = want[:4096].copy(), want[4096:8192].copy()
    left, right = brownian_bridge(w, z, 0.3, 1.7, 0.55)
    ref_left = w * np.float32(0.3)
    ref_left *= np.float32(1.7)
    ref_left += z * np.float32(0.55)
    _expect(np.array_equal(left, ref_left) and np.array_equal(right, w - ref_left), "Brownian bridge")
    for n in (37, 16 * _BLOCKS + 37):  # tail rule; a full chunk, a shorter one and the tail
        w = np.linspace(-2, 2, n, dtype=np.float32)
        z = randn_seeds(np.array([99], np.uint64), n, np.empty((1, n), np.float32))[0]
        split = brownian_bridge(w, z, 0.3, 1.7, 0.55)
        fused = brownian_bridge_seeded(2**32 + 99, w, 0.3, 1.7, 0.55)
        _expect(all(np.array_equal(g, e) for g, e in zip(fused, split)), f"seeded Brownian bridge ({n})")
    for entropy, key in ((42, ()), (2**64 - 1, (5, 3)), (0, (2**40 + 7, 41))):
        ss = np.random.SeedSequence(entropy, spawn_key=key, pool_size=24)
        _expect(np.array_equal(seed_sequence_pool(entropy, key, 24), ss.pool), "SeedSequence pool")


def _check_scalar_kernel() -> bool:
    """The scalar Box-Muller against libm's logf/sinf/cosf called through ctypes (boundary words
    and a spread of others); False when libm cannot be reached that way (kernel left unused)."""
    lib = randn_reference.libm()
    if lib is None:
        return False
    k = np.concatenate([np.arange(0, 512), np.arange(2**24 - 512, 2**24),
                        np.linspace(0, 2**24 - 1, 1024).astype(np.int64)]).astype(np.uint32)
    u = k.astype(np.float32) * randn_reference.TWO_M24
    c, s = randn_reference.box_muller_libm(np.float32(1) - u, u[::-1].copy(), lib)
    want = np.empty((k.size // 8, 2, 8), np.float32)
    want[:, 0, :] = c.reshape(-1, 8)
    want[:, 1, :] = s.reshape(-1, 8)
    got = np.empty(k.size * 2, np.float32)
    _fill_words(_blocks_of(k, k[::-1]), got, scalar=True)
    _expect(np.array_equal(got.view(np.uint32), want.reshape(-1).view(np.uint32)), "scalar Box-Muller kernel")
    return True


def _blocks_of(k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
    """Raw words whose Box-Muller blocks take u1 words ``k1`` and u2 words ``k2`` (8 per block)."""
    words = np.empty((k1.size // 8, 2, 8), np.uint32)
    words[:, 0, :] = k1.reshape(-1, 8)
    words[:, 1, :] = k2.reshape(-1, 8)
    return words.reshape(-1)


def _fill_words(words: np.ndarray, out: np.ndarray, scalar: bool = False) -> None:
    """Box-Muller of whole blocks of 16 uint32 words into ``out`` (AVX2 kernel, or the scalar one)."""
    h = _BLOCKS * 8
    scratch = [np.empty(h, np.int32), np.empty(h, np.int32)] + [np.empty(h, np.float32) for _ in range(3)]
    fill = _K["fill_blocks_default" if scalar else "fill_blocks"]
    for b0 in range(0, words.size // 16, _BLOCKS):
        m = min(_BLOCKS, words.size // 16 - b0)
        fill(words, b0 * 16, m, out, b0 * 16, *scratch)


# ---------------------------------------------------------------------------------------------
# entry points used by .generator and .brownian (callers check has_kernel() first)
# ---------------------------------------------------------------------------------------------
def _scalar(kernel: str) -> bool:
    if kernel not in ("avx2", "default"):
        raise ValueError(f"kernel: received {kernel!r}, expected 'avx2' or 'default'")
    return kernel == "default"


def randn_from_bitgen(bg: np.random.MT19937, n: int, out: np.ndarray, kernel: str = "avx2") -> np.ndarray:
    """torch ``normal_fill`` (Box-Muller ``kernel``, n >= 16) from numpy bit generator ``bg``, advancing
    it exactly as ``bg.random_raw(n + (16 if n % 16 else 0))`` would. ``out``: float32, C-contiguous."""
    if n < 16:
        raise ValueError(f"n: received {n}, expected >= 16 (smaller draws take torch's scalar path)")
    if not (out.flags.c_contiguous and out.dtype == np.float32 and out.size == n):
        raise ValueError(f"out: received {out.dtype} {out.shape}, expected a C-contiguous float32 array of {n} elements")
    _K["randn_state"](_state_view(bg), n, out.reshape(-1), _scalar(kernel))
    return out


def brownian_bridge(w: np.ndarray, z: np.ndarray, l_diff: float, h_rec: float, z_scale: float):
    """(left, right) = ((w * l) * h + z * s, w - left) in float32 (torch's order), one pass.
    w, z: C-contiguous float32 of one shape; l, h, s rounded to float32 as torch's scalars are."""
    left = np.empty_like(w)
    right = np.empty_like(w)
    _K["bridge"](w.reshape(-1), z.reshape(-1), np.float32(l_diff), np.float32(h_rec), np.float32(z_scale),
                 left.reshape(-1), right.reshape(-1))
    return left, right


def brownian_bridge_seeded(seed: int, w: np.ndarray, l_diff: float, h_rec: float, z_scale: float,
                           kernel: str = "avx2"):
    """:func:`brownian_bridge` with z = torch ``randn(w.size)`` (Box-Muller ``kernel``) of a generator seeded
    with ``seed`` (low 32 bits): the same values as :func:`randn_seeds` then :func:`brownian_bridge`,
    with the noise drawn and used chunk by chunk instead of stored. w: C-contiguous float32, >= 16
    elements."""
    if w.size < 16 or not (w.flags.c_contiguous and w.dtype == np.float32):
        raise ValueError(f"w: received {w.dtype} {w.shape}, expected a C-contiguous float32 array "
                         "of at least 16 elements")
    left = np.empty_like(w)
    right = np.empty_like(w)
    _K["bridge_seeded"](np.uint64(int(seed) & 0xFFFFFFFF), w.reshape(-1), np.float32(l_diff),
                        np.float32(h_rec), np.float32(z_scale), left.reshape(-1), right.reshape(-1),
                        _scalar(kernel))
    return left, right


def _uint32_words(x: int) -> list:
    """numpy's ``_int_to_uint32_array``: little-endian 32-bit words, [0] for 0."""
    if x == 0:
        return [0]
    words = []
    while x:
        words.append(x & 0xFFFFFFFF)
        x >>= 32
    return words


def seed_sequence_pool(entropy: int, spawn_key: tuple, pool_size: int) -> np.ndarray:
    """``np.random.SeedSequence(entropy, spawn_key=spawn_key, pool_size=pool_size).pool``
    (non-negative int entropy and spawn key entries), without building the SeedSequence."""
    words = _uint32_words(entropy)
    if spawn_key:
        words += [0] * (pool_size - len(words))  # numpy pads the run entropy when spawned
        for k in spawn_key:
            words += _uint32_words(int(k))
    pool = np.empty(pool_size, np.uint64)
    _K["seed_sequence_pool"](np.array(words, dtype=np.uint64), pool)
    return pool


def randn_seeds(seeds: np.ndarray, n: int, out: np.ndarray, kernel: str = "avx2") -> np.ndarray:
    """out[i] = torch ``randn(n)`` (Box-Muller ``kernel``, n >= 16) of a generator seeded with seeds[i]
    (low 32 bits). ``out``: float32 [len(seeds), n], C-contiguous."""
    if n < 16:
        raise ValueError(f"n: received {n}, expected >= 16 (smaller draws take torch's scalar path)")
    s = np.asarray(seeds, dtype=np.uint64) & np.uint64(0xFFFFFFFF)
    if not (out.flags.c_contiguous and out.dtype == np.float32 and out.size == n * len(s)):
        raise ValueError(f"out: received {out.dtype} {out.shape}, expected a C-contiguous float32 array "
                         f"of {len(s)} x {n} elements")
    _K["randn_seeds"](s, n, out.reshape(len(s), -1), _scalar(kernel))
    return out


class CheckedKernels:
    """A group of compiled kernels beside the generator's (the CFG head, the fused sampler passes): on when
    the compiled kernels are (:func:`available`) and the group compiled and passed its self-check, decided
    once per process, thread-safe; otherwise the numpy path runs, after one warning naming why."""

    def __init__(self, label: str, compile_fn, self_check):
        self.label, self._compile, self._self_check = label, compile_fn, self_check
        self._lock = threading.Lock()
        self.checked, self.ok, self.why = False, False, ""

    def available(self) -> bool:
        if not available():
            return False
        if self.checked:
            return self.ok
        with self._lock:
            if not self.checked:
                try:
                    self._compile()
                    self._self_check()
                    ok, why = True, ""
                except Exception as e:  # noqa: BLE001 - a numba/llvm failure must not break sampling
                    ok, why = False, f"{self.label}: {type(e).__name__}: {e}"
                    warnings.warn(f"ksampler_rt: compiled {self.label} off, the numpy path runs instead ({why})",
                                  RuntimeWarning, stacklevel=3)
                self.ok, self.why, self.checked = ok, why, True
            return self.ok

