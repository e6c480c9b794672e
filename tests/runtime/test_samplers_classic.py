"""The classic samplers (ksampler_rt/runtime/samplers/classic.py) against analytic properties.

Denoisers used (numpy, float32):

* ``GaussianDenoiser``: the exact D(x, sigma) = x s^2 / (sigma^2 + s^2) for data ~ N(0, s^2). Its
  probability-flow ODE dx/dsigma = x sigma / (sigma^2 + s^2) has the closed-form solution
  x(sigma) = x(sigma_0) sqrt((sigma^2 + s^2) / (sigma_0^2 + s^2)), so a deterministic sampler must
  converge to it at its order; an ancestral sampler must return samples of std ~ s.
* A tiny torch oracle for euler (the only one simple enough to restate here).

Exact ComfyUI parity is tests/runtime/test_comfyui_parity.py; this file checks the maths and the
bookkeeping (model calls, noise draws, callbacks, dtype).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from ksampler_rt.runtime.samplers import SAMPLERS, classic
from ksampler_rt.runtime.samplers.common import get_ancestral_step, torch_linspace

F32 = np.float32

CLASSIC = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
           "exp_heun_2_x0", "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive",
           "ddpm", "lcm", "ddim"]


# ----------------------------------------------------------------------------- test doubles
class GaussianDenoiser:
    """Exact denoiser for N(0, s^2) data; ``uncond_shift`` makes the unconditional D differ (CFG++)."""

    def __init__(self, s=1.0, uncond_shift=0.0):
        from ksampler_rt.runtime.model_sampling import ModelSamplingDiscrete
        self.s2 = F32(s * s)
        self.uncond_shift = F32(uncond_shift)
        self.calls = []
        self.model_sampling = ModelSamplingDiscrete()

    def _d(self, x, sigma):
        assert isinstance(sigma, np.float32), type(sigma)
        assert x.dtype == F32, x.dtype
        self.calls.append(float(sigma))
        return x * (self.s2 / (sigma * sigma + self.s2))

    def __call__(self, x, sigma):
        return self._d(x, sigma)

    def with_uncond(self, x, sigma):
        d = self._d(x, sigma)
        return d, d + self.uncond_shift


class StubNoise:
    """A NoiseSource double: seeded numpy normals; records builds and draws.

    ``brownian`` returns increments of one Brownian motion on [sigma_min, sigma_max] sampled with
    bridges, so overlapping queries are correlated as in a real Brownian tree."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.builds, self.draws = [], []

    def default(self, x):
        self.builds.append(("default",))
        shape = np.shape(x)

        def sample(sigma, sigma_next):
            self.draws.append((float(sigma), float(sigma_next)))
            return self.rng.standard_normal(shape).astype(F32)
        return sample

    def brownian(self, x, sigma_min, sigma_max):
        self.builds.append(("brownian", float(sigma_min), float(sigma_max)))
        shape, rng = np.shape(x), self.rng
        lo, hi = float(sigma_min), float(sigma_max)
        known = {lo: np.zeros(shape), hi: rng.standard_normal(shape) * math.sqrt(hi - lo)}

        def w(t):
            if t not in known:
                ts = sorted(known)
                left = max(k for k in ts if k < t)
                right = min(k for k in ts if k > t)
                a = (t - left) / (right - left)
                mean = known[left] + a * (known[right] - known[left])
                known[t] = mean + rng.standard_normal(shape) * math.sqrt((t - left) * (right - t) / (right - left))
            return known[t]

        def sample(sigma, sigma_next):
            self.draws.append((float(sigma), float(sigma_next)))
            a, b = sorted((float(sigma), float(sigma_next)))
            sign = 1.0 if float(sigma) < float(sigma_next) else -1.0
            return (sign * (w(b) - w(a)) / math.sqrt(b - a)).astype(F32)
        return sample


def karras(n, sigma_min=0.0291675, sigma_max=14.614642, rho=7.0):
    ramp = np.linspace(0, 1, n)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return np.append(s, 0.0).astype(F32)


def geometric(n, hi=10.0, lo=0.1):
    """n steps between two positive sigmas (no final 0: the solvers' plain steps only)."""
    return np.geomspace(hi, lo, n + 1).astype(F32)


