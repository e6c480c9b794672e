"""The DPM-Solver++ samplers (ksampler_rt/runtime/samplers/dpmpp.py) against analytic properties.

Same doubles as test_samplers_classic.py (exact Gaussian-data denoiser, stub noise source with a
bridge-sampled Brownian motion). With eta = 0 every SDE sampler is its ODE solver and must converge
to the closed-form probability-flow solution at its order; with eta = 1 the samples must have the
data variance. Exact ComfyUI parity is tests/runtime/test_comfyui_parity.py.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from ksampler_rt.runtime.samplers import SAMPLERS, dpmpp


def _sibling(name):
    # tests/ has no __init__.py: load the sibling module by path
    key = "ksampler_rt_tests_" + name
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(name + ".py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


_c = _sibling("test_samplers_classic")
F32, GaussianDenoiser, StubNoise = _c.F32, _c.GaussianDenoiser, _c.StubNoise
karras, geometric, run, observed_order = _c.karras, _c.geometric, _c.run, _c.observed_order

DPMPP = ["dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m",
         "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
         "dpmpp_3m_sde", "dpmpp_3m_sde_gpu"]
BROWNIAN = ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"]


def test_dpmpp_samplers_registered():
    for name in DPMPP:
        assert name in SAMPLERS and name in dpmpp.SAMPLERS
        assert SAMPLERS[name].cfg_pp == name.endswith("_cfg_pp")
    for name in BROWNIAN:  # on a CPU run the _gpu variants are the same sampler
        assert SAMPLERS[name + "_gpu"].fn is SAMPLERS[name].fn


@pytest.mark.parametrize("name", DPMPP)
def test_float32_in_float32_out_and_one_callback_per_step(name):
    sig = karras(5)
    out, x, _, _, steps = run(name, sig)
    assert out.dtype == F32 and out.shape == x.shape and np.all(np.isfinite(out))
    assert steps == list(range(len(sig) - 1))


@pytest.mark.parametrize("name, options", [("dpmpp_2m", {}), ("dpmpp_2m_cfg_pp", {}),
                                           ("dpmpp_2s_ancestral", {"eta": 0.0}), ("dpmpp_sde", {"eta": 0.0}),
                                           ("dpmpp_2m_sde", {"eta": 0.0}), ("dpmpp_2m_sde_heun", {"eta": 0.0}),
                                           ("dpmpp_3m_sde", {"eta": 0.0})])
def test_second_order_convergence_of_the_ode_solvers(name, options):
    """All second order or better (3M's error is limited by its lower-order start-up steps)."""
    orders, errs = observed_order(name, ns=(8, 16, 32), **options)
    assert errs[0] > errs[1] > errs[2]
    assert orders[-1] > 1.7, (orders, errs)


def test_3m_beats_2m():
    _, e2 = observed_order("dpmpp_2m_sde", ns=(8, 16), eta=0.0)
    _, e3 = observed_order("dpmpp_3m_sde", ns=(8, 16), eta=0.0)
    assert e3[-1] < 0.5 * e2[-1]


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_3m_sde"])
def test_full_schedule_lands_on_the_pf_ode_solution(name):
    sig = karras(30)
    out, x, *_ = run(name, sig, **({"eta": 0.0} if "sde" in name else {}))
    want = x / math.sqrt(1 + float(sig[0]) ** 2)
    np.testing.assert_allclose(out, want, atol=0.01 * float(np.abs(want).max()))


@pytest.mark.parametrize("name", ["dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun",
                                  "dpmpp_3m_sde"])
def test_sde_samples_have_the_data_variance(name):
    out, *_ = run(name, karras(50), shape=(1, 4, 32, 32), seed=3)
    assert abs(float(out.std()) - 1.0) < 0.035, out.std()
    assert abs(float(out.mean())) < 0.05


def test_cfg_pp_2m_equals_2m_when_uncond_equals_cond():
    sig = karras(12)
    a, *_ = run("dpmpp_2m_cfg_pp", sig)
    b, *_ = run("dpmpp_2m", sig)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_2s_ancestral_cfg_pp_second_substep_uses_the_midpoint_uncond():
    """ComfyUI's post-CFG hook overwrites the stored uncond D at the midpoint call, so the final
    sub-step shifts x by (D - D_uncond(midpoint)). One step, eta = 0, checked by formula."""
    shift = {}

    class Model(GaussianDenoiser):
        def with_uncond(self, x, sigma):
            d = self._d(x, sigma)
            shift[float(sigma)] = F32(0.1) * sigma
            return d, d + shift[float(sigma)]

    sig = np.array([4.0, 1.0], F32)
    x = np.full((1, 1, 2, 2), 2.0, F32)
    model = Model()
    out = SAMPLERS["dpmpp_2s_ancestral_cfg_pp"].fn(model, x, sig, StubNoise(), eta=0.0)
    s0, s1 = 4.0, 1.0
    s_mid = math.sqrt(s0 * s1)
    d0 = 2.0 / (s0 ** 2 + 1)
    u0 = d0 + 0.1 * s0
    x2 = (s_mid / s0) * (2.0 + (d0 - u0)) + (1 - s_mid / s0) * d0
    d2 = x2 / (s_mid ** 2 + 1)
    u2 = d2 + 0.1 * s_mid
    want = (s1 / s0) * (2.0 + (d0 - u2)) + (1 - s1 / s0) * d2
    assert len(model.calls) == 2
    np.testing.assert_allclose(out, want, rtol=2e-6)


@pytest.mark.parametrize("name, calls", [("dpmpp_2s_ancestral", 39), ("dpmpp_2s_ancestral_cfg_pp", 39),
                                         ("dpmpp_sde", 39), ("dpmpp_2m", 20), ("dpmpp_2m_cfg_pp", 20),
                                         ("dpmpp_2m_sde", 20), ("dpmpp_2m_sde_heun", 20), ("dpmpp_3m_sde", 20)])
def test_model_calls_for_20_steps(name, calls):
    _, _, model, _, _ = run(name, karras(20))
    assert len(model.calls) == calls


@pytest.mark.parametrize("name, per_step", [("dpmpp_sde", 2), ("dpmpp_2m_sde", 1), ("dpmpp_2m_sde_heun", 1),
                                            ("dpmpp_3m_sde", 1)])
def test_brownian_tree_built_on_the_positive_sigma_range(name, per_step):
    sig = np.array([9.0, 4.0, 2.0, 0.5, 0.0], F32)
    _, _, _, noise, _ = run(name, sig)
    assert noise.builds == [("brownian", 0.5, 9.0)]
    assert len(noise.draws) == per_step * (len(sig) - 2)
    if per_step == 1:
        assert noise.draws == [(float(sig[i]), float(sig[i + 1])) for i in range(len(sig) - 2)]
    else:  # to the midpoint sigma_s1 = sqrt(sigma sigma_next), then the whole step
        for i in range(len(sig) - 2):
            a, b = noise.draws[2 * i], noise.draws[2 * i + 1]
            assert a[0] == b[0] == float(sig[i]) and b[1] == float(sig[i + 1])
            assert a[1] == pytest.approx(math.sqrt(float(sig[i]) * float(sig[i + 1])), rel=1e-6)


@pytest.mark.parametrize("name", ["dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp"])
def test_2s_ancestral_draws_default_noise_once_per_step_but_the_last(name):
    sig = karras(6)
    _, _, _, noise, _ = run(name, sig)
    assert noise.builds == [("default",)]
    assert noise.draws == [(float(sig[i]), float(sig[i + 1])) for i in range(len(sig) - 2)]


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_cfg_pp"])
def test_ode_samplers_draw_no_noise(name):
    _, _, _, noise, _ = run(name, karras(6))
    assert noise.builds == [] and noise.draws == []


def test_2m_last_step_is_first_order_and_lands_on_d():
    """On the step to sigma = 0 DPM-Solver++(2M) is first order: exp(-inf) = 0 leaves x = D."""
    sig = np.array([2.0, 1.0, 0.0], F32)
    out, x, model, *_ = run("dpmpp_2m", sig)
    x1 = SAMPLERS["dpmpp_2m"].fn(GaussianDenoiser(), x, sig[:2].copy(), StubNoise())
    np.testing.assert_array_equal(out, x1 * (F32(1) / (sig[1] * sig[1] + F32(1))))


@pytest.mark.parametrize("name", DPMPP)
def test_short_sigma_lists(name):
    x = np.ones((1, 4, 2, 2), F32)
    np.testing.assert_array_equal(SAMPLERS[name].fn(GaussianDenoiser(), x, np.array([1.0], F32), StubNoise()), x)
    out = SAMPLERS[name].fn(GaussianDenoiser(), x, np.array([2.0, 0.0], F32), StubNoise())
    assert out.dtype == F32 and np.all(np.isfinite(out))
