"""The optional numba kernels (runtime/jit.py, runtime/cfg_jit.py) against torch, libm and the numpy paths."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from ksampler_rt.runtime import cfg_jit, jit
from ksampler_rt.runtime import randn_numpy as F
from ksampler_rt.runtime import randn_reference as R
from ksampler_rt.runtime.noise import TorchCPUGenerator, prepare_noise, randn_many

pytest.importorskip("numba")
torch = pytest.importorskip("torch")

# in-process torch runs the AVX2 kernel on AVX2 and AVX-512 CPUs (its AVX512 build has none of its own)
AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
NOT_AVX2 = "in-process torch runs the scalar kernel here; test_noise.py's subprocess tests cover the AVX2 kernel"


def test_available_with_numba():
    assert jit.available(), jit.disable_reason()
    assert jit.disable_reason() == ""


@pytest.fixture
def numpy_only(monkeypatch):
    """The numpy path of the noise stack (kernels reported unavailable)."""
    monkeypatch.setattr(jit, "available", lambda: False)
    return monkeypatch


@pytest.mark.skipif(not AVX2, reason=NOT_AVX2)
@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**64 - 1])
def test_jit_randn_bit_exact_vs_torch(seed):
    """Consecutive draws of every size class on one generator, scalar (< 16) draws in between:
    crosses mt19937 twists, the n % 16 tail rule and the cached double normal."""
    g = TorchCPUGenerator(seed, kernel="avx2")
    tg = torch.Generator().manual_seed(seed)
    for shape in [(16,), (17,), (3,), (1, 4, 64, 64), (5,), (1, 4, 3, 5), (2, 4, 9, 7), (1, 4, 128, 128),
                  (31,), (624,), (1000,)]:
        ours = g.randn(shape)
        ref = torch.randn(shape, generator=tg).numpy()
        assert ours.shape == ref.shape and ours.dtype == np.float32
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), shape


@pytest.mark.skipif(not AVX2, reason=NOT_AVX2)
def test_jit_randn_many_vs_torch():
    seeds = [3, 2**40 + 1, 2**64 - 1, 11]
    for shape in [(2, 3, 7), (4, 64), (1, 4, 16, 16)]:
        many = randn_many(seeds, shape, kernel="avx2", workers=2, max_chunk=64)
        for s, m in zip(seeds, many):
            ref = torch.randn(shape, generator=torch.Generator().manual_seed(s)).numpy()
            assert np.array_equal(m, ref), (s, shape)


def test_jit_and_numpy_paths_identical(monkeypatch):
    """Same values and the same generator state (mixing both paths on one stream)."""
    seeds = [1, 99, 2**33 + 2]
    shapes = [(1, 4, 24, 24), (37,), (2, 5, 16), (4,)]
    jit_vals = [TorchCPUGenerator(s, kernel="avx2").randn(sh) for s in seeds for sh in shapes]
    jit_many = randn_many(seeds, (3, 40), kernel="avx2")
    g = TorchCPUGenerator(5, kernel="avx2")
    g.randn((100,))
    jit_state = g.get_state()
    jit_next = g.randn((50,))
    monkeypatch.setattr(jit, "available", lambda: False)
    np_vals = [TorchCPUGenerator(s, kernel="avx2").randn(sh) for s in seeds for sh in shapes]
    assert all(np.array_equal(a, b) for a, b in zip(jit_vals, np_vals))
    assert np.array_equal(jit_many, randn_many(seeds, (3, 40), kernel="avx2"))
    h = TorchCPUGenerator(5, kernel="avx2")
    h.randn((100,))
    st = h.get_state()
    assert np.array_equal(st["mt_key"], jit_state["mt_key"]) and st["mt_pos"] == jit_state["mt_pos"]
    assert np.array_equal(h.randn((50,)), jit_next)
    monkeypatch.undo()
    # a state saved on the numpy path continues on the compiled one
    resumed = TorchCPUGenerator.from_state(pickle.loads(pickle.dumps(st)))
    assert np.array_equal(resumed.randn((50,)), jit_next)


@pytest.mark.skipif(not AVX2, reason=NOT_AVX2)
def test_numpy_path_still_bit_exact(numpy_only):
    for seed in (0, 2**64 - 1):
        tg = torch.Generator().manual_seed(seed)
        g = TorchCPUGenerator(seed, kernel="avx2")
        for shape in [(1, 4, 32, 32), (1, 4, 3, 5)]:
            assert np.array_equal(g.randn(shape), torch.randn(shape, generator=tg).numpy())
    lat = np.zeros((2, 4, 8, 8), np.float32)
    ref = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(42)).numpy()
    assert np.array_equal(prepare_noise(lat, 42, kernel="avx2"), ref)


def test_box_muller_kernel_exhaustive():
    """u1 and u2 are 24-bit uniforms: the compiled Box-Muller equals the numpy kernel (itself
    checked against the float64 reference and torch in test_noise.py) on every possible input."""
    jit.available()
    k = np.arange(2**24, dtype=np.uint32)
    rev = k[::-1].copy()
    chunk = jit._BLOCKS * 8
    for c0 in range(0, 2**24, 1 << 21):
        words = np.empty((1 << 18, 2, 8), np.uint32)
        words[:, 0, :] = k[c0:c0 + (1 << 21)].reshape(-1, 8)
        words[:, 1, :] = rev[c0:c0 + (1 << 21)].reshape(-1, 8)
        flat = words.reshape(-1)
        want = np.empty(flat.size, np.float32)
        F.fill_blocks_avx2(flat.reshape(-1, 16), want.reshape(-1, 16))
        got = np.empty(flat.size, np.float32)
        for w0 in range(0, flat.size, chunk * 2):
            jit._fill_words(flat[w0:w0 + chunk * 2], got[w0:w0 + chunk * 2])
        bad = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
        assert bad.size == 0, (c0, bad[:5])


def test_scalar_kernel_calls_libm():
    """The compiled DEFAULT kernel calls libm's logf and sincosf (no vector-library or LLVM-own
    versions) and gives libm's values, called one by one through ctypes, on random words."""
    assert jit.has_kernel("default"), jit.disable_reason()
    lib = R.libm()
    assert lib is not None
    import numba

    fill = jit._K["fill_blocks_default"]
    fresh = numba.njit(nogil=True, boundscheck=False)(fill.py_func)  # numba cannot inspect cached code
    fresh.compile(fill.signatures[0])
    asm = fresh.inspect_asm(fresh.signatures[0])
    assert "logf" in asm and ("sincosf" in asm or ("sinf" in asm and "cosf" in asm)), "libm calls not found"
    assert "svml" not in asm.lower()
    words = np.random.default_rng(5).integers(0, 2**32, size=16 * 1024, dtype=np.uint64).astype(np.uint32)
    got = np.empty(words.size, np.float32)
    jit._fill_words(words, got, scalar=True)
    blocks = R.u32_to_uniform(words).reshape(-1, 2, 8)
    c, s = R.box_muller_libm(np.float32(1) - blocks[:, 0], blocks[:, 1].copy(), lib)
    want = np.stack([c, s], axis=1).reshape(-1)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_scalar_kernel_paths_agree_within_ulps(numpy_only):
    """The numpy scalar kernel (float64 maths) stays within 4 ulp of the compiled (libm) one."""
    g = TorchCPUGenerator(11, kernel="default")
    st = g.get_state()
    approx = g.randn((1, 4, 64, 64))
    numpy_only.undo()
    exact = TorchCPUGenerator.from_state(st).randn((1, 4, 64, 64))
    assert np.all(np.abs(approx - exact) <= 4 * np.spacing(np.abs(exact)))
    assert 0 < np.count_nonzero(approx != exact) < 0.05 * exact.size


