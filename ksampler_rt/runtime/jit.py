"""Optional compiled kernels (numba, extra ``[jit]``) for the runtime's hottest host loops.

The numpy code stays the reference and the fallback; every kernel here computes the same float32
operations in the same order, fused into one or a few loops, so results are bit-identical:

* torch's CPU ``randn`` (:mod:`.noise`). In numpy it needs about 60 array passes per draw (float32
  FMAs emulated in float64, one numpy loop per operation). Here:
  - mt19937 (seeding, twist, tempering) works directly on the state of a numpy ``MT19937`` bit
    generator, so the generator objects of :mod:`.noise` (their ``state``, ``random_raw``) stay
    the one source of truth and both paths can be mixed on one stream;
  - the AVX2 Box-Muller (``log256_ps`` / ``sincos256_ps`` of ATen's ``avx_mathfun.h``) is
    written with real float32 FMAs (``llvm.fma.f32``) at the contraction points GCC emits for
    torch's ``NormalFill16`` (see ``_log256_ps`` / ``_sincos256_ps`` in :mod:`.noise`). An FMA
    is one correctly rounded operation, so this is bit-identical to torch's kernel by
    construction. LLVM gets no fast-math flags: it may neither contract nor reassociate
    anything else. Only the ``"avx2"`` kernel is compiled;
* the Brownian tree's bridge and numpy's ``SeedSequence`` pool mixing (:mod:`.brownian`);
* the CFG head of an eps model (:mod:`.cfg`): both rows' denoised values, the guidance
  combination and the UNet output's finiteness check in one pass.

Every kernel is checked against the numpy code on first use (:func:`available`); on any mismatch
or if numba is missing, the runtime keeps the numpy path (:func:`disable_reason` says why; a failed
compilation or check also warns once). ``KSAMPLER_RT_JIT=0`` turns the kernels off. The exhaustive checks (all 2**24 inputs of
each half of the Box-Muller kernel) are in the tests.

Compiled code is cached on disk by numba (``cache=True``; ``NUMBA_CACHE_DIR`` moves it), so only
the first process on a machine pays the compilation (a few seconds).
"""
from __future__ import annotations

import ctypes
import os
import threading
import warnings

import numpy as np

__all__ = [
    "NonFiniteOutput",
    "available",
    "brownian_bridge",
    "brownian_bridge_seeded",
    "cfg_eps",
    "disable_reason",
    "randn_from_bitgen",
    "randn_seeds",
    "seed_sequence_pool",
    "warm_up_in_background",
]

_ENV = "KSAMPLER_RT_JIT"

_lock = threading.Lock()
_state: dict = {"checked": False, "ok": False, "why": ""}


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


