"""Multistep ODE samplers (ipndm, ipndm_v, deis, res_multistep*, gradient_estimation*).

Analytic checks: with the Gaussian-data denoiser D(x, s) = x q / (s^2 + q) (data ~ N(0, q)) the
probability-flow ODE dx/ds = (x - D)/s has the closed form x(s) = x(s0) sqrt((s^2 + q)/(s0^2 + q));
with D = c x it is x(s) = x(s0) (s/s0)^(1 - c). Each sampler must converge to it as steps grow.
"""
from __future__ import annotations

import numpy as np
import pytest

from ksampler_rt.runtime.model_sampling import ModelSamplingDiscrete
from ksampler_rt.runtime.samplers import SAMPLERS
from ksampler_rt.runtime.samplers.multistep import _ipndm_v_coeffs, deis_coefficients

F32 = np.float32
Q = F32(0.5)


class GaussianModel:
    """Exact denoiser for N(0, q) data; cfg_pp samplers get uncond == cond (CFG++ then reduces to the ODE)."""

    model_sampling = ModelSamplingDiscrete()

    def __init__(self, c: float | None = None):
        self.c, self.calls = c, 0

    def __call__(self, x, sigma):
        self.calls += 1
        assert x.dtype == np.float32
        if self.c is not None:
            return x * F32(self.c)
        return x * Q / (F32(sigma) ** 2 + Q)

    def with_uncond(self, x, sigma):
        d = self(x, sigma)
        return d, d


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


def geometric(n, hi=10.0, lo=0.1):
    return np.exp(np.linspace(np.log(hi), np.log(lo), n + 1)).astype(F32)


X0 = (np.linspace(-3, 3, 16, dtype=F32) * F32(10)).reshape(1, 4, 2, 2)
DETERMINISTIC = {"ipndm": 12, "ipndm_v": 3.5, "deis": 30, "res_multistep": 9, "res_multistep_cfg_pp": 9,
                 "gradient_estimation": 1.9, "gradient_estimation_cfg_pp": 1.9}


def _run(name, model, sigmas, **kw):
    return SAMPLERS[name].fn(model, X0.copy(), sigmas, StubNoise(), **kw)


@pytest.mark.parametrize("name,min_gain", sorted(DETERMINISTIC.items()))
def test_converges_to_gaussian_flow(name, min_gain):
    errs = []
    for n in (6, 24):
        sig = geometric(n)
        out = _run(name, GaussianModel(), sig)
        assert out.dtype == np.float32 and out.shape == X0.shape
        exact = X0 * np.sqrt((sig[-1] ** 2 + Q) / (sig[0] ** 2 + Q))
        errs.append(np.abs(out - exact).max() / np.abs(exact).max())
    assert errs[1] < 0.05
    assert errs[0] / errs[1] > min_gain  # 4x the steps: observed order >= ~0.5 .. 2.5 by method


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_converges_linear_denoiser(name):
    c = 0.5
    sig = geometric(24)
    out = _run(name, GaussianModel(c), sig)
    exact = X0 * (sig[-1] / sig[0]) ** F32(1 - c)
    tol = 0.1 if name.startswith("gradient_estimation") else 0.02  # Euler-like: first order
    assert np.abs(out - exact).max() / np.abs(exact).max() < tol


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_one_call_per_step_and_final_denoise(name):
    sig = np.append(geometric(6), F32(0))
    model, noise = GaussianModel(), StubNoise()
    seen = []
    out = SAMPLERS[name].fn(model, X0.copy(), sig, noise, callback=lambda i, x, d: seen.append(i))
    assert model.calls == 7 and seen == list(range(7))
    assert noise.draws == 0
    assert np.isfinite(out).all() and out.dtype == np.float32


@pytest.mark.parametrize("name", ["res_multistep_ancestral", "res_multistep_ancestral_cfg_pp"])
def test_ancestral_noise_draws(name):
    sig = np.append(geometric(7), F32(0))
    noise = StubNoise(1)
    a = SAMPLERS[name].fn(GaussianModel(), X0.copy(), sig, noise)
    assert noise.built == 1 and noise.draws == 7  # every step but the last (sigma_next = 0)
    b = SAMPLERS[name].fn(GaussianModel(), X0.copy(), sig, StubNoise(1))
    c = SAMPLERS[name].fn(GaussianModel(), X0.copy(), sig, StubNoise(2))
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_ancestral_statistics():
    """Sampling N(0, q) data from pure noise: the output spread matches sqrt(q)."""
    rng = np.random.default_rng(5)
    ms = ModelSamplingDiscrete()
    sig = np.append(np.exp(np.linspace(np.log(ms.sigma_max), np.log(ms.sigma_min), 20)).astype(F32), F32(0))
    x = (rng.standard_normal((1, 4, 64, 64)) * np.sqrt(sig[0] ** 2 + Q)).astype(F32)
    out = SAMPLERS["res_multistep_ancestral"].fn(GaussianModel(), x, sig, StubNoise(3))
    assert abs(out.std() / np.sqrt(Q) - 1) < 0.05


def test_deis_table_integrates_dsigma():
    """The Lagrange basis sums to 1, so each row of the DEIS table integrates dsigma over the step."""
    sig = np.append(geometric(10, 14.6, 0.03), F32(0))
    table = deis_coefficients(sig, 3)
    assert table[0] == ()
    for i in range(1, 10):
        assert len(table[i]) == min(i + 1, 3)
        assert sum(table[i]) == pytest.approx(float(sig[i + 1] - sig[i]), rel=2e-3)


def test_ipndm_v_weights_on_uniform_steps():
    """On uniform steps the variable-step weights of orders 2 and 3 are the Adams-Bashforth ones of
    ipndm (order 4 differs: ComfyUI's formula, from diff-sampler, gives 57/24 for the newest)."""
    sig = np.linspace(8, 1, 9).astype(F32)
    np.testing.assert_allclose(_ipndm_v_coeffs(sig, 1, 2), (3 / 2, -1 / 2), rtol=1e-6)
    np.testing.assert_allclose(_ipndm_v_coeffs(sig, 2, 3), (23 / 12, -16 / 12, 5 / 12), rtol=1e-6)
    np.testing.assert_allclose(sum(_ipndm_v_coeffs(sig, 4, 4)), 1.0, rtol=1e-6)


def test_cfg_pp_flags():
    for name in ("res_multistep_cfg_pp", "res_multistep_ancestral_cfg_pp", "gradient_estimation_cfg_pp"):
        assert SAMPLERS[name].cfg_pp
    for name in ("ipndm", "ipndm_v", "deis", "res_multistep", "gradient_estimation"):
        assert not SAMPLERS[name].cfg_pp
