"""torch CPU randn / ComfyUI prepare_noise / default noise sampler vs torch (test-only oracle)."""
import os
import pickle
import platform
import subprocess
import sys

import numpy as np
import pytest

from ksampler_rt.runtime import jit
from ksampler_rt.runtime.cpu_capability import cpu_flags
from ksampler_rt.runtime.noise import (NoiseSource, TorchCPUGenerator, default_kernel, kernel_for_capability,
                                       prepare_noise, randn_many)

torch = pytest.importorskip("torch")

SEEDS = [0, 42, 2**32 + 5, 2**64 - 1]
SHAPES = [(1, 4, 64, 64), (2, 4, 8, 8), (1, 4, 3, 5), (3, 5), (1, 17), (1, 4, 128, 128)]
# torch's AVX512 build registers no normal kernel of its own and falls back to the AVX2 one
TORCH_KERNEL = {"AVX2": "avx2", "AVX512": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "default")
AVX2 = TORCH_KERNEL == "avx2"
# an x86 CPU torch can run its AVX2 build on (ATEN_CPU_CAPABILITY=avx2 in a subprocess)
AVX2_CPU = platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= cpu_flags()


def _torch_gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.skipif(not AVX2, reason="in-process torch runs the scalar (DEFAULT) kernel here; the "
                    "subprocess tests below cover the AVX2 kernel")
@pytest.mark.parametrize("seed", SEEDS)
def test_randn_avx2_bit_exact_consecutive(seed):
    g = TorchCPUGenerator(seed, kernel="avx2")
    tg = _torch_gen(seed)
    for shape in SHAPES if seed in (0, 2**64 - 1) else SHAPES[:-1]:
        for _ in range(2):  # consecutive draws on one generator
            ours = g.randn(shape)
            ref = torch.randn(shape, generator=tg).numpy()
            assert ours.dtype == np.float32 and ours.shape == ref.shape
            assert np.array_equal(ours, ref), (seed, shape, int((ours != ref).sum()))


def test_scalar_path_cache_across_calls():
    g = TorchCPUGenerator(7, kernel="avx2")
    tg = _torch_gen(7)
    for shape in [(3,), (1,), (16,), (5,), (2, 3)]:
        assert np.array_equal(g.randn(shape), torch.randn(shape, generator=tg).numpy())
    g.manual_seed(7)
    tg.manual_seed(7)
    assert np.array_equal(g.randn((3,)), torch.randn((3,), generator=tg).numpy())


def test_randn_many_and_state_roundtrip():
    seeds = [1, 2**40 + 3, 99]
    many = randn_many(seeds, (2, 3, 7))
    for s, m in zip(seeds, many):
        assert np.array_equal(m, TorchCPUGenerator(s).randn((2, 3, 7)))
    g = TorchCPUGenerator(5)
    g.randn((3,))  # leaves a cached double normal
    st = pickle.loads(pickle.dumps(g.get_state()))
    a = [g.randn((3,)), g.randn((40,))]
    h = TorchCPUGenerator.from_state(st)
    b = [h.randn((3,)), h.randn((40,))]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    h2 = pickle.loads(pickle.dumps(TorchCPUGenerator.from_state(st)))
    assert np.array_equal(h2.randn((3,)), a[0])


def test_default_kernel_env(monkeypatch):
    monkeypatch.setenv("KSAMPLER_RT_RANDN_KERNEL", "default")
    assert default_kernel() == "default"
    monkeypatch.setenv("KSAMPLER_RT_RANDN_KERNEL", "avx2")
    assert default_kernel() == "avx2"
    monkeypatch.setenv("KSAMPLER_RT_RANDN_KERNEL", "sse9")
    with pytest.raises(ValueError, match="KSAMPLER_RT_RANDN_KERNEL: received 'sse9', expected 'avx2' or 'default'"):
        default_kernel()
    monkeypatch.delenv("KSAMPLER_RT_RANDN_KERNEL")
    for cap, kernel in (("default", "default"), ("avx2", "avx2"), ("avx512", "avx2")):
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", cap)  # torch's own override, honoured as torch does
        assert default_kernel() == kernel == kernel_for_capability(cap)
    with pytest.raises(ValueError, match="capability: received 'sse9', expected one of"):
        kernel_for_capability("sse9")


