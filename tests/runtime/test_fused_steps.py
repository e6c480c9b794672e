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
