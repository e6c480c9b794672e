"""What the samplers draw noise from: ComfyUI's noise samplers for one node seed, with prefetch.

Top of the noise stack: :class:`NoiseSource` hands out a :class:`DefaultNoiseSampler` (ComfyUI
``default_noise_sampler``, over :class:`.generator.TorchCPUGenerator`) and a
:class:`BrownianNoiseSampler` (``BrownianTreeNoiseSampler`` over :class:`.brownian.BrownianTree`).
Both prefetch on one generic worker, :class:`.lookahead.Lookahead`; values never depend on it.
Reference: ComfyUI 0.3.64 ``comfy/k_diffusion/sampling.py``.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Callable, Optional

import numpy as np

from .brownian import BrownianTree
from .generator import TorchCPUGenerator, check_kernel, check_seed, check_shape
from .lookahead import MISS, Lookahead
from .randn_numpy import borrow_workspace, return_workspace
from .randn_reference import F32

__all__ = ["BrownianNoiseSampler", "DefaultNoiseSampler", "NoiseSource"]

ENV_NOISE_PREFETCH = "KSAMPLER_RT_NOISE_PREFETCH"
ENV_BROWNIAN_PREFETCH = "KSAMPLER_RT_BROWNIAN_PREFETCH"


class NoiseSource:
    """What samplers draw noise from; mirrors ComfyUI's noise samplers for one node seed.

    * ``default(x)`` -> ComfyUI ``default_noise_sampler(x, seed)``: a fresh CPU generator seeded
      with ``seed``; every call of the returned sampler returns ``randn(x.shape)`` from it
      (a :class:`DefaultNoiseSampler`).
    * ``brownian(x, sigma_min, sigma_max, queries=None)`` -> ``BrownianTreeNoiseSampler(x,
      sigma_min, sigma_max, seed, cpu=True)`` (torchsde ``BrownianTree`` port, see
      :mod:`.brownian`).

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
        self.seed = check_seed(seed)
        self.kernel = check_kernel(kernel)
        self.generator: Optional[TorchCPUGenerator] = None
        self.tree = None
        self.tree_sign = 1
        self.sigmas = None
        self.prefetch = prefetch
        if int(lookahead) < 1:
            raise ValueError(f"lookahead: received {lookahead!r}, expected an int >= 1")
        self.lookahead = int(lookahead)
        self.last_brownian = None
        self.last_default = None
        self._open = weakref.WeakSet()  # samplers with a prefetch thread, closed by close()
        if sigmas is not None:
            self.expect(sigmas)

    def expect(self, sigmas) -> "NoiseSource":
        """Declare the sigma list the sampler will run over (enables Brownian prefetch)."""
        s = np.asarray(sigmas, dtype=F32)
        if s.ndim != 1:
            raise ValueError(f"sigmas: received shape {s.shape}, expected a 1-D list of sigmas")
        self.sigmas = s
        return self

    def _prefetch_on(self, env: str = ENV_BROWNIAN_PREFETCH) -> bool:
        if self.prefetch is not None:
            return bool(self.prefetch)
        return os.environ.get(env, "1").strip().lower() not in ("0", "false", "no", "off")

    def default(self, x) -> "DefaultNoiseSampler":
        shape = tuple(np.shape(x))
        gen = TorchCPUGenerator(self.seed, kernel=self.kernel)
        self.generator = gen
        sampler = DefaultNoiseSampler(gen, shape, prefetch=self._prefetch_on(ENV_NOISE_PREFETCH),
                                      lookahead=self.lookahead)
        self.last_default = sampler
        if sampler.prefetching:
            self._open.add(sampler)
        return sampler

    def brownian(self, x, sigma_min, sigma_max, queries=None) -> Callable:
        """ComfyUI ``BrownianTreeNoiseSampler``; ``queries``: expected ``(sigma, sigma_next)``
        calls in order, to prefetch (default: consecutive pairs of :meth:`expect`'s sigmas)."""
        t0 = F32(sigma_min)
        t1 = F32(sigma_max)
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