@pytest.mark.parametrize("nb", [1, 3, 256])
def test_box_muller_blocks_any_words_and_alignment(nb):
    """Full 32-bit words (the kernel keeps the low 24 bits), input and output at 8-byte-aligned and
    unaligned offsets (the 64-bit copy path and the word-by-word one): same floats as the numpy
    kernel, nothing written outside out[o0:o0 + 16 nb]."""
    assert jit.available(), jit.disable_reason()
    fill = jit._K["fill_blocks"]
    rng = np.random.default_rng(nb)
    scratch = (np.empty(nb * 8, np.int32), np.empty(nb * 8, np.int32), np.empty(nb * 8, np.float32),
               np.empty(nb * 8, np.float32), np.empty(nb * 8, np.float32))
    for w0 in (0, 1):
        for o0 in (0, 1, 3):
            words = rng.integers(0, 2**32, size=nb * 16 + w0, dtype=np.uint64).astype(np.uint32)
            out = np.full(nb * 16 + o0 + 5, 7.0, np.float32)
            fill(words, w0, nb, out, o0, *scratch)
            want = np.empty(nb * 16, np.float32)
            F.fill_blocks_avx2(words[w0:].reshape(-1, 16), want.reshape(-1, 16))
            assert np.array_equal(out[o0:o0 + nb * 16].view(np.uint32), want.view(np.uint32)), (w0, o0)
            assert (out[:o0] == 7).all() and (out[o0 + nb * 16:] == 7).all()


def test_out_argument_checked():
    bg = np.random.MT19937(0)
    with pytest.raises(ValueError, match="out: received"):
        jit.randn_from_bitgen(bg, 32, np.empty(31, np.float32))
    with pytest.raises(ValueError, match="out: received"):
        jit.randn_seeds([1, 2], 32, np.empty((2, 64), np.float32)[:, ::2])


