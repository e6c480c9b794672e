"""The fused compiled sampler-update passes (runtime/fused_steps.py) against the numpy expressions
they replace, bit for bit, on random inputs including odd sizes."""
import numpy as np
import pytest

from ksampler_rt.runtime import fused_steps
from ksampler_rt.runtime.samplers import multistep

pytestmark = pytest.mark.skipif(not fused_steps.available(), reason="compiled kernels off (numba/KSAMPLER_RT_JIT)")


@pytest.mark.parametrize("shape", [(1, 16, 17, 13), (2, 4, 8, 8), (1,), (1, 3, 1, 1)])
@pytest.mark.parametrize("order", [2, 3, 4])
def test_ipndm_step_bit_identical(shape, order):
    rng = np.random.default_rng(order * 100 + len(shape))
    x = (rng.standard_normal(shape) * 7).astype(np.float32)
    ds = [(rng.standard_normal(shape) * 3).astype(np.float32) for _ in range(order)]
    weights, div = multistep._IPNDM_WEIGHTS[order]
    step = np.float32(rng.uniform(-1.5, -0.001))
    want = x + step * multistep._weighted(ds, weights) / div  # the numpy path of sample_ipndm
    got = fused_steps.ipndm_step(x, ds, weights, div, step)
    assert got.dtype == np.float32 and np.array_equal(got, want)


def test_sample_ipndm_same_bits_with_and_without_fusion(monkeypatch):
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((1, 16, 9, 11)).astype(np.float32)
    sigmas = np.array([1.0, 0.8, 0.6, 0.45, 0.3, 0.15, 0.0], np.float32)

    def model(x, sigma):  # a nonlinear stand-in denoiser
        return np.tanh(x * np.float32(0.7)) * (np.float32(1) - sigma)

    fused = multistep.sample_ipndm(model, x0.copy(), sigmas)
    monkeypatch.setattr(fused_steps, "available", lambda: False)
    plain = multistep.sample_ipndm(model, x0.copy(), sigmas)
    assert np.array_equal(fused, plain)


def test_sample_ipndm_v_same_bits_with_and_without_fusion(monkeypatch):
    rng = np.random.default_rng(4)
    x0 = rng.standard_normal((1, 16, 7, 13)).astype(np.float32)
    sigmas = np.array([1.0, 0.83, 0.61, 0.47, 0.29, 0.13, 0.0], np.float32)

    def model(x, sigma):
        return np.tanh(x * np.float32(0.6)) * (np.float32(1) - sigma)

    fused = multistep.sample_ipndm_v(model, x0.copy(), sigmas)
    monkeypatch.setattr(fused_steps, "available", lambda: False)
    plain = multistep.sample_ipndm_v(model, x0.copy(), sigmas)
    assert np.array_equal(fused, plain)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_ipndm_step_float32_weights_div_one(order):
    rng = np.random.default_rng(order)
    x = rng.standard_normal((1, 16, 5, 3)).astype(np.float32)
    ds = [rng.standard_normal(x.shape).astype(np.float32) for _ in range(order)]
    w = tuple(np.float32(v) for v in rng.uniform(-2, 2, order))
    step = np.float32(-0.173)
    assert np.array_equal(fused_steps.ipndm_step(x, ds, w, 1, step), x + step * multistep._weighted(ds, w))


@pytest.mark.parametrize("shape", [(1, 16, 9, 7), (5,)])
@pytest.mark.parametrize("cfg_pp", [False, True])
@pytest.mark.parametrize("s_noise", [1.0, 0.85])
def test_res_step_bit_identical(shape, cfg_pp, s_noise):
    from ksampler_rt.runtime.samplers.common import times
    rng = np.random.default_rng(len(shape) + 10 * cfg_pp)
    x, den, g, od, nz = [(rng.standard_normal(shape) * 4).astype(np.float32) for _ in range(5)]
    a, h, b1, b2, su = [np.float32(v) for v in rng.uniform(-1.5, 1.5, 5)]
    sn = np.float32(s_noise)
    xx = x + (den - g) if cfg_pp else x
    want = a * xx + h * (b1 * g + b2 * od)
    assert np.array_equal(fused_steps.res_step(x, den, g, od, None, cfg_pp, a, h, b1, b2, sn, su), want)
    assert np.array_equal(fused_steps.res_step(x, den, g, od, nz, cfg_pp, a, h, b1, b2, sn, su),
                          want + times(nz, sn, su))