class DefaultNoiseSampler:
    """ComfyUI's ``default_noise_sampler``: ``sampler(sigma, sigma_next)`` returns the next
    ``randn(shape)`` of ``generator`` (the arguments are ignored).

    With ``prefetch``, a daemon thread draws the stream ahead (at most ``lookahead`` draws not yet
    consumed, one before the first call). ``randn(other_shape)`` or a failure in the thread stops
    the prefetch, rewinds the generator to the consumer's position and continues synchronously,
    so the values never depend on prefetching. ``hits`` / ``misses`` count draws served by the
    thread / drawn on the spot. ``close()`` stops and joins the thread (garbage collection stops
    it too, without joining).
    """

    def __init__(self, generator: TorchCPUGenerator, shape, *, prefetch: bool = False,
                 lookahead: int = 2):
        self.generator = generator
        self.shape = check_shape(shape)
        self.hits = 0
        self.misses = 0
        self._next = 0  # index of the consumer's next draw in the prefetched stream
        self._la = None
        if prefetch:
            gen, shp = generator, self.shape  # the worker must not hold the sampler itself
            self._la = Lookahead(lambda i: gen.randn(shp), ahead=max(1, int(lookahead)), first_ahead=1,
                                 mark=lambda i: gen.get_state(), name="ksrt-noise-prefetch",
                                 thread_init=borrow_workspace, thread_exit=return_workspace)
            weakref.finalize(self, self._la.close, False)
            self._la.start()

    @property
    def prefetching(self) -> bool:
        return self._la is not None

    @property
    def _thread(self) -> Optional[threading.Thread]:
        return None if self._la is None else self._la.thread

    def __call__(self, sigma=None, sigma_next=None) -> np.ndarray:
        return self.randn()

    def randn(self, shape=None) -> np.ndarray:
        """The next draw of the stream, of ``shape`` (default: the sampler's shape)."""
        shape = self.shape if shape is None else check_shape(shape)
        la = self._la
        if la is not None:
            if shape == self.shape:
                v = la.take(self._next)
                if v is not MISS:
                    self._next += 1
                    self.hits += 1
                    return v
            self._stop()
        self.misses += 1
        return self.generator.randn(shape)

    def get_state(self) -> dict:
        """The generator state at the consumer's position (what ``generator.get_state()`` would be
        without prefetching)."""
        la = self._la
        if la is None:
            return self.generator.get_state()
        return la.tag(self._next, self.generator.get_state)

    def _stop(self) -> None:
        """Stop prefetching for good and rewind the generator to the consumer's position."""
        la = self._la
        la.close()
        state = la.tag(self._next)  # the state before the first draw not consumed, if it started
        if state is not None:
            self.generator.set_state(state)
        self._la = None

    def close(self) -> None:
        """Stop the prefetch thread and wait for it (its draw in progress, if any, finishes)."""
        if self._la is not None:
            self._la.close()


def _brownian_increment(tree, sign, lock, key):
    a, b = key
    lo, hi, s = (a, b, 1) if a < b else (b, a, -1)
    # (+-W) / sqrt(|dt|): the tree does the sign and the division in its summing pass when compiled
    with lock:
        return tree.scaled(float(lo), float(hi), sign * s < 0, np.sqrt(np.abs(b - a)))


class BrownianNoiseSampler:
    """``noise_sampler(sigma, sigma_next)`` over a :class:`.brownian.BrownianTree`, with optional
    prefetch of the planned ``queries`` (at most ``lookahead`` results ahead of the sampler).

    ``hits`` / ``misses`` count calls served by the prefetch thread vs computed on the spot (a
    query that was not planned, or whose result is not there yet). ``close()`` stops the thread
    (it also stops by itself at the end of the plan, and when this object is garbage-collected).
    """

    def __init__(self, tree, sign, queries=None, lookahead: int = 2):
        self.tree = tree
        self.sign = sign
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()  # serialises tree access (the tree is not thread-safe)
        plan = [(F32(a), F32(b)) for a, b in (queries or ())]
        self._where: dict = {}         # query -> its indices in the plan, ascending
        for i, key in enumerate(plan):
            self._where.setdefault(key, []).append(i)
        self._la = None
        if plan:
            lock = self._lock
            self._la = Lookahead(lambda i: _brownian_increment(tree, sign, lock, plan[i]), count=len(plan),
                                 ahead=lookahead, name="ksrt-brownian-prefetch",
                                 thread_init=borrow_workspace, thread_exit=return_workspace)
            weakref.finalize(self, self._la.close, False)
            self._la.start()

    @property
    def _thread(self) -> Optional[threading.Thread]:
        return None if self._la is None else self._la.thread

    def __call__(self, sigma, sigma_next):
        key = (F32(sigma), F32(sigma_next))
        la = self._la
        if la is not None:
            pos = la.position
            idx = next((i for i in self._where.get(key, ()) if i >= pos), None)
            if idx is not None:
                w = la.take(idx, wait=False)
                if w is not MISS:
                    self.hits += 1
                    return w
        self.misses += 1
        return _brownian_increment(self.tree, self.sign, self._lock, key)

    def close(self) -> None:
        if self._la is not None:
            self._la.close()