def exact_ode(x, sigma_from, sigma_to, s=1.0):
    return x.astype(np.float64) * math.sqrt((sigma_to ** 2 + s * s) / (sigma_from ** 2 + s * s))


def run(name, sigmas, x=None, model=None, noise=None, seed=0, shape=(1, 4, 8, 8), **options):
    model = model or GaussianDenoiser()
    noise = noise or StubNoise(seed + 100)
    if x is None:
        x = (np.random.default_rng(seed).standard_normal(shape) * math.sqrt(float(sigmas[0]) ** 2 + 1)).astype(F32)
    steps = []
    out = SAMPLERS[name].fn(model, x, sigmas, noise, callback=lambda i, xx, d: steps.append(i), **options)
    return out, x, model, noise, steps


def observed_order(name, ns=(4, 8, 16), **options):
    errs = []
    for n in ns:
        sig = geometric(n)
        out, x, *_ = run(name, sig, **options)
        errs.append(float(np.abs(out - exact_ode(x, float(sig[0]), float(sig[-1]))).max()))
    return [math.log2(a / b) for a, b in zip(errs, errs[1:])], errs


# ----------------------------------------------------------------------------- registry
def test_classic_samplers_registered_with_cfg_pp_flags():
    for name in CLASSIC:
        assert name in SAMPLERS and name in classic.SAMPLERS
        assert SAMPLERS[name].cfg_pp == name.endswith("_cfg_pp")
    assert SAMPLERS["ddim"].fn is SAMPLERS["euler"].fn


@pytest.mark.parametrize("name", CLASSIC)
def test_float32_in_float32_out_and_one_callback_per_step(name):
    sig = karras(5)
    out, x, model, _, steps = run(name, sig)
    assert out.dtype == F32 and out.shape == x.shape and np.all(np.isfinite(out))
    if name not in ("dpm_fast", "dpm_adaptive"):
        assert steps == list(range(len(sig) - 1))


# ----------------------------------------------------------------------------- exactness
def test_euler_matches_a_torch_restatement_bit_for_bit():
    torch = pytest.importorskip("torch")
    sig = karras(12)
    out, x, *_ = run("euler", sig)
    xt, st = torch.from_numpy(x.copy()), torch.from_numpy(sig)
    s2 = torch.tensor(1.0)
    for i in range(len(st) - 1):
        d = (xt - xt * (s2 / (st[i] * st[i] + s2))) / st[i]
        xt = xt + d * (st[i + 1] - st[i])
    np.testing.assert_array_equal(out, xt.numpy())


def test_ancestral_step_splits_the_variance():
    for a, b in [(14.6, 11.7), (1.0, 0.5), (0.05, 0.03)]:
        down, up = get_ancestral_step(F32(a), F32(b))
        assert down.dtype == F32 and up.dtype == F32
        assert math.isclose(float(down) ** 2 + float(up) ** 2, float(F32(b)) ** 2, rel_tol=1e-5)
        assert math.isclose(float(up) ** 2, b * b * (a * a - b * b) / (a * a), rel_tol=1e-5)
    assert get_ancestral_step(F32(2.0), F32(1.0), eta=0.0) == (F32(1.0), F32(0.0))
    assert get_ancestral_step(F32(2.0), F32(0.0)) == (F32(0.0), F32(0.0))


def test_torch_linspace_is_bit_exact():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = F32(rng.uniform(-3, 1)), F32(rng.uniform(2, 5))
        n = int(rng.integers(2, 40))
        want = torch.linspace(torch.tensor(a), torch.tensor(b), n).numpy()
        np.testing.assert_array_equal(torch_linspace(a, b, n), want)


def test_lms_coefficients_integrate_the_lagrange_basis():
    t = karras(10)[:-1]
    for i in range(3, 8):
        for j in range(4):
            nodes = [float(t[i - k]) for k in range(4)]
            others = [nodes[k] for k in range(4) if k != j]
            poly = np.poly1d(others, r=True) / np.prod([nodes[j] - o for o in others])
            want = poly.integ()(float(t[i + 1])) - poly.integ()(float(t[i]))
            assert math.isclose(classic.linear_multistep_coeff(4, t, i, j), want, rel_tol=1e-6, abs_tol=1e-9)


