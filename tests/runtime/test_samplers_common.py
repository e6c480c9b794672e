"""Shared sampler steps (runtime/samplers/common.py) against the expressions they stand for."""
import numpy as np
import pytest

from ksampler_rt.runtime.samplers.common import nan_to_zero, times

F32 = np.float32


@pytest.mark.parametrize("factors", [
    (1.0, F32(0.731)),                     # s_noise = 1 (skipped), then sigma_up
    (F32(0.3), 1, F32(2.5)),
    (0.5, F32(1.7), 3.0),
    (F32(1.0),),
    (),
    (F32(np.nan), 1.0),
    (np.float64(1.0), F32(0.2)),           # a strong float64 1: widens, so it is applied as written
    (F32(0.25), np.float64(3.3)),
])
def test_times_equals_the_written_chain(factors):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 4, 9, 7)).astype(F32)
    a[0, 0, 0, :3] = [np.inf, -0.0, 1e-45]
    before = a.copy()
    want = a
    for f in factors:
        want = want * f
    got = times(a, *factors)
    assert got.dtype == want.dtype
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(np.signbit(got), np.signbit(want))
    assert np.array_equal(a, before)  # the input is never written
    if factors and any(f != 1 for f in factors):
        assert got is not a


def test_nan_to_zero_matches_nan_to_num():
    for v in [F32(np.nan), F32(np.inf), F32(-np.inf), F32(0.0), F32(-0.0), F32(3.5), F32(1e-45)]:
        got, want = nan_to_zero(v), np.nan_to_num(v, nan=0.0)
        assert type(got) is type(want) and got.tobytes() == want.tobytes(), v


# -- the float32 vocabulary against torch itself (the op ComfyUI calls at each site) --------------------------
# Each helper stands for one torch call of ComfyUI 0.3.64; torch (a test-only dependency) is the oracle.

def _torch():
    return pytest.importorskip("torch")