def test_env_switch_off_keeps_numba_unimported():
    code = ("import sys, numpy as np; from ksampler_rt.runtime import jit, prepare_noise; "
            "prepare_noise(np.zeros((1, 4, 8, 8), np.float32), 1); "
            "print(jit.available(), 'numba' in sys.modules, jit.disable_reason())")
    env = dict(os.environ, KSAMPLER_RT_JIT="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "KSAMPLER_RT_JIT=0"]


# ---------------------------------------------------------------------------------------------
# the compiled CFG head (runtime/cfg.py) against the numpy path
# ---------------------------------------------------------------------------------------------
from ksampler_rt.runtime import Model, ksampler
from ksampler_rt.runtime.cfg import CFGDenoiser
from ksampler_rt.runtime.model import UNetOutputError


def _conditioning(value, tokens=77, width=768):
    rng = np.random.default_rng(int(value * 10) + 30)
    return [[rng.standard_normal((1, tokens, width)).astype(np.float32), {}]]


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "uni_pc",
                                  "dpmpp_2m_cfg_pp", "lms", "ipndm"])
def test_ksampler_compiled_and_numpy_paths_identical(name, analytic_unet_cls, monkeypatch):
    model = Model(analytic_unet_cls(), "sd15")
    latent = {"samples": np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)}
    args = (model, 7, 6, 7.5, name, "karras", _conditioning(1.0), _conditioning(-1.0), latent)
    fused_calls = []
    real = cfg_jit.cfg_eps
    monkeypatch.setattr(cfg_jit, "cfg_eps", lambda *a, **k: fused_calls.append(1) or real(*a, **k))
    compiled = ksampler(*args, denoise=0.9)["samples"]
    assert fused_calls, "the compiled CFG head was not used"
    monkeypatch.setattr(jit, "available", lambda: False)
    reference = ksampler(*args, denoise=0.9)["samples"]
    assert np.array_equal(compiled, reference)


def test_compiled_head_uncond_order_and_errors(analytic_unet_cls):
    model = Model(analytic_unet_cls(), "sd15")
    x = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    sigma = np.float32(3.25)
    d = CFGDenoiser(model, _conditioning(1.0), _conditioning(-1.0), 6.0, 1, (8, 8))
    assert d._fusable
    guided, uncond = d.with_uncond(x, sigma)
    preds = d._predictions(x, sigma)  # the numpy path's per-kind denoised values
    assert np.array_equal(uncond, preds[1])
    assert np.array_equal(guided, preds[1] + (preds[0] - preds[1]) * np.float32(6.0))
    # a plain call (what every sampler but the CFG++ ones makes) takes the head that stores no uncond
    assert np.array_equal(d(x, sigma), guided)
    bad = Model(lambda x, t, c, **k: np.where(np.arange(x.size).reshape(x.shape) == 5, np.inf, 0).astype(np.float32),
                "sd15")
    sigmas = np.array([14.6, 7.0, 0.0], np.float32)
    d = CFGDenoiser(bad, _conditioning(1.0), _conditioning(-1.0), 5.0, 1, (8, 8), sigmas=sigmas)
    with pytest.raises(UNetOutputError, match=r"step 2 of 2 \(sigma=7\): the UNet returned 1 non-finite"):
        d(x, sigmas[1])
    with pytest.raises(UNetOutputError, match=r"step 2 of 2 \(sigma=7\): the UNet returned 1 non-finite"):
        d.with_uncond(x, sigmas[1])


def test_self_check_failure_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(jit, "_state", {"checked": False, "ok": False, "why": "", "scalar": False})
    monkeypatch.setattr(jit, "_self_check", lambda: jit._expect(False, "Box-Muller kernel"))
    with pytest.warns(RuntimeWarning, match="self-check failed: Box-Muller kernel"):
        assert not jit.available()
    assert jit.disable_reason() == "self-check failed: Box-Muller kernel"
    # the numpy path still gives torch's values
    g = TorchCPUGenerator(3, kernel="avx2")
    assert np.array_equal(g.randn((40,)), torch.randn((40,), generator=torch.Generator().manual_seed(3)).numpy()) \
        or not AVX2