# ----------------------------------------------------------------------------- convergence
@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpm_2", 2), ("lms", 2),
                                         ("exp_heun_2_x0", 2)])
def test_deterministic_order_of_convergence(name, order):
    orders, errs = observed_order(name)
    assert min(orders) > order - 0.45, (orders, errs)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_2_ancestral", "exp_heun_2_x0_sde"])
def test_eta_zero_is_the_ode_solver(name):
    base = {"euler_ancestral": "euler", "dpm_2_ancestral": "dpm_2", "exp_heun_2_x0_sde": "exp_heun_2_x0"}[name]
    sig = geometric(6)
    a, *_, noise, _ = run(name, sig, eta=0.0)
    b, *_ = run(base, sig)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    if name == "exp_heun_2_x0_sde":
        assert noise.draws == []  # SEEDS-2 skips the noise when eta == 0
    else:
        assert len(noise.draws) == len(sig) - 1  # ancestral: still drawn (and added times sigma_up = 0)


@pytest.mark.parametrize("name", ["euler", "heun", "heunpp2", "dpm_2", "lms", "dpm_fast", "dpm_adaptive",
                                  "exp_heun_2_x0", "ddim"])
def test_full_schedule_lands_on_the_pf_ode_solution(name):
    """From sigma_max to 0 the PF-ODE maps x to x / sqrt(1 + sigma_max^2) for unit-variance data."""
    sig = karras(30)
    out, x, *_ = run(name, sig)
    want = x / math.sqrt(1 + float(sig[0]) ** 2)
    tol = {"euler": 0.08, "ddim": 0.08, "heunpp2": 0.06, "dpm_fast": 0.01, "dpm_adaptive": 0.05}.get(name, 0.005)
    np.testing.assert_allclose(out, want, atol=tol * float(np.abs(want).max()))


@pytest.mark.parametrize("name", ["euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "ddpm",
                                  "exp_heun_2_x0_sde"])
def test_ancestral_samples_have_the_data_variance(name):
    """Unit-variance data: the std of the samples tends to 1 (first-order bias: 0.965 at 100 steps)."""
    out, *_ = run(name, karras(100), shape=(1, 4, 32, 32), seed=3)
    assert abs(float(out.std()) - 1.0) < 0.045, out.std()
    assert abs(float(out.mean())) < 0.05


def test_lcm_jumps_to_d_and_renoises_to_the_next_sigma():
    sig = np.array([3.0, 1.5, 0.0], F32)
    x = np.full((1, 1, 4, 4), 2.0, F32)
    first = StubNoise(5).default(x)(sig[0], sig[1])
    out, _, model, _, _ = run("lcm", sig, x=x, noise=StubNoise(5))
    d1 = x * (F32(1) / (sig[0] * sig[0] + F32(1)))
    x1 = first * sig[1] + d1
    np.testing.assert_array_equal(out, x1 * (F32(1) / (sig[1] * sig[1] + F32(1))))


# ----------------------------------------------------------------------------- bookkeeping
@pytest.mark.parametrize("name, calls", [("euler", 20), ("heun", 39), ("dpm_2", 39), ("dpm_2_ancestral", 39),
                                         ("heunpp2", 57), ("lms", 20), ("dpm_fast", 20), ("ddpm", 20), ("lcm", 20),
                                         ("euler_ancestral", 20), ("euler_cfg_pp", 20), ("exp_heun_2_x0", 39),
                                         ("exp_heun_2_x0_sde", 39)])
def test_model_calls_for_20_steps(name, calls):
    _, _, model, _, _ = run(name, karras(20))
    assert len(model.calls) == calls


@pytest.mark.parametrize("name, per_step", [("euler_ancestral", 1), ("euler_ancestral_cfg_pp", 1),
                                            ("dpm_2_ancestral", 1), ("ddpm", 1), ("lcm", 1),
                                            ("exp_heun_2_x0_sde", 2), ("euler_cfg_pp", 0), ("exp_heun_2_x0", 0),
                                            ("dpm_fast", 0), ("dpm_adaptive", 0)])