def test_default_kernel_is_the_one_torch_runs_here():
    """The kernel chosen for this machine gives in-process torch's values bit for bit (whichever
    capability torch picked: AVX2 or AVX-512 CPUs -> avx2, others -> default)."""
    assert default_kernel() == TORCH_KERNEL
    if TORCH_KERNEL == "default" and not jit.has_kernel("default"):
        pytest.skip("the scalar kernel is bit-exact only compiled (numba): " + jit.disable_reason())
    for seed, shape in ((5, (1, 4, 64, 64)), (2**64 - 1, (2, 4, 9, 7))):
        ours = prepare_noise(np.zeros(shape, np.float32), seed)
        ref = torch.randn(shape, generator=torch.manual_seed(seed)).numpy()
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), (seed, shape)


_SUB = r"""
import sys, numpy as np, torch
out = {"cap": np.array(torch.backends.cpu.get_cpu_capability())}
for seed in (0, 42, 2**64 - 1):
    for shape in ((1, 4, 64, 64), (2, 4, 8, 8), (1, 4, 3, 5), (3, 5), (1, 17)):
        g = torch.Generator().manual_seed(seed)
        out[f"{seed}-{shape}"] = np.stack([torch.randn(shape, generator=g).numpy() for _ in range(2)])
# seed 1, word 2753120 is the first u1 word whose low 24 bits are 0: radius -0, and torch's
# fma(r*cos, std, mean) makes the outputs +0
out["1-(172071, 16)"] = torch.randn((172071, 16), generator=torch.Generator().manual_seed(1)).numpy()[None]
np.savez(sys.argv[1], **out)
"""