def _two_rounding_linspace(start, end, n):
    """The float32 linspace WITHOUT fused multiply-adds (what multistep.py used to compute)."""
    start, end = F32(start), F32(end)
    step = (end - start) / F32(n - 1)
    idx = np.arange(n, dtype=F32)
    return np.where(np.arange(n) < n // 2, start + step * idx, end - step * (F32(n - 1) - idx)).astype(F32)


def test_torch_linspace_on_deis_intervals():
    """deis.py integrates over torch.linspace(t_cur, t_next, 10000) between VP times of a real schedule;
    common.torch_linspace gives torch's points bit for bit there, and the plain two-rounding float32
    formula does not (so this case tells the variants apart)."""
    torch = _torch()
    from ksampler_rt.runtime.model_sampling import ModelSamplingDiscrete
    from ksampler_rt.runtime.samplers.common import torch_linspace
    from ksampler_rt.runtime.samplers.multistep import _deis_vp_times
    from ksampler_rt.runtime.schedulers import karras_scheduler

    t_steps, _, _ = _deis_vp_times(karras_scheduler(ModelSamplingDiscrete(), 10))
    two_rounding_differs = 0
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        want = torch.linspace(torch.tensor(t_cur), torch.tensor(t_next), 10000).numpy()
        np.testing.assert_array_equal(torch_linspace(t_cur, t_next, 10000), want)
        two_rounding_differs += int(np.sum(_two_rounding_linspace(t_cur, t_next, 10000) != want))
    assert two_rounding_differs > 0


def test_torch_linspace_of_dpm_fast_and_schedulers():
    """dpm_fast: torch.linspace(t_start, t_end, m + 1) on 0-d float32 lambdas; karras / exponential /
    normal: Python-float ends."""
    torch = _torch()
    from ksampler_rt.runtime.samplers.common import sigma_to_half_log_snr, torch_linspace

    for sigma_max, sigma_min in ((14.614642, 0.0291675), (14.614642, 0.6)):
        t0, t1 = sigma_to_half_log_snr(F32(sigma_max)), sigma_to_half_log_snr(F32(sigma_min))
        for n in (2, 3, 4, 8, 11, 34):
            want = torch.linspace(torch.tensor(t0), torch.tensor(t1), n).numpy()
            np.testing.assert_array_equal(torch_linspace(t0, t1, n), want)
    for n in (1, 5, 20, 33):
        np.testing.assert_array_equal(torch_linspace(999.0, 0.0, n), torch.linspace(999.0, 0.0, n).numpy())


@pytest.mark.parametrize("weight", [0.5, 1 / 3, 2 / 3, 1.0, 0.25, 1 / (2 * 0.5), 1 / (2 * 0.3)])
def test_lerp_is_torch_lerp(weight):
    """torch.lerp is one fused multiply-add per element on 0-d tensors (SEEDS' lambda_s_1, DPM-2's
    log-midpoint) and on latents (SEEDS-2's denoised_d); common.lerp gives it bit for bit."""
    torch = _torch()
    from ksampler_rt.runtime.samplers.common import lerp

    rng = np.random.default_rng(5)
    starts = rng.uniform(-4, 4, 400).astype(F32)
    ends = rng.uniform(-4, 4, 400).astype(F32)
    for s, e in zip(starts, ends):
        got = lerp(s, e, weight)
        assert isinstance(got, np.float32)
        assert got == torch.lerp(torch.tensor(s), torch.tensor(e), weight).item(), (s, e, weight)
    want = torch.lerp(torch.from_numpy(starts), torch.from_numpy(ends), weight).numpy()
    got = lerp(starts, ends, weight)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_half_log_snr_is_torch_log_neg():
    """sigma.log().neg() and half_log_snr.neg().exp() on the SD1.5 sigma table, scalar and array."""
    torch = _torch()
    from ksampler_rt.runtime.model_sampling import ModelSamplingDiscrete
    from ksampler_rt.runtime.samplers.common import half_log_snr_to_sigma, sigma_to_half_log_snr

    sigmas = np.asarray(ModelSamplingDiscrete().sigmas, dtype=F32)
    want = np.array([torch.tensor(s).log().neg().item() for s in sigmas], dtype=F32)
    np.testing.assert_array_equal(np.array([sigma_to_half_log_snr(s) for s in sigmas]), want)
    np.testing.assert_array_equal(sigma_to_half_log_snr(sigmas), want)
    back = np.array([torch.tensor(v).neg().exp().item() for v in want], dtype=F32)
    # expf and exp rounded from float64 agree but for the rare inexact-tie case: at most 1 ulp, < 2 %
    for got in (np.array([half_log_snr_to_sigma(v) for v in want]), half_log_snr_to_sigma(want)):
        assert got.dtype == np.float32
        assert np.max(np.abs(got.view(np.int32) - back.view(np.int32))) <= 1
        assert np.mean(got != back) < 0.02


def _flow_samplings():
    from ksampler_rt.runtime.model_sampling import ModelSamplingDiscreteFlow, ModelSamplingFlux
    return [ModelSamplingDiscreteFlow(shift=3.0), ModelSamplingFlux(shift=1.15), ModelSamplingDiscreteFlow(1.0, 1.0)]


def _ulps(a, b):
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def test_flow_half_log_snr_is_torch_logit_neg():
    """For a CONST model ComfyUI's lambda is sigma.logit().neg() and its inverse half_log_snr.neg().sigmoid();
    checked on the SD3, FLUX.1 dev and schnell sigma tables plus sigma = 0, scalar (0-d tensors) and array."""
    torch = _torch()
    from ksampler_rt.runtime.samplers.common import half_log_snr_to_sigma, sigma_to_half_log_snr

    for ms in _flow_samplings():
        sigmas = np.append(np.asarray(ms.sigmas, dtype=F32), F32(0.0))
        want = np.array([torch.tensor(v).logit().neg().item() for v in sigmas], dtype=F32)
        scalar = np.array([sigma_to_half_log_snr(v, ms) for v in sigmas])
        array = sigma_to_half_log_snr(sigmas, ms)
        for got in (scalar, array):
            assert got.dtype == np.float32
            assert np.array_equal(np.isfinite(got), np.isfinite(want))
            assert np.array_equal(got[~np.isfinite(want)], want[~np.isfinite(want)])  # sigma 1 -> -inf, 0 -> inf
            fin = np.isfinite(want)
            assert np.max(_ulps(got[fin], want[fin])) <= 1 and np.mean(got[fin] != want[fin]) < 0.01
        lambdas = want[np.isfinite(want)]
        back = np.array([torch.tensor(v).neg().sigmoid().item() for v in lambdas], dtype=F32)
        scalar = np.array([half_log_snr_to_sigma(v, ms) for v in lambdas])
        assert np.max(_ulps(scalar, back)) <= 1 and np.mean(scalar != back) < 0.01
        # torch's vectorised sigmoid is itself up to 2 ulp off its scalar path
        back_array = torch.from_numpy(lambdas).neg().sigmoid().numpy()
        assert np.max(_ulps(half_log_snr_to_sigma(lambdas, ms), back_array)) <= 2
        # a VP model sampling (or none) keeps the -log branch
        assert sigma_to_half_log_snr(F32(0.5), None) == sigma_to_half_log_snr(F32(0.5)) == -np.log(F32(0.5))


def test_offset_first_sigma_for_snr():
    """ComfyUI: for a CONST model a first sigma >= 1 becomes percent_to_sigma(1e-4), in a copy; a first sigma
    below 1, a VP model and a one-sigma schedule are left alone."""
    from ksampler_rt.runtime.model_sampling import ModelSamplingDiscrete, ModelSamplingDiscreteFlow
    from ksampler_rt.runtime.samplers.common import offset_first_sigma_for_snr

    sd3 = ModelSamplingDiscreteFlow(shift=3.0)
    sigmas = np.array([1.0, 0.75, 0.0], dtype=F32)
    got = offset_first_sigma_for_snr(sigmas, sd3)
    assert got[0] == F32(3 * 0.9999 / (1 + 2 * 0.9999)) and np.array_equal(got[1:], sigmas[1:])
    assert sigmas[0] == 1.0 and got.dtype == np.float32  # the caller's schedule is not written
    above = np.array([1.5, 0.5], dtype=F32)
    assert offset_first_sigma_for_snr(above, sd3)[0] == F32(3 * 0.9999 / (1 + 2 * 0.9999))
    below = np.array([0.999, 0.5], dtype=F32)
    assert offset_first_sigma_for_snr(below, sd3) is below
    one = sigmas[:1]
    assert offset_first_sigma_for_snr(one, sd3) is one
    vp = np.array([14.6, 1.0, 0.0], dtype=F32)
    assert offset_first_sigma_for_snr(vp, ModelSamplingDiscrete()) is vp
    assert offset_first_sigma_for_snr(vp) is vp


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_get_ancestral_step_rf_is_comfyui_expression(eta):
    """The three scalars of ComfyUI's *_ancestral_RF samplers, written there on 0-d tensors."""
    torch = _torch()
    from ksampler_rt.runtime.samplers.common import get_ancestral_step_rf

    pairs = [(1.0, 0.9), (0.9, 0.75), (0.5, 0.25), (0.1, 0.01), (0.9997, 0.5)]
    for a, b in pairs:
        s0, s1 = torch.tensor(a), torch.tensor(b)
        downstep_ratio = 1 + (s1 / s0 - 1) * eta
        sigma_down = s1 * downstep_ratio
        alpha_ip1, alpha_down = 1 - s1, 1 - sigma_down
        renoise = (s1 ** 2 - sigma_down ** 2 * alpha_ip1 ** 2 / alpha_down ** 2) ** 0.5
        got = get_ancestral_step_rf(F32(a), F32(b), eta)
        want = (sigma_down.item(), (alpha_ip1 / alpha_down).item(), renoise.item())
        assert all(type(g) is np.float32 for g in got)
        assert [float(g) for g in got] == [float(F32(w)) for w in want], (a, b)


def test_expm1_phi_helpers_are_torch_scalar_expm1():
    """ComfyUI's ei_h_phi_1 / ei_h_phi_2 (SEEDS) and res_multistep's phi1_fn / phi2_fn run torch.expm1 on
    0-d tensors (libm expm1f). common's versions agree to 1 ulp on almost every input; numpy's float32
    np.expm1 (the old stochastic._phi1_h) is a different, CPU-dependent SIMD routine."""
    torch = _torch()
    from ksampler_rt.runtime.samplers.common import ei_h_phi_1, ei_h_phi_2, phi1, phi2

    hs = np.random.default_rng(9).uniform(-4.0, -1e-3, 3000).astype(F32)
    th = [torch.tensor(h) for h in hs]
    # max ulps: expm1 itself within 1; the phi_2 forms cancel (expm1(h) - h, phi_1 - 1), which turns that
    # 1 ulp into more ulps of a smaller result, on the same rare inputs
    cases = [
        (ei_h_phi_1, lambda t: torch.expm1(t), 1),
        (ei_h_phi_2, lambda t: (torch.expm1(t) - t) / t, 64),
        (phi1, lambda t: torch.expm1(t) / t, 1),
        (phi2, lambda t: (torch.expm1(t) / t - 1.0) / t, 64),
    ]
    for ours, theirs, max_ulps in cases:
        got = np.array([ours(h) for h in hs])
        assert got.dtype == np.float32
        want = np.array([theirs(t).item() for t in th], dtype=F32)
        ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32))
        assert ulps.max() <= max_ulps, (ours.__name__, ulps.max())
        assert np.mean(ulps != 0) < 0.01, (ours.__name__, np.mean(ulps != 0))
    # the array form (used on whole schedules) is the scalar one applied elementwise
    np.testing.assert_array_equal(ei_h_phi_1(hs), np.array([ei_h_phi_1(h) for h in hs]))