def test_default_noise_is_built_once_and_drawn_where_comfyui_draws(name, per_step):
    sig = karras(8)
    _, x, _, noise, _ = run(name, sig)
    assert noise.builds == [("default",)]
    assert len(noise.draws) == per_step * (len(sig) - 2)  # no draw on the step to sigma = 0
    if per_step == 1:
        assert noise.draws == [(float(sig[i]), float(sig[i + 1])) for i in range(len(sig) - 2)]


@pytest.mark.parametrize("name", ["euler", "heun", "heunpp2", "dpm_2", "lms"])
def test_deterministic_samplers_draw_no_noise(name):
    _, _, _, noise, _ = run(name, karras(6))
    assert noise.builds == [] and noise.draws == []


def test_first_ancestral_draw_is_the_first_default_draw():
    """One euler_ancestral step adds sigma_up times the first draw of noise.default(x)."""
    sig = karras(4)[:2].copy()
    x = np.full((1, 4, 8, 8), 3.0, F32)
    first = StubNoise(7).default(x)(sig[0], sig[1])
    out = SAMPLERS["euler_ancestral"].fn(GaussianDenoiser(), x, sig, StubNoise(7))
    down, up = get_ancestral_step(sig[0], sig[1])
    d = (x - x * (F32(1) / (sig[0] * sig[0] + F32(1)))) / sig[0]
    np.testing.assert_array_equal(out, x + d * (down - sig[0]) + first * 1.0 * up)


def test_cfg_pp_equals_the_plain_sampler_when_uncond_equals_cond():
    sig = karras(10)
    a, *_ = run("euler_cfg_pp", sig)
    b, *_ = run("euler", sig)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    a, *_ = run("euler_ancestral_cfg_pp", sig)
    b, *_ = run("euler_ancestral", sig)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_euler_cfg_pp_follows_the_unconditional_direction():
    """One CFG++ step: x' = D_cond + sigma_next (x - D_uncond) / sigma."""
    sig = np.array([2.0, 1.0], F32)
    x = np.full((1, 1, 2, 2), 3.0, F32)
    model = GaussianDenoiser(uncond_shift=0.25)
    out = SAMPLERS["euler_cfg_pp"].fn(model, x, sig, StubNoise())
    d = x * F32(1 / 5)
    np.testing.assert_allclose(out, d + 1.0 * (x - (d + 0.25)) / 2.0, rtol=1e-6)


def test_dpm_fast_spreads_the_calls_over_floor_n_over_3_plus_1_steps():
    for n in (1, 2, 3, 4, 5, 6, 20):
        sig = karras(n)
        _, _, model, noise, steps = run("dpm_fast", sig)
        assert len(model.calls) == n
        assert steps == list(range(n // 3 + 1))
        assert model.calls[0] == pytest.approx(float(sig[0]), rel=1e-6)
    # only the ends matter: sigma_max = sigmas[0], sigma_min = the last positive sigma
    a, *_ = run("dpm_fast", np.array([10.0, 5.0, 1.0, 0.1, 0.0], F32))
    b, *_ = run("dpm_fast", np.array([10.0, 2.0, 0.5, 0.1, 0.0], F32))
    np.testing.assert_array_equal(a, b)


def test_dpm_adaptive_ignores_steps_and_reports_every_attempt():
    a, _, ma, _, steps_a = run("dpm_adaptive", karras(5))
    b, _, mb, _, steps_b = run("dpm_adaptive", np.array([14.614642, 0.0291675, 0.0], F32))
    np.testing.assert_array_equal(a, b)
    assert len(ma.calls) % 3 == 0 and len(ma.calls) == 3 * len(steps_a)
    assert steps_a == list(range(len(steps_a)))


def test_one_sigma_returns_the_input():
    x = np.ones((1, 4, 2, 2), F32)
    for name in CLASSIC:
        out = SAMPLERS[name].fn(GaussianDenoiser(), x, np.array([1.0], F32), StubNoise())
        np.testing.assert_array_equal(out, x)
