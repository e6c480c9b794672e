"""numpy port of torchsde 0.2.6 ``BrownianTree`` as ComfyUI builds it.

ComfyUI (``comfy/k_diffusion/sampling.py: BatchedBrownianTree``) calls
``torchsde.BrownianTree(t0, w0=zeros_like(x), t1, entropy=seed)`` with the defaults
``tol=1e-6, pool_size=24``, which constructs ``BrownianInterval(..., halfway_tree=True,
cache_size=45, levy_area_approximation='none')`` (torchsde/_brownian/derived.py and
brownian_interval.py). Behaviour reproduced here:

* Times are quantised with ``round(t, 6)`` (``ndigits = -int(log10(tol))``); node ends are rounded.
* Root: ``SeedSequence(entropy, pool_size=24).generate_state(3)[0]`` seeds a torch CPU generator;
  ``W_root = randn(shape) * float32(sqrt(t1 - t0))`` with the *unrounded* t0, t1.
* Splitting a node always happens at its rounded midpoint ("halfway tree"); splitting towards a
  query point recurses until a rounded midpoint equals it. A split node's seed is
  ``SeedSequence(entropy, spawn_key=(key, depth), pool_size=24).generate_state(4)[0]`` with
  ``key = 2*parent_key + (0 left | 1 right)``, root ``key = depth = 0``.
* Brownian bridge, in float32 as torch evaluates it: with ``h = 1/(end-start)``,
  ``l = mid-start``, ``r = end-mid`` (Python doubles),
  ``W_left = (W * f32(l)) * f32(h) + Z * f32(sqrt(l*r*h))``, ``W_right = W - W_left`` where Z is the
  parent's ``randn`` under its seed.
* A query [ta, tb] is clamped to the root interval, decomposed into the tree's intervals (the
  decomposition and all values are independent of the query history: the tree is dyadic), and
  their increments are summed left to right in float32.

torchsde's LRU cache (45 entries) only changes speed, never values; here both children of a
node are computed and cached together (saving one randn per node). With the compiled kernels
(either Box-Muller kernel, at least 16 elements) each parent's noise is drawn and used chunk by chunk, never
stored; otherwise the noise of all nodes a query needs is generated in one vectorised batch. By
default the cache is bounded in bytes (``cache_bytes``, 64 MiB, but at least 64 entries): once it
is full, evicted arrays are recycled by the allocator instead of every split touching fresh pages
(at [1,4,128,128] the former 512-entry cache cost ~1800 page faults per query).
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Optional

import numpy as np

from . import fused_jit, jit
from .generator import check_kernel, check_seed, randn_many

__all__ = ["BrownianTree"]

_F32 = np.float32


_SS_INIT_B = 0x8B51F9DD
_SS_HASH0 = (_SS_INIT_B * 0x58F38DED) & 0xFFFFFFFF


def _seed_word0(entropy: int, spawn_key: tuple, pool_size: int) -> int:
    """``SeedSequence(entropy, spawn_key, pool_size).generate_state(n)[0]``.

    numpy's generate_state is wrapped in ``np.errstate`` and costs ~50 us; word 0 of its output
    is a three-operation hash of ``pool[0]`` (numpy/random/bit_generator.pyx), done here in
    Python ints. The pool itself comes from the compiled port of SeedSequence's mixing when
    available (building a SeedSequence costs ~30 us). Checked against numpy in
    tests/runtime/test_brownian.py.
    """
    if jit.available():
        pool0 = int(jit.seed_sequence_pool(entropy, spawn_key, pool_size)[0])
    else:
        pool0 = int(np.random.SeedSequence(entropy=entropy, spawn_key=spawn_key, pool_size=pool_size).pool[0])
    d = ((pool0 ^ _SS_INIT_B) * _SS_HASH0) & 0xFFFFFFFF
    return d ^ (d >> 16)


class _Node:
    __slots__ = ("start", "end", "parent", "is_left", "midway", "spawn_key", "depth",
                 "w_seed", "left", "right")

    def __init__(self, start, end, parent, is_left):
        self.start = start
        self.end = end
        self.parent = parent
        self.is_left = is_left
        self.midway = None
        self.spawn_key = None
        self.depth = None
        self.w_seed = None
        self.left = None
        self.right = None


class BrownianTree:
    """``torchsde.BrownianTree(t0, zeros(shape), t1, entropy=entropy)`` increments, in numpy.

    ``tree(ta, tb)`` returns W(tb) - W(ta) as float32 of ``shape`` (``ta <= tb``).
    """

    def __init__(self, t0: float, t1: float, shape, entropy: int, *, tol: float = 1e-6,
                 pool_size: int = 24, cache_size: Optional[int] = None,
                 cache_bytes: int = 64 << 20, kernel: Optional[str] = None):
        try:
            t0 = float(t0)
            t1 = float(t1)
        except (TypeError, ValueError):
            raise TypeError(f"t0/t1: received {t0!r}, {t1!r}, expected real numbers with t0 <= t1") from None
        if not (math.isfinite(t0) and math.isfinite(t1)) or t0 > t1:
            raise ValueError(f"t0/t1: received t0={t0}, t1={t1}, expected finite numbers with t0 <= t1")
        if tol <= 0:
            raise ValueError(f"tol: received {tol}, expected a positive float")
        self.entropy = check_seed(entropy, "entropy")
        self.shape = tuple(int(s) for s in shape)
        self.kernel = check_kernel(kernel)
        self.tol = float(tol)
        self.pool_size = int(pool_size)
        self.ndigits = -int(math.log10(tol))
        self.size = math.prod(self.shape)  # elements per value
        if cache_size is None:  # a byte budget; at least 64 entries, so large latents still reuse the path above a query
            cache_size = max(64, int(cache_bytes) // (4 * max(1, self.size)))
        self.cache_size = int(cache_size)
        self.t0 = t0
        self.t1 = t1
        self.root = _Node(self._round(t0), self._round(t1), None, None)
        self.root.spawn_key = 0
        self.root.depth = 0
        w_seed = _seed_word0(self.entropy, (), self.pool_size)
        self.root_w = randn_many([w_seed], self.shape, self.kernel)[0] * _F32(math.sqrt(t1 - t0))
        self._cache: "OrderedDict[_Node, np.ndarray]" = OrderedDict()
        self._last = self.root
        self.n_randn = 1  # statistics: randn draws made

    # ------------------------------------------------------------------ structure
    def _round(self, x: float) -> float:
        return round(x, self.ndigits)

    def _split_exact(self, node: _Node, midway: float) -> None:
        node.midway = self._round(midway)
        if node.parent is not None:
            node.spawn_key = 2 * node.parent.spawn_key + (0 if node.is_left else 1)
            node.depth = node.parent.depth + 1
        node.w_seed = _seed_word0(self.entropy, (node.spawn_key, node.depth), self.pool_size)
        node.left = _Node(node.start, self._round(midway), node, True)
        node.right = _Node(self._round(midway), node.end, node, False)

    def _split(self, node: _Node, point: float) -> None:
        while True:
            self._split_exact(node, 0.5 * (node.end + node.start))
            if point > node.midway:
                node = node.right
            elif point < node.midway:
                node = node.left
            else:
                return

    def _loc(self, node: _Node, ta: float, tb: float) -> list:
        """torchsde ``_Interval._loc_inner`` without trampolines: the ordered tree intervals
        whose union is [ta, tb] (creating splits as needed)."""
        out = []
        stack = [(node, ta, tb)]
        while stack:
            node, ta, tb = stack.pop()
            while True:
                if ta < node.start or tb > node.end:
                    node = node.parent
                    continue
                if ta == node.start and tb == node.end:
                    out.append(node)
                    break
                if node.midway is None:
                    if ta == node.start:
                        self._split(node, tb)
                        node = node.left
                    else:
                        self._split(node, ta)
                        node = node.right
                    continue
                if tb <= node.midway:
                    node = node.left
                    continue
                if ta >= node.midway:
                    node = node.right
                    continue
                stack.append((node.right, node.midway, tb))
                tb = node.midway
                node = node.left
        return out

    # ------------------------------------------------------------------ values
    def _cached(self, node: _Node) -> Optional[np.ndarray]:
        if node is self.root:
            return self.root_w
        w = self._cache.get(node)
        if w is not None:
            self._cache.move_to_end(node)
        return w

    def _store(self, node: _Node, w: np.ndarray) -> None:
        self._cache[node] = w
        self._cache.move_to_end(node)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _values(self, nodes: list) -> list:
        # All parents whose noise is needed, top-down, without duplicates.
        known = {}
        order = []  # parents to expand, ancestors before descendants
        seen = set()
        for node in nodes:
            chain = []
            cur = node
            while True:
                w = self._cached(cur) if cur not in known else known[cur]
                if w is not None:
                    known[cur] = w
                    break
                chain.append(cur.parent)
                cur = cur.parent
            for p in reversed(chain):
                if p not in seen:
                    seen.add(p)
                    order.append(p)
        if order:
            # compiled: each parent's noise is drawn and used chunk by chunk (never stored)
            fused = self.size >= 16 and jit.has_kernel(self.kernel)
            noises = (None,) * len(order) if fused else randn_many(
                [p.w_seed for p in order], self.shape, self.kernel, max_chunk=1 << 17)
            self.n_randn += len(order)
            compiled = jit.available()
            for p, z in zip(order, noises):
                w = known.get(p)
                if w is None:
                    w = self._cached(p)
                h_rec = 1 / (p.end - p.start)
                l_diff = p.midway - p.start
                r_diff = p.end - p.midway
                var = l_diff * r_diff * h_rec
                if fused:
                    w_left, w_right = jit.brownian_bridge_seeded(p.w_seed, w, l_diff, h_rec, math.sqrt(var),
                                                                  self.kernel)
                elif compiled:
                    w_left, w_right = jit.brownian_bridge(w, z, l_diff, h_rec, math.sqrt(var))
                else:
                    w_left = np.multiply(w, _F32(l_diff))
                    w_left *= _F32(h_rec)
                    z *= _F32(math.sqrt(var))  # z is this call's own row of noise
                    w_left += z
                    w_right = np.subtract(w, w_left)
                known[p.left] = w_left
                known[p.right] = w_right
                self._store(p.left, w_left)
                self._store(p.right, w_right)
        return [known[n] for n in nodes]

    def _query(self, ta: float, tb: float) -> Optional[list]:
        """The values of the tree intervals whose union is [ta, tb], in order (None when ta == tb)."""
        ta = float(ta)
        tb = float(tb)
        start, end = self.root.start, self.root.end
        # Clamp to the root interval as torchsde does (it warns every time; sigma_max as float32
        # is routinely a hair above its 6-digit rounding, so only warn beyond the tolerance).
        for name, v in (("ta", ta), ("tb", tb)):
            if v < start - self.tol or v > end + self.tol:
                warnings.warn(f"BrownianTree: {name}={v} outside [{start}, {end}]; clamped")
        ta = min(max(ta, start), end)
        tb = min(max(tb, start), end)
        if ta > tb:
            raise ValueError(f"ta/tb: received ta={ta}, tb={tb}, expected ta <= tb")
        if ta == tb:
            return None
        intervals = self._loc(self._last, self._round(ta), self._round(tb))
        self._last = intervals[-1]
        return self._values(intervals)

    def __call__(self, ta: float, tb: float) -> np.ndarray:
        return self._sum(self._query(ta, tb))

    def _sum(self, ws: Optional[list]) -> np.ndarray:
        """The intervals' values summed left to right (zeros for an empty query), in a fresh array."""
        if ws is None:
            return np.zeros(self.shape, dtype=_F32)
        w = ws[0].copy()
        for wi in ws[1:]:
            w = w + wi
        return w

    def scaled(self, ta: float, tb: float, negate: bool, divisor) -> np.ndarray:
        """``(-tree(ta, tb) if negate else tree(ta, tb)) / divisor`` (divisor a float32 scalar), the
        same float32 values; with the compiled kernels the intervals are summed, negated and divided
        in one pass instead of one numpy pass per interval."""
        ws = self._query(ta, tb)
        if ws is not None and fused_jit.ready(*ws):
            return fused_jit.brownian_sum(ws, negate, divisor)
        w = self._sum(ws)
        if negate:
            w = -w
        return w / divisor
