"""torch's CPU generator and ``randn`` as numpy streams, and ComfyUI's ``prepare_noise``.

Nothing here imports torch; torch is only a test-time oracle. Reference: torch 2.13
``ATen/native/cpu/DistributionTemplates.h``, ``ATen/core/DistributionsHelper.h``,
``ATen/native/DispatchStub.{h,cpp}``; ComfyUI 0.3.64 ``comfy/sample.py``.

* Engine: ``at::mt19937`` seeded with ``init_genrand(seed & 0xffffffff)``: the same stream as
  numpy's ``MT19937`` with legacy seeding, so numpy's C implementation supplies the raw words.
* ``numel >= 16`` (contiguous float32): ``normal_fill`` (see :mod:`.randn_reference`).
* ``numel < 16``: ``at::normal_distribution<double>`` per element: two 53-bit doubles
  (``random64 = hi32 << 32 | lo32``), ``r = sqrt(-2 log1p(-u2))``, ``theta = 2 pi u1``, returns
  ``r cos(theta)`` and caches ``r sin(theta)`` in the generator for the next scalar draw. The cache
  survives across calls (the >= 16 path neither reads nor clears it) and ``manual_seed`` clears it.
* Which Box-Muller kernel torch runs (:func:`default_kernel`): ``normal_stub`` is registered with
  plain ``REGISTER_DISPATCH``, which registers no AVX512 kernel, so the AVX512 capability falls
  back to the AVX2 build: ``avx2`` and ``avx512`` run the ``"avx2"`` kernel, ``default`` (and every
  non-x86 CPU) the scalar ``"default"`` one. Measured with torch 2.13 on an AVX-512 CPU under
  ``ATEN_CPU_CAPABILITY`` unset / ``avx2`` / ``default``.

Exactness: the ``"avx2"`` kernel is bit-exact on the numpy path and compiled. The ``"default"``
kernel is bit-exact compiled (libm's ``logf``/``sincosf``, see :mod:`.jit`); on the numpy path
(numba missing or ``KSAMPLER_RT_JIT=0``) about 1.5 % of elements differ from torch, by 1 ulp
mostly and at most 3 ulp in 3 million elements measured.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from . import jit, randn_numpy
from . import randn_reference as R
from .cpu_capability import aten_capability
from .randn_reference import F32

__all__ = [
    "KERNELS",
    "TorchCPUGenerator",
    "check_kernel",
    "check_seed",
    "check_shape",
    "default_kernel",
    "kernel_for_capability",
    "prepare_noise",
    "randn_many",
    "torch_randn",
]

KERNELS = ("avx2", "default")
ENV_KERNEL = "KSAMPLER_RT_RANDN_KERNEL"
_MAX_SEED = 2**64 - 1
_CAPABILITY_KERNEL = {"default": "default", "avx2": "avx2", "avx512": "avx2"}


def kernel_for_capability(capability: str) -> str:
    """The Box-Muller kernel torch's CPU randn runs under ATen CPU ``capability``."""
    try:
        return _CAPABILITY_KERNEL[capability]
    except KeyError:
        raise ValueError(f"capability: received {capability!r}, expected one of "
                         f"{', '.join(map(repr, _CAPABILITY_KERNEL))}") from None


def default_kernel() -> str:
    """The Box-Muller kernel torch's CPU randn uses here: env ``KSAMPLER_RT_RANDN_KERNEL``
    (``avx2``/``default``) if set, else the kernel of :func:`.cpu_capability.aten_capability`
    (which honours torch's own ``ATEN_CPU_CAPABILITY``)."""
    env = os.environ.get(ENV_KERNEL, "").strip().lower()
    if env:
        if env not in KERNELS:
            raise ValueError(f"{ENV_KERNEL}: received {env!r}, expected 'avx2' or 'default'")
        return env
    return _CAPABILITY_KERNEL[aten_capability()]


def check_kernel(kernel: Optional[str]) -> str:
    """Validate a kernel argument (None = :func:`default_kernel`)."""
    if kernel is None:
        return default_kernel()
    if kernel not in KERNELS:
        raise ValueError(f"kernel: received {kernel!r}, expected 'avx2', 'default' or None")
    return kernel


def check_seed(seed, name: str = "seed") -> int:
    """Validate a torch seed: an int in [0, 2**64-1] (bools refused)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name}: received {seed!r} of type {type(seed).__name__}, expected an int in [0, 2**64-1]")
    seed = int(seed)
    if seed < 0 or seed > _MAX_SEED:
        raise ValueError(f"{name}: received {seed}, expected an int in [0, 2**64-1]")
    return seed


def check_shape(shape) -> tuple:
    """Validate a shape: an int or a sequence of non-negative ints; returns a tuple."""
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape: received {shape!r}, expected a tuple of non-negative ints") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"shape: received {shape}, expected a tuple of non-negative ints")
    return shape


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
    generator=g)`` calls on one torch generator whose CPU runs Box-Muller ``kernel`` (default:
    this machine's, :func:`default_kernel`; exactness as in the module docstring).
    ``get_state()`` / ``set_state()`` give a picklable snapshot of the stream position.
    """

    __slots__ = ("_seed", "_bg", "_next_double_normal", "kernel")

    def __init__(self, seed: int = 67280421310721, kernel: Optional[str] = None):
        self.kernel = check_kernel(kernel)
        self._bg = None
        seed = check_seed(seed)
        self._bg = _take_bg()
        self.manual_seed(seed)

    def __del__(self):
        bg = getattr(self, "_bg", None)
        if bg is not None and _give_bg is not None:  # module globals may be gone at shutdown
            self._bg = None
            _give_bg(bg)

    def manual_seed(self, seed: int) -> "TorchCPUGenerator":
        """Same as ``torch.Generator.manual_seed``: mt19937 from the low 32 bits; clears the cache."""
        seed = check_seed(seed)
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
        return R.u32_to_uniform(self._random_u32(n))

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
        shape = check_shape(shape)
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if n >= 16:
            if jit.has_kernel(self.kernel):
                return jit.randn_from_bitgen(self._bg, n, np.empty(shape, F32), self.kernel)
            raw = self._random_u32(n + (16 if n % 16 else 0))
            return randn_numpy.normal_fill_raw(raw, n, self.kernel).reshape(shape)
        vals = [self._normal_double() for _ in range(n)]  # < 16 elements
        return np.asarray(vals, dtype=np.float64).astype(F32).reshape(shape)

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
            raise ValueError(f"state['mt_key']: received shape {key.shape}, expected shape (624,)")
        self._seed = check_seed(state["seed"], "state['seed']")
        self.kernel = check_kernel(state.get("kernel", self.kernel))
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
        self.kernel = check_kernel(state.get("kernel"))
        self.set_state(state)


