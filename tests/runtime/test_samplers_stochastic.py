"""Stochastic samplers (er_sde, seeds_2, seeds_3, sa_solver, sa_solver_pece).

With the exact denoiser for N(0, q) data, D(x, s) = x q / (s^2 + q), a correct sampler started
from N(0, q + s0^2) ends with spread sqrt(q). The ODE limits (eta = 0) must follow the closed-form
probability flow x(s) = x(s0) sqrt((s^2 + q)/(s0^2 + q)). Noise must be drawn where ComfyUI draws it.
"""
from __future__ import annotations

import numpy as np
import pytest

from ksampler_rt.runtime.model_sampling import ModelSamplingDiscrete
from ksampler_rt.runtime.samplers import SAMPLERS
from ksampler_rt.runtime.samplers.stochastic import sa_b_coeffs

F32 = np.float32
Q = F32(0.5)
MS = ModelSamplingDiscrete()
NAMES = ["er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece"]


class GaussianModel:
    model_sampling = MS

    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma):
        self.calls += 1
        assert x.dtype == np.float32
        return x * Q / (F32(sigma) ** 2 + Q)


class StubNoise:
    """A seeded numpy NoiseSource stand-in that counts what is asked of it."""

    def __init__(self, seed=0):
        self.rng, self.built, self.draws = np.random.default_rng(seed), 0, 0

    def default(self, x):
        self.built += 1

        def sampler(sigma, sigma_next):
            self.draws += 1
            return self.rng.standard_normal(x.shape).astype(F32)
        return sampler


def full_schedule(n):
    """Exponential schedule over SD's sigma range, ending at 0 (like KSampler's)."""
    s = np.exp(np.linspace(np.log(MS.sigma_max), np.log(MS.sigma_min), n)).astype(F32)
    return np.append(s, F32(0))


def start(sig, shape=(1, 4, 64, 64), seed=5):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * np.sqrt(sig[0] ** 2 + Q)).astype(F32)


def sa_noise_steps(sig):
    """Predictor steps with tau > 0: sigma_next inside [percent_to_sigma(0.8), percent_to_sigma(0.2)]."""
    hi, lo = MS.percent_to_sigma(0.2), MS.percent_to_sigma(0.8)
    return sum(1 for s in sig[1:] if s != 0 and hi >= float(s) >= lo)


@pytest.mark.parametrize("name", NAMES)
def test_calls_and_noise_draws(name):
    n = 10
    sig = full_schedule(n)
    model, noise = GaussianModel(), StubNoise()
    seen = []
    out = SAMPLERS[name].fn(model, start(sig, (1, 4, 4, 4)), sig, noise, callback=lambda i, x, d: seen.append(i))
    assert seen == list(range(n)) and out.dtype == np.float32 and np.isfinite(out).all()
    calls = {"er_sde": n, "seeds_2": 2 * n - 1, "seeds_3": 3 * n - 2, "sa_solver": n, "sa_solver_pece": 2 * n - 1}
    draws = {"er_sde": n - 1, "seeds_2": 2 * (n - 1), "seeds_3": 3 * (n - 1),
             "sa_solver": sa_noise_steps(sig), "sa_solver_pece": sa_noise_steps(sig)}
    assert model.calls == calls[name]
    assert noise.built == 1 and noise.draws == draws[name]
    assert 0 < draws[name]


@pytest.mark.parametrize("name", NAMES)
def test_output_spread_matches_data(name):
    sig = full_schedule(20)
    out = SAMPLERS[name].fn(GaussianModel(), start(sig), sig, StubNoise(3))
    assert abs(out.std() / np.sqrt(Q) - 1) < 0.05
    assert abs(out.mean()) < 0.05


@pytest.mark.parametrize("name", NAMES)
def test_noise_matters_and_is_reproducible(name):
    sig = full_schedule(8)
    x = start(sig, (1, 4, 8, 8))
    a = SAMPLERS[name].fn(GaussianModel(), x.copy(), sig, StubNoise(1))
    b = SAMPLERS[name].fn(GaussianModel(), x.copy(), sig, StubNoise(1))
    c = SAMPLERS[name].fn(GaussianModel(), x.copy(), sig, StubNoise(2))
    assert np.array_equal(a, b) and not np.allclose(a, c)


@pytest.mark.parametrize("name,kw,min_gain", [("seeds_2", {"eta": 0.0}, 10), ("seeds_3", {"eta": 0.0}, 20),
                                              ("sa_solver", {"eta": 0.0}, 8)])
def test_ode_limit_converges(name, kw, min_gain):
    x0 = (np.linspace(-3, 3, 16, dtype=F32) * F32(10)).reshape(1, 4, 2, 2)
    errs = []
    for n in (6, 24):
        sig = np.exp(np.linspace(np.log(10.0), np.log(0.1), n + 1)).astype(F32)
        noise = StubNoise()
        out = SAMPLERS[name].fn(GaussianModel(), x0.copy(), sig, noise, **kw)
        assert noise.draws == 0
        exact = x0 * np.sqrt((sig[-1] ** 2 + Q) / (sig[0] ** 2 + Q))
        errs.append(np.abs(out - exact).max() / np.abs(exact).max())
    assert errs[1] < 0.01 and errs[0] / errs[1] > min_gain


def test_sa_b_coeffs_reproduce_polynomials():
    """With tau = 0 the b_i integrate the Lagrange basis exactly: applied to samples of a constant
    denoised value they give alpha_t (1 - e^{-h}) x0, the exact ODE drift."""
    lams = np.array([-1.0, -0.6, -0.2], dtype=F32)
    lam_s, lam_t = lams[-1], F32(0.3)
    sigma_t = np.exp(-lam_t)
    b = sa_b_coeffs(sigma_t, lams, lam_s, lam_t, 0.0)
    assert b.dtype == np.float32
    assert float(b.sum()) == pytest.approx(float(sigma_t * np.exp(lam_t) * -np.expm1(-(lam_t - lam_s))), rel=1e-5)


def test_sa_solver_without_zero_end_keeps_orders():
    """A window ending above 0 (leftover noise) is not lowered at the end and stays finite."""
    sig = full_schedule(12)[:8]
    model = GaussianModel()
    out = SAMPLERS["sa_solver_pece"].fn(model, start(sig, (1, 4, 4, 4)), sig, StubNoise())
    assert np.isfinite(out).all() and model.calls == 2 * 7 - 1