def test_compiled_head_equals_numpy_path_over_many_sigmas(analytic_unet_cls, monkeypatch):
    """One sigma as a scalar (compiled head) or as rows of a batch (numpy path) gives the same c_in:
    a sweep over the whole sigma range, 1-ulp differences of a scalar power included."""
    model = Model(analytic_unet_cls(), "sd15")
    x = np.random.default_rng(4).standard_normal((2, 4, 2, 2)).astype(np.float32)
    d = CFGDenoiser(model, _conditioning(1.0, tokens=4, width=8), _conditioning(-1.0, tokens=4, width=8), 6.5, 2,
                    (2, 2))
    sigmas = np.geomspace(0.0292, 14.61, 3000).astype(np.float32)
    compiled = [d.with_uncond(x, s) for s in sigmas]
    monkeypatch.setattr(jit, "available", lambda: False)
    for s, (g, u) in zip(sigmas, compiled):
        gn, un = d.with_uncond(x, s)
        assert np.array_equal(g, gn) and np.array_equal(u, un), s


def test_subclass_overriding_apply_model_keeps_its_override(analytic_unet_cls):
    class Scaled(Model):
        def apply_model(self, x, sigma, context, **kwargs):
            return super().apply_model(x, sigma, context, **kwargs) * np.float32(0.5)

    d = CFGDenoiser(Scaled(analytic_unet_cls(), "sd15"), _conditioning(1.0), _conditioning(-1.0), 6.0, 1, (8, 8))
    assert not d._fusable
    x = np.ones((1, 4, 8, 8), np.float32)
    plain = CFGDenoiser(Model(analytic_unet_cls(), "sd15"), _conditioning(1.0), _conditioning(-1.0), 6.0, 1, (8, 8))
    assert np.array_equal(d(x, np.float32(2.0)), plain(x, np.float32(2.0)) * np.float32(0.5))


def test_small_draws_refused_by_the_kernels():
    with pytest.raises(ValueError, match="n: received 15, expected >= 16"):
        jit.randn_from_bitgen(np.random.MT19937(0), 15, np.empty(15, np.float32))
    with pytest.raises(ValueError, match="n: received 3"):
        jit.randn_seeds([1], 3, np.empty((1, 3), np.float32))


def test_compile_error_falls_back_with_a_warning(monkeypatch):
    def broken():
        raise RuntimeError("LLVM ERROR: simulated")

    monkeypatch.setattr(jit, "_state", {"checked": False, "ok": False, "why": "", "scalar": False})
    monkeypatch.setattr(jit, "_self_check", broken)
    with pytest.warns(RuntimeWarning, match="numba compilation failed: RuntimeError: LLVM ERROR"):
        assert not jit.available()
    assert jit.available() is False  # decided once, not retried on every call


@pytest.mark.skipif(not AVX2, reason=NOT_AVX2)
@pytest.mark.parametrize("shape", [(1, 4, 5, 7), (1, 4, 40, 40)])  # n % 16 tail; several chunks
def test_brownian_tree_fused_bridge_vs_torchsde(shape, monkeypatch):
    """The compiled tree draws each node's noise chunk by chunk inside the bridge
    (brownian_bridge_seeded): same increments as torchsde's tree and as the numpy path."""
    torchsde = pytest.importorskip("torchsde")
    from ksampler_rt.runtime.brownian import BrownianTree

    t0, t1 = 0.0291675, 14.614642
    pts = [14.614642, 6.1, 2.2, 0.7, 0.0291675]
    qs = [(pts[i + 1], pts[i]) for i in range(len(pts) - 1)]
    assert jit.available()  # (its self-check calls the kernel too)
    fused = []
    real = jit.brownian_bridge_seeded
    monkeypatch.setattr(jit, "brownian_bridge_seeded", lambda *a: fused.append(1) or real(*a))
    tree = BrownianTree(t0, t1, shape, 1234, kernel="avx2")
    compiled = [tree(a, b) for a, b in qs]
    assert len(fused) == tree.n_randn - 1  # every split (all but the root draw) took the fused kernel
    oracle = torchsde.BrownianTree(torch.tensor(t0), torch.zeros(shape), torch.tensor(t1), entropy=1234)
    for (a, b), got in zip(qs, compiled):
        want = oracle(torch.tensor(a), torch.tensor(b)).numpy()
        assert np.array_equal(got, want), (a, b)
    monkeypatch.setattr(jit, "available", lambda: False)
    numpy_tree = BrownianTree(t0, t1, shape, 1234, kernel="avx2")
    assert all(np.array_equal(numpy_tree(a, b), c) for (a, b), c in zip(qs, compiled))


def test_brownian_tree_cache_bounded_in_bytes():
    from ksampler_rt.runtime.brownian import BrownianTree

    assert BrownianTree(0.1, 10.0, (1, 4, 128, 128), 1).cache_size == 256   # 64 MiB / 256 KiB
    assert BrownianTree(0.1, 10.0, (8, 4, 128, 128), 1).cache_size == 64    # never below 64
    small = BrownianTree(0.1, 10.0, (1, 4, 8, 8), 1, cache_size=3)
    for a, b in ((9.0, 10.0), (5.0, 9.0), (1.0, 5.0)):
        small(a, b)
    assert len(small._cache) <= 3