_POOL = None


def _thread_count() -> int:
    env = os.environ.get("KSAMPLER_RT_NOISE_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"KSAMPLER_RT_NOISE_THREADS: received {env!r}, expected a positive int") from None
    cpus = os.cpu_count() or 1
    return min(4, cpus) if cpus >= 4 else 1


def _pool(workers: int):
    global _POOL
    if _POOL is None or _POOL._max_workers < workers:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ksrt-randn")
    return _POOL


def _randn_chunk(seeds, n: int, kernel: str, out: np.ndarray) -> None:
    if out.flags.c_contiguous and jit.has_kernel(kernel):
        jit.randn_seeds(np.asarray(seeds, dtype=np.uint64), n, out, kernel)
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
    if kernel != "avx2":
        out[...] = R.normal_fill(R.u32_to_uniform(raw), n, kernel)
        return
    if not tail and out.flags.c_contiguous:
        randn_numpy.fill_blocks_avx2(raw.reshape(-1, 16), out.reshape(-1, 16))
        return
    blocks = np.concatenate([raw[:, : nb * 16], raw[:, n:]], axis=1) if tail else raw
    res = np.empty(blocks.shape, dtype=F32)
    randn_numpy.fill_blocks_avx2(blocks.reshape(-1, 16), res.reshape(-1, 16))
    out[:, : nb * 16] = res[:, : nb * 16]
    if tail:
        out[:, n - 16:] = res[:, nb * 16:]


def randn_many(seeds, shape, kernel: Optional[str] = None, max_chunk: int = 1 << 16,
               workers: Optional[int] = None) -> np.ndarray:
    """``stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])``.

    Same values as one ``TorchCPUGenerator(s).randn(shape)`` per seed, but the Box-Muller math of
    several seeds runs in vectorised chunks of about ``max_chunk`` elements, spread over
    ``workers`` threads (numpy releases the GIL in its loops; default
    ``KSAMPLER_RT_NOISE_THREADS``, else min(4, cpu_count) on >= 4 cores, else 1). Results do not
    depend on either.
    """
    kernel = check_kernel(kernel)
    shape = check_shape(shape)
    seeds = [check_seed(s, "seeds[]") for s in seeds]
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    out = np.empty((len(seeds), n), dtype=F32)
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


def prepare_noise(samples, seed: int, batch_index=None, kernel: Optional[str] = None) -> np.ndarray:
    """ComfyUI ``comfy.sample.prepare_noise(latent_image, seed, noise_inds)`` (0.3.64), float32.

    One ``randn`` of the latent's shape from a generator seeded with ``seed``. With
    ``batch_index``: for i in 0..max(unique indices) draw a ``[1, C, H, W]`` noise in sequence,
    keep the draws whose i is requested, and give each latent row the draw of its index.
    """
    if not isinstance(samples, np.ndarray):
        raise TypeError(f"samples: received {type(samples).__name__}, expected a 4-D float numpy array [B, C, H, W]")
    if samples.ndim != 4 or not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"samples: received a {samples.ndim}-D {samples.dtype} array of shape {samples.shape}, "
                         f"expected a 4-D float array [B, C, H, W]")
    seed = check_seed(seed)
    gen = TorchCPUGenerator(seed, kernel=kernel)
    if batch_index is None:
        return gen.randn(samples.shape)
    try:
        inds = np.asarray(batch_index)
    except Exception:  # pragma: no cover - defensive
        inds = None
    if (inds is None or inds.ndim != 1 or inds.size == 0
            or not (np.issubdtype(inds.dtype, np.integer)) or (inds < 0).any()):
        raise ValueError(f"batch_index: received {batch_index!r}, expected None or a non-empty list of "
                         f"non-negative ints, one per latent row")
    if inds.size != samples.shape[0]:
        raise ValueError(f"batch_index: received {inds.size} indices for a batch of {samples.shape[0]}, "
                         f"expected one index per latent row")
    unique, inverse = np.unique(inds, return_inverse=True)
    wanted = set(int(i) for i in unique)
    row_shape = (1,) + tuple(samples.shape[1:])
    kept = []
    for i in range(int(unique[-1]) + 1):
        noise = gen.randn(row_shape)
        if i in wanted:
            kept.append(noise)
    return np.concatenate([kept[i] for i in np.asarray(inverse).reshape(-1)], axis=0)