class _Noise:
    """A seeded stand-in noise source: default(x) gives a sampler drawing float32 normals like x."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def default(self, x):
        return lambda s, sn: self.rng.standard_normal(x.shape).astype(np.float32)


def test_res_multistep_ancestral_same_bits_with_and_without_fusion(monkeypatch):
    x0 = np.random.default_rng(5).standard_normal((1, 16, 6, 10)).astype(np.float32)
    sigmas = np.array([1.0, 0.8, 0.6, 0.45, 0.3, 0.15, 0.0], np.float32)

    def model(x, sigma):
        return np.tanh(x * np.float32(0.5)) * (np.float32(1) - sigma)

    run = lambda: multistep.res_multistep(model, x0.copy(), sigmas, _Noise(9), eta=1.0, cfg_pp=False)  # noqa: E731
    fused = run()
    monkeypatch.setattr(fused_steps, "available", lambda: False)
    assert np.array_equal(fused, run())


# -- DPM-Solver, LMS, SEEDS, ER-SDE and SA-Solver passes ----------------------------------------
SHAPES = [(1, 16, 17, 13), (2, 4, 8, 8), (5,)]


def _arrays(shape, n, seed):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * 3).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("shape", SHAPES)
def test_dpm_solver_passes_bit_identical(shape):
    x, e, f, prev = _arrays(shape, 4, 11)
    a, b, sigma = np.float32(0.731), np.float32(-0.0419), np.float32(1.37)
    assert np.array_equal(fused_steps.eps_of(x, e, sigma), (x - e) / sigma)
    assert np.array_equal(fused_steps.lin_step(x, a, e), x - a * e)
    assert np.array_equal(fused_steps.lin_step(x, a, e, b, f), x - a * e - b * (f - e))
    atol, rtol = np.float32(0.0078), np.float32(0.05)
    prev[..., 0] = np.nan  # numpy's maximum propagates NaN: so must the pass
    delta = np.maximum(atol, rtol * np.maximum(np.abs(x), np.abs(prev)))
    want = ((x - e) / delta).astype(np.float64)
    np.testing.assert_array_equal(fused_steps.rms_scaled(x, e, prev, atol, rtol), want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_lms_step_bit_identical_with_python_float_weights(shape, k):
    x, den, *older = _arrays(shape, 2 + k - 1, 12 + k)
    coeffs = [1.0371, -0.29, 0.0731, -0.0093][:k]  # Python floats, as scipy's quad gives them
    sigma = np.float32(0.83)
    d = (x - den) / sigma
    want = x + sum(c * s for c, s in zip(coeffs, [d, *older]))
    got, got_d = fused_steps.lms_step(x, den, sigma, older, coeffs)
    assert np.array_equal(got_d, d) and np.array_equal(got, want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight", [1.0, 0.5, 0.3, 1.5])
def test_seeds_stage_bit_identical(shape, weight):
    from ksampler_rt.runtime.samplers.common import lerp, times
    x, u, v, sde, nz = _arrays(shape, 5, 13)
    a, c, e, qn, sig = (np.float32(s) for s in (0.93, 0.27, 0.81, 0.44, 0.62))
    for s_noise in (1.0, 0.7):
        want_s = sde * e + qn * nz
        want = a * x - c * lerp(u, v, weight) + times(want_s, sig, s_noise)
        got, got_s = fused_steps.seeds_stage(x, a, c, u, v=v, lerp=weight, sde=sde, nz=nz, e=e, qn=qn, sig=sig,
                                             s_noise=s_noise)
        assert np.array_equal(got, want) and np.array_equal(got_s, want_s)
        got, none = fused_steps.seeds_stage(x, a, c, u, v=v, lerp=weight, sde=sde, nz=nz, e=e, qn=qn, sig=sig,
                                            s_noise=s_noise, keep_noise=False)
        assert none is None and np.array_equal(got, want)
    got, got_s = fused_steps.seeds_stage(x, a, c, u, nz=nz, qn=qn, sig=sig)
    assert np.array_equal(got, a * x - c * u + times(qn * nz, sig)) and np.array_equal(got_s, qn * nz)
    got, none = fused_steps.seeds_stage(x, a, c, u, v=v, pq=(e, qn))
    assert none is None and np.array_equal(got, a * x - c * (e * u + qn * v))


@pytest.mark.parametrize("shape", SHAPES)
def test_er_sde_and_sa_steps_bit_identical(shape):
    from ksampler_rt.runtime.samplers.common import times
    from ksampler_rt.runtime.samplers.stochastic import _combine
    x, den, old, old_dd, nz, p3 = _arrays(shape, 6, 14)
    xw, dw, d2, w2, d3, w3, f1, f3 = (np.float32(s) for s in (0.97, 0.031, 0.21, -0.013, 0.11, 0.002, 0.4, 0.93))
    got, dd = fused_steps.er_sde_step(x, den, None, None, None, xw, dw, None, None, None, None, ())
    assert dd is None and np.array_equal(got, xw * x + dw * den)
    want_dd = (den - old) / d2
    got, dd = fused_steps.er_sde_step(x, den, old, None, nz, xw, dw, d2, w2, None, None, (f1, np.float32(1.0), f3))
    assert np.array_equal(dd, want_dd)
    assert np.array_equal(got, xw * x + dw * den + w2 * want_dd + times(nz, f1, np.float32(1.0), f3))
    got, _ = fused_steps.er_sde_step(x, den, old, old_dd, None, xw, dw, d2, w2, d3, w3, ())
    assert np.array_equal(got, xw * x + dw * den + w2 * want_dd + w3 * ((want_dd - old_dd) / d3))

    preds = [den, old, old_dd, p3]
    b = np.array([0.61, -0.27, 0.093, -0.011], np.float32)
    sc = np.float32(0.89)
    for k in (1, 2, 3, 4):
        want = sc * x + _combine(preds[:k], b[:k])
        got, none = fused_steps.sa_step(x, sc, preds[:k], b[:k])
        assert none is None and np.array_equal(got, want)
        assert np.array_equal(fused_steps.sa_step(x, sc, preds[:k], b[:k], added=nz)[0], want + nz)
        got, new = fused_steps.sa_step(x, sc, preds[:k], b[:k], nz=nz, factors=(f1, w2, np.float32(0.7)))
        want_new = times(nz, f1, w2, np.float32(0.7))
        assert np.array_equal(new, want_new) and np.array_equal(got, want + want_new)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg_pp", [False, True])
def test_ge_step_bit_identical(shape, cfg_pp):
    from ksampler_rt.runtime.samplers.common import to_d
    x, den, guide, old_d = _arrays(shape, 4, 15)
    sigma, sigma_next = np.float32(0.71), np.float32(0.52)
    dt, gm = sigma_next - sigma, np.float32(2.0 - 1)
    d = to_d(x, sigma, guide)
    step = denoised_step = den + d * sigma_next if cfg_pp else x + d * dt
    got, got_d = fused_steps.ge_step(x, den, guide, None, cfg_pp, sigma, sigma_next, dt, gm)
    assert np.array_equal(got_d, d) and np.array_equal(got, step)
    got, _ = fused_steps.ge_step(x, den, guide, old_d, cfg_pp, sigma, sigma_next, dt, gm)
    assert np.array_equal(got, denoised_step + gm * (d - old_d) * dt)


# Whole sampler runs: the compiled passes against the numpy path (fused_steps off), bit for bit, on a VP
# and a flow model (the SNR samplers read the model sampling), through the public ksampler().
FUSED_SAMPLERS = ["lms", "dpm_fast", "dpm_adaptive", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
                  "gradient_estimation", "gradient_estimation_cfg_pp"]


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("sampler", FUSED_SAMPLERS)
def test_samplers_same_bits_with_and_without_the_passes(family, sampler, monkeypatch):
    from analytic_unet import AnalyticFlowNet, analytic_unet  # tests/runtime/ is on sys.path

    from ksampler_rt.runtime import Model, ksampler
    channels = 16 if family == "flux" else 4
    latent = {"samples": np.random.default_rng(3).standard_normal((1, channels, 9, 7)).astype(np.float32)}
    width = 8 if family == "flux" else 768
    extra = {"pooled_output": np.full((1, 8), 0.5, np.float32)} if family == "flux" else {}
    pos = [[np.full((1, 5, width), 0.5, np.float32), extra]]
    neg = [[np.full((1, 5, width), -0.5, np.float32), dict(extra)]]

    def run():
        net = AnalyticFlowNet(1.0, True) if family == "flux" else analytic_unet
        return ksampler(Model(net, family), 7, 8, 4.5, sampler, "simple", pos, neg, latent, 0.9)["samples"]

    used = []
    for name in ("eps_of", "lin_step", "lms_step", "rms_scaled", "seeds_stage", "er_sde_step", "sa_step", "ge_step"):
        def counted(*a, _f=getattr(fused_steps, name), **k):
            used.append(_f.__name__)
            return _f(*a, **k)
        monkeypatch.setattr(fused_steps, name, counted)
    fused = run()
    assert used, "the compiled passes were not taken"
    monkeypatch.setattr(fused_steps, "available", lambda: False)
    plain = run()
    assert np.isfinite(plain).all()
    assert np.array_equal(fused, plain)


def test_seeds_2_phi_2_and_float64_s_noise_same_bits(monkeypatch):
    """The phi_2 corrector, and an s_noise that is a float64 scalar (numpy widens: the pass must stand aside)."""
    from ksampler_rt.runtime.samplers.stochastic import sample_seeds_2

    class Net:
        from ksampler_rt.runtime.model_sampling import ModelSamplingDiscrete
        model_sampling = ModelSamplingDiscrete()

        def __call__(self, x, sigma):
            return np.tanh(x * np.float32(0.3)) * np.float32(0.9)

    class Noise:
        def __init__(self):
            self.rng = np.random.default_rng(1)

        def default(self, x):
            return lambda s, sn: self.rng.standard_normal(x.shape).astype(np.float32)

    x0 = np.random.default_rng(2).standard_normal((1, 4, 7, 9)).astype(np.float32) * 10
    sigmas = np.array([14.6, 6.1, 2.3, 0.9, 0.3, 0.0], np.float32)
    for kw in ({"solver_type": "phi_2", "r": 1.0}, {"s_noise": np.float64(0.8)}):
        fused = sample_seeds_2(Net(), x0.copy(), sigmas, Noise(), **kw)
        with monkeypatch.context() as m:
            m.setattr(fused_steps, "available", lambda: False)
            plain = sample_seeds_2(Net(), x0.copy(), sigmas, Noise(), **kw)
        assert fused.dtype == plain.dtype and np.array_equal(fused, plain)
