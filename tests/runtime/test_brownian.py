"""numpy BrownianTree / NoiseSource.brownian vs torchsde 0.2.6 (test-only oracle)."""
import time
import warnings

import numpy as np
import pytest

from ksampler_rt.runtime.brownian import BrownianTree
from ksampler_rt.runtime.noise import NoiseSource

torch = pytest.importorskip("torch")
torchsde = pytest.importorskip("torchsde")

from ksampler_rt.runtime import jit  # noqa: E402

# the Box-Muller kernel in-process torch runs (its AVX512 build falls back to the AVX2 kernel)
TORCH_KERNEL = {"AVX2": "avx2", "AVX512": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "default")
pytestmark = pytest.mark.skipif(
    TORCH_KERNEL == "default" and not jit.has_kernel("default"),
    reason="torchsde draws with in-process torch's scalar (DEFAULT) randn kernel, which is bit-exact here only "
           "compiled (numba); test_noise.py's subprocess tests cover both kernels")


def karras(n, smin=0.0291675, smax=14.614642, rho=7.0):
    ramp = np.linspace(0, 1, n)
    mi, ma = smin ** (1 / rho), smax ** (1 / rho)
    return np.append((ma + ramp * (mi - ma)) ** rho, 0.0).astype(np.float32)


class OracleBrownianTreeNoiseSampler:
    """ComfyUI 0.3.64 BrownianTreeNoiseSampler(x, smin, smax, seed, cpu=True), written from
    comfy/k_diffusion/sampling.py (BatchedBrownianTree with one int seed)."""

    def __init__(self, x, sigma_min, sigma_max, seed):
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        t0, t1, self.sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w0 = torch.zeros_like(x)
        self.tree = torchsde.BrownianTree(t0.cpu(), w0, t1.cpu(), entropy=seed)

    def __call__(self, sigma, sigma_next):
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        a, b, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w = self.tree(a.cpu().float(), b.cpu().float()) * (self.sign * sign)
        return w / (t1 - t0).abs().sqrt()


def _queries_2m(sig):
    return [(sig[i], sig[i + 1]) for i in range(len(sig) - 1) if sig[i + 1] > 0]


def _queries_sde(sig):
    """dpmpp_sde (EPS model): (sigma_i, sigma_s_1) then (sigma_i, sigma_{i+1})."""
    out = []
    s = torch.from_numpy(sig)
    for i in range(len(s) - 1):
        if s[i + 1] == 0:
            continue
        lam_s, lam_t = s[i].log().neg(), s[i + 1].log().neg()
        h = lam_t - lam_s
        sigma_s_1 = (lam_s + 0.5 * h).neg().exp()
        out += [(s[i], sigma_s_1), (s[i], s[i + 1])]
    return out