def _torch_in_subprocess(tmp_path, capability):
    """torch.randn results under ATEN_CPU_CAPABILITY=capability (fixed when torch is imported)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    path = tmp_path / f"randn-{capability}.npz"
    subprocess.run([sys.executable, "-c", _SUB, str(path)], env=env, check=True, timeout=300)
    data = dict(np.load(path))
    return str(data.pop("cap")), data


def _ours(key, kernel):
    seed, shape = key.split("-", 1)
    shape = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    g = TorchCPUGenerator(int(seed), kernel=kernel)
    return np.stack([g.randn(shape) for _ in range(2 if shape[0] != 172071 else 1)])


@pytest.mark.skipif(not AVX2_CPU, reason="torch's AVX2 kernel needs a CPU with AVX2 and FMA")
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
def test_randn_avx2_kernel_vs_torch_subprocess(tmp_path, monkeypatch, compiled):
    cap, data = _torch_in_subprocess(tmp_path, "avx2")
    assert cap == "AVX2"
    if not compiled:
        monkeypatch.setattr(jit, "available", lambda: False)
    elif not jit.available():
        pytest.skip("compiled kernels unavailable: " + jit.disable_reason())
    for key, ref in data.items():
        ours = _ours(key, "avx2")
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), key


def test_randn_default_kernel_vs_torch_subprocess(tmp_path, monkeypatch):
    """The scalar kernel: bit-exact compiled (libm's logf/sincosf); the numpy path computes them in
    float64: about 1.5 % of elements differ, by at most 3 ulp in 3 million measured (4 allowed)."""
    cap, data = _torch_in_subprocess(tmp_path, "default")
    assert cap == "DEFAULT"
    if jit.has_kernel("default"):
        for key, ref in data.items():
            assert np.array_equal(_ours(key, "default").view(np.uint32), ref.view(np.uint32)), key
    monkeypatch.setattr(jit, "available", lambda: False)
    total = same = 0
    for key, ref in data.items():
        ours = _ours(key, "default")
        ulp = np.spacing(np.abs(ref))
        assert np.all(np.abs(ours - ref) <= 4 * ulp), key
        total += ref.size
        same += int((ours.view(np.uint32) == ref.view(np.uint32)).sum())
    assert 0.95 < same / total < 1


def _torch_prepare_noise(shape, seed, noise_inds=None):
    """ComfyUI 0.3.64 comfy.sample.prepare_noise, written from the spec (torch oracle)."""
    generator = torch.manual_seed(seed)
    if noise_inds is None:
        return torch.randn(shape, dtype=torch.float32, generator=generator).numpy()
    unique_inds, inverse = np.unique(noise_inds, return_inverse=True)
    noises = []
    for i in range(unique_inds[-1] + 1):
        noise = torch.randn([1] + list(shape)[1:], dtype=torch.float32, generator=generator)
        if i in unique_inds:
            noises.append(noise)
    return torch.cat([noises[i] for i in inverse], axis=0).numpy()


@pytest.mark.skipif(not AVX2, reason="compares with in-process torch, which runs the scalar kernel here; "
                    "test_randn_avx2_kernel_vs_torch_subprocess covers the AVX2 kernel")
@pytest.mark.parametrize("shape,seed,inds", [
    ((1, 4, 64, 64), 42, None),
    ((3, 4, 8, 8), 2**64 - 1, None),
    ((2, 4, 3, 5), 5, None),
    ((3, 4, 3, 5), 11, [2, 0, 2]),
    ((2, 4, 8, 8), 0, [3, 1]),
    ((1, 4, 8, 8), 123, [0]),
])
def test_prepare_noise_vs_torch(shape, seed, inds):
    ours = prepare_noise(np.zeros(shape, np.float32), seed, inds, kernel="avx2")
    ref = _torch_prepare_noise(shape, seed, inds)
    assert ours.dtype == np.float32
    assert np.array_equal(ours, ref)


def test_prepare_noise_errors():
    z = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"samples: received a 3-D float32 array of shape \(4, 8, 8\), expected a 4-D"):
        prepare_noise(np.zeros((4, 8, 8), np.float32), 1)
    with pytest.raises(TypeError, match="samples: received list, expected a 4-D float numpy array"):
        prepare_noise([[1.0]], 1)
    with pytest.raises(ValueError, match=r"seed: received -1, expected an int in \[0, 2\*\*64-1\]"):
        prepare_noise(z, -1)
    with pytest.raises(ValueError, match="seed: received 18446744073709551616, expected"):
        prepare_noise(z, 2**64)
    with pytest.raises(TypeError, match="seed: received 1.5 of type float, expected an int"):
        prepare_noise(z, 1.5)
    with pytest.raises(ValueError, match="batch_index: received 2 indices for a batch of 1, expected one index"):
        prepare_noise(z, 1, [0, 1])
    with pytest.raises(ValueError, match=r"batch_index: received \[-1\], expected None or a non-empty list"):
        prepare_noise(z, 1, [-1])
    with pytest.raises(ValueError, match="kernel: received 'sse', expected 'avx2', 'default' or None"):
        TorchCPUGenerator(1, kernel="sse")
    with pytest.raises(ValueError, match="lookahead: received 0, expected an int >= 1"):
        NoiseSource(1, lookahead=0)
    with pytest.raises(ValueError, match=r"sigmas: received shape \(2, 2\), expected a 1-D list"):
        NoiseSource(1, sigmas=np.ones((2, 2)))


def test_default_noise_sampler_semantics():
    if TORCH_KERNEL == "default" and not jit.has_kernel("default"):
        pytest.skip("in-process torch runs the scalar kernel, bit-exact only compiled: " + jit.disable_reason())
    x = np.zeros((1, 4, 8, 8), np.float32)
    src = NoiseSource(77, kernel=TORCH_KERNEL)
    ns = src.default(x)
    tg = torch.Generator().manual_seed(77)
    for _ in range(3):
        assert np.array_equal(ns(1.0, 0.5), torch.randn(x.shape, generator=tg).numpy())
    # a new default() restarts from the seed: first ancestral noise == initial noise
    assert np.array_equal(src.default(x)(1.0, 0.5), prepare_noise(x, 77, kernel=TORCH_KERNEL))


def test_runtime_modules_do_not_import_torch():
    code = ("import sys, ksampler_rt.runtime.noise, ksampler_rt.runtime.brownian, ksampler_rt.runtime.jit;"
            "print(any(m == 'torch' or m.startswith('torch.') or m.startswith('torchsde') "
            "for m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def _fast_vs_reference(ks):
    """The fast AVX2 kernel against the reference float32 emulation, for 24-bit words ks."""
    from ksampler_rt.runtime import randn_numpy as F
    from ksampler_rt.runtime import randn_reference as R

    h = ks.size
    ws = F.workspace(h)
    r = np.empty(h, np.float32)
    s = np.empty(h, np.float32)
    c = np.empty(h, np.float32)
    F.radius_avx2(ks, ws, h, r)
    F.sincos_avx2(ks, ws, h, s, c)
    u = ks.astype(np.float32) * np.float32(2.0**-24)
    r_ref = np.sqrt(np.float32(-2.0) * R.log256_ps(np.float32(1.0) - u))
    s_ref, c_ref = R.sincos256_ps(R.TWO_PI_F32 * u)
    bad = [int(np.count_nonzero(a.view(np.uint32) != b.view(np.uint32)))
           for a, b in ((r, r_ref), (s, s_ref), (c, c_ref))]
    return bad


def test_fast_kernel_exhaustive():
    """u1/u2 are 24-bit uniforms, so the fast kernel can be checked on its whole input domain.

    By default every 67th word plus the domain edges (~250k values); set
    KSAMPLER_RT_EXHAUSTIVE=1 for all 2**24 (about 10 s)."""
    full = os.environ.get("KSAMPLER_RT_EXHAUSTIVE") == "1"
    step = 1 if full else 67
    edges = np.array([0, 1, 2, 3, 2**23 - 1, 2**23, 2**23 + 1, 2**24 - 2, 2**24 - 1], np.uint32)
    assert _fast_vs_reference(edges) == [0, 0, 0]
    chunk = 1 << 20
    for c0 in range(0, 1 << 24, chunk * step):
        ks = np.arange(c0, min(1 << 24, c0 + chunk * step), step, dtype=np.uint32)
        assert _fast_vs_reference(ks) == [0, 0, 0], c0


# ---------------------------------------------------------------------------------------------
# default-noise prefetch (background thread drawing the default_noise_sampler stream ahead)
# ---------------------------------------------------------------------------------------------
import gc  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from ksampler_rt.runtime.noise import DefaultNoiseSampler  # noqa: E402

_PF_THREAD = "ksrt-noise-prefetch"


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == _PF_THREAD and t.is_alive()]


def _wait_gone(thread, timeout=10.0):
    thread.join(timeout)
    return not thread.is_alive()


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (1, 4, 3, 5), (1, 3), (1, 4, 64, 64)])
@pytest.mark.parametrize("lookahead", [1, 3])
def test_default_prefetch_stream_bit_identical(shape, lookahead):
    x = np.zeros(shape, np.float32)
    ref = NoiseSource(123, prefetch=False).default(x)
    src = NoiseSource(123, prefetch=True, lookahead=lookahead)
    pre = src.default(x)
    assert pre.prefetching and not ref.prefetching
    for i in range(7):
        if i % 3 == 1:
            time.sleep(0.01)  # let the thread run ahead
        assert np.array_equal(pre(1.0, 0.5), ref(1.0, 0.5)), i
    assert pre.hits == 7 and pre.misses == 0
    src.close()
    assert not pre._thread.is_alive()
    # after close the sampler keeps going synchronously, from the right position
    for _ in range(2):
        assert np.array_equal(pre(), ref())


def test_default_prefetch_other_shape_and_state_rewind():
    x = np.zeros((1, 4, 8, 8), np.float32)
    sync = TorchCPUGenerator(9)
    pre = NoiseSource(9, prefetch=True, lookahead=3).default(x)
    assert np.array_equal(pre(), sync.randn(x.shape))
    time.sleep(0.05)  # the thread is now 3 draws ahead of the consumer
    st = pre.get_state()
    assert st["mt_pos"] == sync.get_state()["mt_pos"]
    assert np.array_equal(st["mt_key"], sync.get_state()["mt_key"])
    # a different shape stops the prefetch, rewinds, and continues synchronously
    t = pre._thread
    for shape in [(2, 3, 5), (3,), x.shape]:
        assert np.array_equal(pre.randn(shape), sync.randn(shape)), shape
    assert not t.is_alive() and not pre.prefetching
    assert np.array_equal(pre(), sync.randn(x.shape))


def test_default_prefetch_threads_end_after_close_and_gc():
    x = np.zeros((1, 4, 16, 16), np.float32)
    before = len(_prefetch_threads())
    src = NoiseSource(5, prefetch=True)
    samplers = [src.default(x) for _ in range(3)]
    samplers[0]()
    threads = [s._thread for s in samplers]
    assert all(t.is_alive() for t in threads)
    src.close()
    assert not any(t.is_alive() for t in threads)
    src.close()  # idempotent
    # a dropped sampler (e.g. dpm_fast's unused one) stops its thread when collected
    ns = NoiseSource(5, prefetch=True).default(x)
    t = ns._thread
    del ns
    gc.collect()
    assert _wait_gone(t)
    with NoiseSource(6, prefetch=True) as src2:
        t2 = src2.default(x)._thread
    assert not t2.is_alive()
    assert len(_prefetch_threads()) <= before


def test_default_prefetch_env_switch(monkeypatch):
    x = np.zeros((1, 4, 8, 8), np.float32)
    monkeypatch.setenv("KSAMPLER_RT_NOISE_PREFETCH", "0")
    ns = NoiseSource(1).default(x)
    assert not ns.prefetching and ns._thread is None
    assert NoiseSource(1, prefetch=True).default(x).prefetching  # the argument wins
    monkeypatch.setenv("KSAMPLER_RT_NOISE_PREFETCH", "1")
    src = NoiseSource(1)
    assert src.default(x).prefetching
    src.close()
    assert not NoiseSource(1, prefetch=False).default(x).prefetching


def test_default_prefetch_worker_error_falls_back(monkeypatch):
    """A failure in the thread is raised again by the synchronous fallback, at the right draw."""
    x = np.zeros((1, 4, 8, 8), np.float32)
    gen = TorchCPUGenerator(3)
    calls = {"n": 0}
    orig = TorchCPUGenerator.randn

    def flaky(self, shape):
        calls["n"] += 1
        if calls["n"] == 2 and threading.current_thread().name == _PF_THREAD:
            raise MemoryError("boom")
        return orig(self, shape)

    monkeypatch.setattr(TorchCPUGenerator, "randn", flaky)
    ns = DefaultNoiseSampler(gen, x.shape, prefetch=True, lookahead=2)
    sync = TorchCPUGenerator(3)
    for _ in range(4):  # draw 2 fails in the thread, is redone synchronously
        assert np.array_equal(ns(), orig(sync, x.shape))
    assert not ns.prefetching


class _SleepyModel:
    """Denoiser stand-in whose call releases the GIL (so the prefetch threads run ahead)."""

    def __init__(self, sleep=0.0):
        from ksampler_rt.runtime.model_sampling import ModelSamplingDiscrete

        self.model_sampling = ModelSamplingDiscrete()
        self._sleep = sleep

    def __call__(self, x, sigma):
        if self._sleep:
            time.sleep(self._sleep)
        return (x * np.float32(0.5) / (np.float32(1) + np.float32(sigma))).astype(np.float32)

    def with_uncond(self, x, sigma):
        d = self(x, sigma)
        return d, (d * np.float32(0.9)).astype(np.float32)


def _all_samplers():
    from ksampler_rt.runtime.samplers import SAMPLER_NAMES, SAMPLERS

    return [n for n in SAMPLER_NAMES if n in SAMPLERS]


@pytest.mark.parametrize("name", _all_samplers())
def test_samplers_bit_identical_with_noise_prefetch(name):
    from ksampler_rt.runtime.samplers import SAMPLERS

    x = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32) * 14
    sig = np.array([14.6146, 7.1, 3.2, 1.4, 0.6, 0.21, 0.0292, 0.0], np.float32)
    fn = SAMPLERS[name].fn
    with NoiseSource(11, prefetch=False) as off:
        ref = fn(_SleepyModel(), x.copy(), sig, off)
    with NoiseSource(11, sigmas=sig, prefetch=True) as on:
        out = fn(_SleepyModel(0.002), x.copy(), sig, on)
        threads = [s._thread for s in (on.last_default, on.last_brownian) if s is not None and s._thread]
    assert np.array_equal(out, ref)
    assert not any(t.is_alive() for t in threads)


def test_ksampler_runs_leave_no_prefetch_threads(monkeypatch, analytic_unet_cls):
    """_run_sampler closes the NoiseSource; results do not depend on the prefetch switch."""
    from ksampler_rt.runtime import Model, ksampler

    model = Model(analytic_unet_cls(), "sd15")
    pos = [[np.full((1, 4, 8), 0.5, np.float32), {}]]
    neg = [[np.full((1, 4, 8), -0.5, np.float32), {}]]
    latent = {"samples": np.zeros((1, 4, 8, 8), np.float32)}
    before = len(_prefetch_threads())
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("KSAMPLER_RT_NOISE_PREFETCH", flag)
        monkeypatch.setenv("KSAMPLER_RT_BROWNIAN_PREFETCH", flag)
        outs[flag] = [ksampler(model, 42, 5, 6.0, s, "normal", pos, neg, latent)["samples"]
                      for s in ("euler_ancestral", "dpmpp_2s_ancestral", "er_sde", "dpmpp_sde")]
        assert len(_prefetch_threads()) <= before
    for a, b in zip(outs["1"], outs["0"]):
        assert np.array_equal(a, b)
