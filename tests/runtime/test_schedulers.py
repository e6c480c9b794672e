"""Sigma schedules vs ComfyUI 0.3.64 (values from /work/shared/reference/comfyui-sampling.md §4-§5)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ksampler_rt.runtime import schedulers as S
from ksampler_rt.runtime.model_sampling import ModelSamplingDiscrete
from ksampler_rt.runtime.samplers.common import torch_linspace
from ksampler_rt.runtime.samplers.spec import DISCARD_PENULTIMATE_SIGMA_SAMPLERS, SAMPLER_NAMES



class _Model:
    def __init__(self, zsnr=False, prediction="eps"):
        self.model_sampling = ModelSamplingDiscrete(prediction=prediction, zsnr=zsnr)


@pytest.fixture(scope="module")
def model():
    return _Model()


@pytest.fixture(scope="module")
def ms():
    return ModelSamplingDiscrete()


# -- names and lookup --------------------------------------------------------------------------------
def test_scheduler_names_in_comfyui_order():
    assert S.SCHEDULER_NAMES == ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta",
                                 "normal", "linear_quadratic", "kl_optimal")
    assert tuple(S.SCHEDULERS) == S.SCHEDULER_NAMES
    for name in S.SCHEDULER_NAMES:
        assert callable(S.get_scheduler(name))


def test_get_scheduler_unknown_lists_names():
    with pytest.raises(ValueError, match="scheduler.*'foo'.*simple, sgm_uniform.*kl_optimal"):
        S.get_scheduler("foo")
    with pytest.raises(ValueError):
        S.get_scheduler(None)


# -- hand-checked values (SD1.5 table) -----------------------------------------------------------------
def test_simple_10(model):
    s = S.calculate_sigmas(model, "simple", 10)
    np.testing.assert_allclose(s[:3], [14.6146, 8.3028, 5.0878], atol=1e-4)
    np.testing.assert_allclose(s[-2], 0.3417, atol=1e-4)
    assert s[-1] == 0 and len(s) == 11
    table = model.model_sampling.sigmas
    assert np.array_equal(s[:-1], table[[999 - int(k * 100.0) for k in range(10)]])


def test_normal_karras_exponential_endpoints(model):
    ms = model.model_sampling
    for name in ("normal", "karras", "exponential", "kl_optimal"):
        s = S.calculate_sigmas(model, name, 10)
        assert s[0] == pytest.approx(float(ms.sigma_max), rel=1e-6), name
        assert s[-2] == pytest.approx(float(ms.sigma_min), rel=1e-6), name
        assert s[-1] == 0
    s = S.calculate_sigmas(model, "normal", 10)
    np.testing.assert_allclose(s[:3], [14.6146, 7.8399, 4.6092], atol=1e-4)


def test_sgm_uniform_first_points(model, ms):
    s = S.calculate_sigmas(model, "sgm_uniform", 10)
    assert len(s) == 11 and s[-1] == 0
    # timesteps 999, 899.1, 799.2 ... (linspace(999, 0, 11) without its last point)
    assert s[0] == ms.sigma(np.float32(999.0))  # exp(log_sigmas[999]): not bit-equal to sigmas[999]
    assert s[1] == pytest.approx(float(ms.sigma(np.float32(899.1))), rel=1e-6)
    assert s[-2] > float(ms.sigma_min)


@pytest.mark.parametrize("steps, made, sigma0", [(3, 3, 2.93), (7, 8, 14.27), (20, 20, 11.03), (30, 31, 13.93)])
def test_ddim_uniform_counts(model, steps, made, sigma0):
    s = S.calculate_sigmas(model, "ddim_uniform", steps)
    assert len(s) - 1 == made
    assert s[0] == pytest.approx(sigma0, abs=5e-3)
    assert s[-1] == 0


def test_ddim_uniform_10_indices(model, ms):
    s = S.calculate_sigmas(model, "ddim_uniform", 10)
    assert np.array_equal(s[:-1], ms.sigmas[[901, 801, 701, 601, 501, 401, 301, 201, 101, 1]])
    assert s[0] == pytest.approx(8.3907, abs=1e-4)


def test_beta_dedup(model):
    s = S.calculate_sigmas(model, "beta", 200)
    assert len(s) - 1 == 199
    assert np.all(np.diff(s) < 0)  # duplicates removed: strictly decreasing
    s10 = S.calculate_sigmas(model, "beta", 10)
    assert s10[0] == model.model_sampling.sigmas[999] and len(s10) == 11


def test_linear_quadratic(model, ms):
    smax = np.float32(ms.sigma_max)
    assert np.array_equal(S.calculate_sigmas(model, "linear_quadratic", 1), np.array([1.0, 0.0], np.float32) * smax)
    s = S.calculate_sigmas(model, "linear_quadratic", 10)
    # hand math: L = 5, linear part i*0.025/5, then the quadratic through (5, 0.025) ending at 1
    L, N = 5, 10
    d = L - 0.025 * N
    q = d / (L * (N - L) ** 2)
    lc = 0.025 / L - 2 * d / (N - L) ** 2
    c = q * L * L
    xs = [i * 0.025 / L for i in range(L)] + [q * i * i + lc * i + c for i in range(L, N)] + [1.0]
    expected = np.array([1 - x for x in xs], np.float32) * smax
    assert np.array_equal(s, expected)
    np.testing.assert_allclose(s[:2], [14.6146, 14.5416], atol=1e-4)


def test_kl_optimal_one_step_is_nan_like_comfyui(model):
    s = S.calculate_sigmas(model, "kl_optimal", 1)
    assert len(s) == 2 and math.isnan(s[0]) and s[1] == 0


# -- properties ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", S.SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20, 37])
def test_properties(model, name, steps):
    s = S.calculate_sigmas(model, name, steps)
    assert s.dtype == np.float32 and s.ndim == 1
    assert s[-1] == 0
    if name == "kl_optimal" and steps == 1:
        return
    assert np.all(np.isfinite(s))
    assert np.all(np.diff(s) <= 0), s
    if name == "ddim_uniform":
        assert len(s) - 1 >= steps
    elif name == "beta":
        assert 1 <= len(s) - 1 <= steps
    else:
        assert len(s) == steps + 1
    assert s[0] <= float(model.model_sampling.sigma_max) * (1 + 1e-6)


def test_returns_fresh_arrays(model):
    a = S.calculate_sigmas(model, "simple", 5)
    a[0] = -1
    assert S.calculate_sigmas(model, "simple", 5)[0] > 0
    assert model.model_sampling.sigmas[-1] > 0


# -- KSampler: discard-penultimate samplers and the denoise tail ----------------------------------------
@pytest.mark.parametrize("sampler", sorted(DISCARD_PENULTIMATE_SIGMA_SAMPLERS))
@pytest.mark.parametrize("name", ["normal", "karras", "simple"])
def test_discard_penultimate(model, sampler, name):
    full = S.calculate_sigmas(model, name, 11)
    s = S.calculate_sigmas(model, name, 10, sampler_name=sampler)
    assert len(s) == 11
    assert np.array_equal(s, np.concatenate([full[:-2], full[-1:]]))
    assert np.array_equal(S.calculate_sigmas(model, name, 10, sampler_name="euler"), S.calculate_sigmas(model, name, 10))


def test_discard_penultimate_set():
    assert DISCARD_PENULTIMATE_SIGMA_SAMPLERS == {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}


def test_denoise_tail_20_half(model):
    s = S.calculate_sigmas(model, "normal", 20, denoise=0.5)
    full40 = S.calculate_sigmas(model, "normal", 40)
    assert len(s) == 21 and np.array_equal(s, full40[20:])
    assert s[0] == pytest.approx(1.548, abs=1e-3)


def test_denoise_tail_10_03(model):
    s = S.calculate_sigmas(model, "normal", 10, denoise=0.3)
    assert len(s) == 11 and np.array_equal(s, S.calculate_sigmas(model, "normal", 33)[-11:])
    assert s[0] == pytest.approx(0.7788, abs=1e-4)


def test_denoise_tail_with_discard(model):
    s = S.calculate_sigmas(model, "karras", 10, sampler_name="dpm_2", denoise=0.5)
    assert np.array_equal(s, S.calculate_sigmas(model, "karras", 20, sampler_name="dpm_2")[-11:])


def test_denoise_edges(model):
    full = S.calculate_sigmas(model, "normal", 10)
    assert np.array_equal(S.calculate_sigmas(model, "normal", 10, denoise=0.99995), full)
    assert np.array_equal(S.calculate_sigmas(model, "normal", 10, denoise=None), full)
    empty = S.calculate_sigmas(model, "normal", 10, denoise=0.0)
    assert empty.shape == (0,) and empty.dtype == np.float32
    # 0.9999 is not > 0.9999: int(10 / 0.9999) = 10 steps, last 11 entries = the full schedule
    assert np.array_equal(S.calculate_sigmas(model, "normal", 10, denoise=0.9999), full)
    # beta with denoise: the tail is at most the whole (deduplicated) schedule
    s = S.calculate_sigmas(model, "beta", 150, denoise=0.75)
    assert np.array_equal(s, S.calculate_sigmas(model, "beta", 200)[-151:])


def test_accepts_model_sampling_directly(ms, model):
    assert np.array_equal(S.calculate_sigmas(ms, "karras", 7), S.calculate_sigmas(model, "karras", 7))


# -- validation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, pattern", [
    (dict(scheduler="nope"), r"scheduler: received 'nope'.*simple.*kl_optimal"),
    (dict(sampler_name="nope"), r"sampler_name: received 'nope'.*euler.*uni_pc_bh2"),
    (dict(steps=0), r"steps: received 0, expected an integer >= 1"),
    (dict(steps=-3), r"steps: received -3"),
    (dict(steps=2.5), r"steps: received 2.5"),
    (dict(steps=True), r"steps: received True"),
    (dict(denoise=1.5), r"denoise: received 1.5, expected a number in \[0, 1\]"),
    (dict(denoise=-0.1), r"denoise: received -0.1"),
    (dict(denoise=float("nan")), r"denoise: received nan"),
    (dict(denoise="0.5"), r"denoise: received '0.5'"),
    (dict(denoise=1e-9), r"denoise: received 1e-09.*steps / denoise"),
])
def test_validation(model, kwargs, pattern):
    args = dict(scheduler="normal", steps=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        S.calculate_sigmas(model, **args)


def test_validation_model():
    with pytest.raises(TypeError, match="model_sampling"):
        S.calculate_sigmas(object(), "normal", 10)


def test_every_registered_sampler_name_accepted(model):
    for name in SAMPLER_NAMES:
        s = S.calculate_sigmas(model, "simple", 4, sampler_name=name)
        assert s[-1] == 0


def test_numpy_int_steps(model):
    assert np.array_equal(S.calculate_sigmas(model, "simple", np.int64(6)), S.calculate_sigmas(model, "simple", 6))


# -- KSamplerAdvanced window ------------------------------------------------------------------------
def test_window_middle_force_full(model):
    full = S.calculate_sigmas(model, "normal", 20)
    s, early = S.window_sigmas(full, 5, 12, True)
    assert not early
    assert np.array_equal(s[:-1], full[5:12]) and s[-1] == 0 and len(s) == 8
    assert full[12] != 0  # input untouched


def test_window_leftover_noise(model):
    full = S.calculate_sigmas(model, "normal", 20)
    s, early = S.window_sigmas(full, 0, 12, False)
    assert not early and np.array_equal(s, full[:13])


@pytest.mark.parametrize("end", [20, 21, 10000])
def test_window_end_beyond_schedule(model, end):
    full = S.calculate_sigmas(model, "normal", 20)
    for force in (True, False):
        s, early = S.window_sigmas(full, 3, end, force)
        assert not early and np.array_equal(s, full[3:])


def test_window_end_19_force_zeroes_last_step(model):
    full = S.calculate_sigmas(model, "normal", 20)
    s, early = S.window_sigmas(full, 0, 19, True)
    assert len(s) == 20 and s[-1] == 0 and np.array_equal(s[:-1], full[:19])


@pytest.mark.parametrize("start, end", [(12, 12), (13, 12), (20, 10000), (25, 10000), (19, 10000 + 1)])
def test_window_early_return(model, start, end):
    full = S.calculate_sigmas(model, "normal", 20)
    _, early = S.window_sigmas(full, start, end, True)
    assert early == (start >= min(end, 20))


def test_window_last_step_only(model):
    full = S.calculate_sigmas(model, "normal", 20)
    s, early = S.window_sigmas(full, 19, 10000, True)
    assert not early and np.array_equal(s, full[19:]) and len(s) == 2


def test_window_none_and_empty(model):
    full = S.calculate_sigmas(model, "normal", 5)
    s, early = S.window_sigmas(full, None, None, True)
    assert not early and np.array_equal(s, full)
    _, early = S.window_sigmas(np.zeros(0, np.float32), 0, 10000, True)
    assert early  # denoise 0 + advanced: nothing to do
    s, early = S.window_sigmas(full, None, 0, True)
    assert not early and np.array_equal(s, [0.0])


def test_window_validation(model):
    full = S.calculate_sigmas(model, "normal", 5)
    with pytest.raises(ValueError, match="start_at_step: received -1"):
        S.window_sigmas(full, -1, 10, True)
    with pytest.raises(ValueError, match="end_at_step: received 2.0"):
        S.window_sigmas(full, 0, 2.0, True)


# -- torch oracle: the same formulas as ComfyUI evaluated by torch ----------------------------------------
def _torch_oracle(zsnr):
    torch = pytest.importorskip("torch")

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, 0)
    s64 = ((1 - ac) / ac) ** 0.5
    if zsnr:
        r = (1 / (s64 * s64 + 1)).sqrt()
        r0, rT = r[0].clone(), r[-1].clone()
        r = (r - rT) * (r0 / (r0 - rT))
        a = r ** 2
        a[-1] = 4.8973451890853435e-08
        s64 = ((1 - a) / a) ** 0.5
    sig, logs = s64.float(), s64.log().float()

    def timestep(x):
        return (x.log() - logs[:, None]).abs().argmin(dim=0).view(x.shape)

    def sigma(t):
        t = torch.clamp(t.float(), 0, 999)
        w = t.frac()
        return ((1 - w) * logs[t.floor().long()] + w * logs[t.ceil().long()]).exp()

    smin, smax = float(sig[0]), float(sig[-1])

    def normal(n, sgm=False):
        a, b = timestep(sig[-1]), timestep(sig[0])
        ts = torch.linspace(a, b, n + 1)[:-1] if sgm else torch.linspace(a, b, n)
        return torch.FloatTensor([float(sigma(t)) for t in ts] + [0.0])

    def zero(x):
        return torch.cat([x, x.new_zeros(1)])

    def kl(n):
        a = torch.arange(n, dtype=torch.float) / (n - 1)
        return zero((a * math.atan(smin) + (1 - a) * math.atan(smax)).tan())

    return sig, {
        "normal": normal,
        "sgm_uniform": lambda n: normal(n, True),
        "karras": lambda n: zero((smax ** (1 / 7) + torch.linspace(0, 1, n) * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7.0),
        "exponential": lambda n: zero(torch.linspace(math.log(smax), math.log(smin), n).exp()),
        "kl_optimal": kl,
    }


@pytest.mark.parametrize("zsnr", [False, True])
def test_against_torch_oracle(zsnr):
    table, oracle = _torch_oracle(zsnr)
    ms = ModelSamplingDiscrete(zsnr=zsnr)
    assert np.array_equal(ms.sigmas, table.numpy())
    total = mismatched = 0
    for name, fn in oracle.items():
        for n in (2, 3, 5, 10, 20, 33, 50):
            ours, ref = S.get_scheduler(name)(ms, n), fn(n).numpy()
            assert ours.shape == ref.shape, (name, n)
            # torch's float32 exp/pow/tan (SLEEF) differ from correctly rounded ones by <= ~1 ulp
            np.testing.assert_allclose(ours, ref, rtol=3e-7, atol=0, err_msg=f"{name} N={n}")
            total += ours.size
            mismatched += int(np.sum(ours != ref))
    assert mismatched / total < 0.1  # nearly all entries bit-exact


def test_torch_linspace_emulation():
    torch = pytest.importorskip("torch")
    for n in (1, 2, 3, 7, 10, 21, 100, 1001):
        for a, b in ((0.0, 1.0), (999.0, 0.0), (math.log(14.614641), math.log(0.0291671)), (0.3, -2.7)):
            assert np.array_equal(torch_linspace(a, b, n), torch.linspace(a, b, n).numpy()), (a, b, n)


# Real-ComfyUI sigma lists for every scheduler are compared in test_comfyui_parity.py.