@pytest.mark.parametrize("seed,shape,steps,pattern", [
    (42, (1, 4, 16, 16), 5, "2m"),
    (2**64 - 1, (1, 4, 16, 16), 20, "2m"),
    (0, (2, 4, 8, 8), 50, "2m"),
    (123456789, (1, 4, 3, 5), 20, "sde"),
    (7, (1, 4, 64, 64), 8, "sde"),
])
def test_noise_sampler_matches_comfy_torchsde(seed, shape, steps, pattern):
    sig = karras(steps)
    x = np.zeros(shape, np.float32)
    pos = sig[sig > 0]
    smin, smax = torch.from_numpy(pos).min(), torch.from_numpy(sig).max()
    oracle = OracleBrownianTreeNoiseSampler(torch.zeros(shape), smin, smax, seed)
    src = NoiseSource(seed, kernel=TORCH_KERNEL)
    ours = src.brownian(x, smin.item(), smax.item())
    qs = _queries_2m(torch.from_numpy(sig)) if pattern == "2m" else _queries_sde(sig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a, b in qs:
            ref = oracle(a, b).numpy()
            got = ours(np.float32(a), np.float32(b))
            assert got.dtype == np.float32 and got.shape == shape
            # The Brownian increments themselves are bit-exact ...
            lo, hi = sorted((a, b))
            w_ref = oracle.tree(lo, hi).numpy()
            assert np.array_equal(src.tree(float(lo), float(hi)), w_ref), (float(a), float(b))
            # ... the final 1/sqrt(|dsigma|) scaling can differ by an ulp: torch's float32 sqrt
            # on this build (MKL VML) is not correctly rounded (~18 % of inputs), numpy's is.
            assert np.all(np.abs(got - ref) <= 2 * np.spacing(np.abs(ref))), (float(a), float(b))


def test_tree_increments_and_order_independence():
    shape = (1, 4, 4, 4)
    t0, t1 = 0.0291675, 14.614642
    pts = [14.614642, 9.5, 3.25, 1.0, 0.5, 0.1, 0.0291675]
    oracle = torchsde.BrownianTree(torch.tensor(t0), torch.zeros(shape), torch.tensor(t1), entropy=99)
    a = BrownianTree(t0, t1, shape, 99)
    b = BrownianTree(t0, t1, shape, 99, cache_size=2)
    qs = [(pts[i + 1], pts[i]) for i in range(len(pts) - 1)] + [(0.1, 9.5), (0.0291675, 14.614642)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = [oracle(lo, hi).numpy() for lo, hi in qs]
    got_a = [a(lo, hi) for lo, hi in qs]
    got_b = [b(lo, hi) for lo, hi in reversed(qs)][::-1]
    for w, ga, gb in zip(want, got_a, got_b):
        assert np.array_equal(ga, w)
        assert np.array_equal(gb, w)
    assert np.array_equal(a(1.0, 1.0), np.zeros(shape, np.float32))


def test_tree_statistics():
    tree = BrownianTree(0.0, 4.0, (200_000,), 3)
    w = tree(1.0, 3.0)
    assert abs(w.mean()) < 0.02 and abs(w.var() - 2.0) < 0.03


def test_tree_errors():
    with pytest.raises(ValueError, match="t0/t1: received t0=2.0, t1=1.0, expected finite numbers with t0 <= t1"):
        BrownianTree(2.0, 1.0, (2,), 1)
    with pytest.raises(ValueError, match=r"entropy: received -3, expected an int"):
        BrownianTree(0.0, 1.0, (2,), -3)
    tree = BrownianTree(0.0, 1.0, (2,), 1)
    with pytest.raises(ValueError, match="ta/tb: received ta=0.7, tb=0.2, expected ta <= tb"):
        tree(0.7, 0.2)
    with pytest.raises(ValueError, match=r"seed: received -1, expected"):
        NoiseSource(-1)


@pytest.mark.parametrize("compiled", [True, False])
def test_seed_word0_matches_numpy_seedsequence(compiled, monkeypatch):
    from ksampler_rt.runtime.brownian import _seed_word0

    if compiled and not jit.available():
        pytest.skip(jit.disable_reason())
    if not compiled:
        monkeypatch.setattr(jit, "available", lambda: False)
    rng = np.random.default_rng(0)
    for i in range(300):
        e = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        if i % 5 == 0:
            e >>= int(rng.integers(0, 64))  # 0, 1 or 2 entropy words
        key = (int(rng.integers(0, 2**40)), int(rng.integers(0, 60)))
        ss = np.random.SeedSequence(entropy=e, spawn_key=key, pool_size=24)
        assert _seed_word0(e, key, 24) == int(ss.generate_state(4)[0])
        ss = np.random.SeedSequence(entropy=e, pool_size=24)
        assert _seed_word0(e, (), 24) == int(ss.generate_state(3)[0])


class _ZeroCostModel:
    """Denoiser stand-in: a fixed x0 prediction (enough to drive the SDE samplers)."""

    def __init__(self, x, sleep=0.0):
        from ksampler_rt.runtime.model_sampling import ModelSamplingDiscrete

        self.model_sampling = ModelSamplingDiscrete()
        self._d = (x * np.float32(0.5)).astype(np.float32)
        self._sleep = sleep

    def __call__(self, x, sigma):
        if self._sleep:
            time.sleep(self._sleep)  # like an engine call that releases the GIL
        return self._d

    def with_uncond(self, x, sigma):
        return self._d, self._d


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_sde", "dpmpp_3m_sde", "dpmpp_2m_sde_heun"])
def test_brownian_prefetch_bit_identical(name):
    from ksampler_rt.runtime.samplers import SAMPLERS

    if name not in SAMPLERS:
        pytest.skip(f"{name} not registered yet")
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32) * 14
    sig = np.array([14.6146, 7.1, 3.2, 1.4, 0.6, 0.21, 0.0292, 0.0], np.float32)
    ref = SAMPLERS[name].fn(_ZeroCostModel(x), x.copy(), sig, NoiseSource(5, prefetch=False))
    src = NoiseSource(5, sigmas=sig, prefetch=True, lookahead=1)
    out = SAMPLERS[name].fn(_ZeroCostModel(x, sleep=0.05), x.copy(), sig, src)
    assert np.array_equal(out, ref)
    ns = src.last_brownian
    assert ns.hits >= 5, (ns.hits, ns.misses)
    ns.close()


def test_brownian_prefetch_unexpected_and_skipped_queries():
    shape = (1, 2, 4, 4)
    x = np.zeros(shape, np.float32)
    sig = np.array([10.0, 5.0, 2.0, 1.0, 0.5, 0.1], np.float32)
    plain = NoiseSource(3, prefetch=False).brownian(x, 0.1, 10.0)
    pre = NoiseSource(3, sigmas=sig, prefetch=True).brownian(x, 0.1, 10.0)
    calls = [(10.0, 5.0), (5.0, 3.3), (2.0, 1.0), (2.0, 1.0), (0.5, 0.1), (5.0, 2.0)]

    def ready(i):  # the worker's pace depends on machine load: wait for planned item i (no timing in asserts)
        la = pre._la
        deadline = time.monotonic() + 30
        while i not in la._ready and not la._stopped and time.monotonic() < deadline:
            time.sleep(0.001)

    for k, (a, b) in enumerate(calls):  # a mid-point query, a skipped pair, a repeat, a late revisit
        if k in (0, 2):  # planned items 0 and 2 (the worker runs at most 2 ahead of the consumer)
            ready(k)
        assert np.array_equal(pre(a, b), plain(a, b))
    assert pre.hits >= 2
    pre.close()