def warm_up_in_background() -> None:
    """Import numba and load (or compile) the kernels in a daemon thread, so the first sampling
    run of a process does not wait for it (about 1.5 s with a warm cache). Idempotent."""
    if _state["checked"] or _state.get("warming"):
        return
    _state["warming"] = True
    threading.Thread(target=available, name="ksrt-jit-warm-up", daemon=True).start()


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
              mt_seed=k.mt_seed, fill_blocks=k.fill_blocks, bridge=k.bridge,
              bridge_seeded=k.bridge_seeded, seed_sequence_pool=k.seed_sequence_pool, cfg_eps=k.cfg_eps)


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
    from . import noise as ref

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
        want = ref._normal_fill_raw(b.random_raw(n + (16 if n % 16 else 0)), n, "avx2")
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
    words = np.empty((k.size // 8) * 16, np.uint32).reshape(-1, 2, 8)
    words[:, 0, :] = k.reshape(-1, 8)
    words[:, 1, :] = k[::-1].reshape(-1, 8)
    words = words.reshape(-1)
    want = np.empty(words.size, np.float32)
    ref._fill_blocks_avx2(words.reshape(-1, 16), want.reshape(-1, 16))
    got = np.empty(words.size, np.float32)
    for b0 in range(0, words.size // 16, _BLOCKS):
        m = min(_BLOCKS, words.size // 16 - b0)
        _fill_words(words[b0 * 16:(b0 + m) * 16], got[b0 * 16:(b0 + m) * 16])
    _expect(np.array_equal(got.view(np.uint32), want.view(np.uint32)), "Box-Muller kernel")
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
    # CFG head against the numpy expressions of model_sampling / cfg
    x = want[:2048].reshape(2, 1, 32, 32).copy()
    out = want[2048:6144].reshape(4, 1, 32, 32).copy()
    sigma, cfg = np.float32(2.5), np.float32(7.5)
    res, unc = cfg_eps(x, out, sigma, cfg, uncond_first=True)
    d = x[None] - out.reshape(2, 2, 1, 32, 32) * sigma
    _expect(np.array_equal(unc, d[0]) and np.array_equal(res, d[0] + (d[1] - d[0]) * cfg), "CFG head")
    out[3, 0, 5, 7] = np.inf
    try:
        cfg_eps(x, out, sigma, cfg, uncond_first=False)
        _expect(False, "CFG head: non-finite output not reported")
    except NonFiniteOutput as e:
        _expect(e.count == 1, "CFG head: non-finite count")


def _fill_words(words: np.ndarray, out: np.ndarray) -> None:
    """Box-Muller of whole blocks of 16 uint32 words (at most _BLOCKS blocks) into ``out``."""
    h = _BLOCKS * 8
    scratch = [np.empty(h, np.int32), np.empty(h, np.int32)] + [np.empty(h, np.float32) for _ in range(3)]
    _K["fill_blocks"](words, 0, words.size // 16, out, 0, *scratch)


# ---------------------------------------------------------------------------------------------
# entry points used by .noise (callers check available() first)
# ---------------------------------------------------------------------------------------------
def randn_from_bitgen(bg: np.random.MT19937, n: int, out: np.ndarray) -> np.ndarray:
    """torch ``normal_fill`` (AVX2 kernel, n >= 16) from numpy bit generator ``bg``, advancing it
    exactly as ``bg.random_raw(n + (16 if n % 16 else 0))`` would. ``out``: float32, C-contiguous."""
    if n < 16:
        raise ValueError(f"n: received {n}, expected >= 16 (smaller draws take torch's scalar path)")
    if not (out.flags.c_contiguous and out.dtype == np.float32 and out.size == n):
        raise ValueError(f"out: received {out.dtype} {out.shape}, expected a C-contiguous float32 array of {n} elements")
    _K["randn_state"](_state_view(bg), n, out.reshape(-1))
    return out


def brownian_bridge(w: np.ndarray, z: np.ndarray, l_diff: float, h_rec: float, z_scale: float):
    """(left, right) = ((w * l) * h + z * s, w - left) in float32 (torch's order), one pass.
    w, z: C-contiguous float32 of one shape; l, h, s rounded to float32 as torch's scalars are."""
    left = np.empty_like(w)
    right = np.empty_like(w)
    _K["bridge"](w.reshape(-1), z.reshape(-1), np.float32(l_diff), np.float32(h_rec), np.float32(z_scale),
                 left.reshape(-1), right.reshape(-1))
    return left, right


def brownian_bridge_seeded(seed: int, w: np.ndarray, l_diff: float, h_rec: float, z_scale: float):
    """:func:`brownian_bridge` with z = torch ``randn(w.size)`` (AVX2 kernel) of a generator seeded
    with ``seed`` (low 32 bits): the same values as :func:`randn_seeds` then :func:`brownian_bridge`,
    with the noise drawn and used chunk by chunk instead of stored. w: C-contiguous float32, >= 16
    elements."""
    if w.size < 16 or not (w.flags.c_contiguous and w.dtype == np.float32):
        raise ValueError(f"w: received {w.dtype} {w.shape}, expected a C-contiguous float32 array "
                         "of at least 16 elements")
    left = np.empty_like(w)
    right = np.empty_like(w)
    _K["bridge_seeded"](np.uint64(int(seed) & 0xFFFFFFFF), w.reshape(-1), np.float32(l_diff),
                        np.float32(h_rec), np.float32(z_scale), left.reshape(-1), right.reshape(-1))
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


class NonFiniteOutput(ValueError):
    """The UNet output handed to :func:`cfg_eps` holds ``count`` NaN or inf values."""

    def __init__(self, count: int):
        super().__init__(f"{count} non-finite values (NaN or inf)")
        self.count = count


def cfg_eps(x: np.ndarray, out: np.ndarray, sigma, cfg, uncond_first: bool):
    """CFG of an eps model from one UNet call over [uncond rows, cond rows] (or cond first).

    For each row pair: ``d = x - out * sigma`` (ComfyUI's ``calculate_denoised``), then
    ``uncond + (cond - uncond) * cfg``. Returns (guided, uncond denoised), fresh float32 arrays of
    x's shape; raises :class:`NonFiniteOutput` if ``out`` holds NaN or inf. x: [B, ...] float32,
    out: [2B, ...] float32, both C-contiguous."""
    if not (x.flags.c_contiguous and out.flags.c_contiguous and x.dtype == np.float32
            and out.dtype == np.float32 and out.size == 2 * x.size):
        raise ValueError(f"x, out: received {x.dtype} {x.shape} and {out.dtype} {out.shape}, expected "
                         "C-contiguous float32 arrays, out with twice x's rows")
    guided = np.empty_like(x)
    uncond = np.empty_like(x)
    finite = _K["cfg_eps"](x.reshape(-1), out.reshape(-1), np.float32(sigma), np.float32(cfg),
                           bool(uncond_first), guided.reshape(-1), uncond.reshape(-1))
    if not finite:
        raise NonFiniteOutput(int(out.size - np.count_nonzero(np.isfinite(out))))
    return guided, uncond


def randn_seeds(seeds: np.ndarray, n: int, out: np.ndarray) -> np.ndarray:
    """out[i] = torch ``randn(n)`` (AVX2 kernel, n >= 16) of a generator seeded with seeds[i]
    (low 32 bits). ``out``: float32 [len(seeds), n], C-contiguous."""
    if n < 16:
        raise ValueError(f"n: received {n}, expected >= 16 (smaller draws take torch's scalar path)")
    s = np.asarray(seeds, dtype=np.uint64) & np.uint64(0xFFFFFFFF)
    if not (out.flags.c_contiguous and out.dtype == np.float32 and out.size == n * len(s)):
        raise ValueError(f"out: received {out.dtype} {out.shape}, expected a C-contiguous float32 array "
                         f"of {len(s)} x {n} elements")
    _K["randn_seeds"](s, n, out.reshape(len(s), -1))
    return out
