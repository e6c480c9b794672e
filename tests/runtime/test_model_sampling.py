"""ModelSamplingDiscrete vs ComfyUI 0.3.64 comfy/model_sampling.py (§3 of comfyui-sampling.md)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ksampler_rt.runtime.model_sampling import FAMILIES, ModelSamplingDiscrete, get_family


@pytest.fixture(scope="module")
def ms():
    return ModelSamplingDiscrete()


def test_table_float32_and_endpoints(ms):
    assert ms.sigmas.dtype == np.float32 and ms.log_sigmas.dtype == np.float32
    assert ms.sigmas.shape == (1000,) and np.all(np.diff(ms.sigmas) > 0)
    assert float(ms.sigma_min) == pytest.approx(0.0291671585, rel=1e-7)
    assert float(ms.sigma_max) == pytest.approx(14.6146412, rel=1e-7)


def test_table_hand_math(ms):
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2
    ac = np.cumprod(1 - betas)
    s64 = np.sqrt((1 - ac) / ac)
    assert np.array_equal(ms.sigmas, s64.astype(np.float32))
    assert np.array_equal(ms.log_sigmas, np.log(s64).astype(np.float32))  # log before the cast


def test_table_vs_diffusers_scaled_linear(ms):
    """diffusers' DDPMScheduler(beta_schedule="scaled_linear") builds the same betas in float32."""
    torch = pytest.importorskip("torch")
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    sig = (((1 - ac) / ac) ** 0.5).numpy()
    np.testing.assert_allclose(ms.sigmas, sig, rtol=2e-5)
    # and the float64 schedule ComfyUI builds (make_beta_schedule("linear")) bit for bit
    b64 = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac64 = torch.cumprod(1.0 - b64, dim=0)
    s64 = ((1 - ac64) / ac64) ** 0.5
    assert np.array_equal(ms.sigmas, s64.float().numpy())
    assert np.array_equal(ms.log_sigmas, s64.log().float().numpy())


def test_timestep_exact_table_entries(ms):
    idx = np.array([0, 1, 2, 10, 500, 998, 999])
    t = ms.timestep(ms.sigmas[idx])
    assert t.dtype == np.float32 and np.array_equal(t, idx.astype(np.float32))


def test_timestep_nearest_no_interpolation(ms):
    # geometric midpoint of two table entries, nudged either way
    lo, hi = ms.sigmas[400], ms.sigmas[401]
    mid = math.sqrt(float(lo) * float(hi))
    assert ms.timestep(np.float32(mid * 0.999)) == 400
    assert ms.timestep(np.float32(mid * 1.001)) == 401
    # karras sigmas all map to integer timesteps
    ramp = np.linspace(0, 1, 17)
    sig = (14.6146 ** (1 / 7) + ramp * (0.0292 ** (1 / 7) - 14.6146 ** (1 / 7))) ** 7
    t = ms.timestep(sig.astype(np.float32))
    assert t.shape == (17,) and np.array_equal(t, np.round(t)) and t[0] == 999 and t[-1] == 0
    # clamps outside the table
    assert ms.timestep(np.float32(1000.0)) == 999 and ms.timestep(np.float32(1e-4)) == 0


def test_timestep_vs_torch(ms):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    sig = np.exp(rng.uniform(np.log(0.02), np.log(20), 2000)).astype(np.float32)
    ls = torch.from_numpy(ms.log_sigmas)
    ref = (torch.from_numpy(sig).log() - ls[:, None]).abs().argmin(dim=0).numpy()
    assert np.array_equal(ms.timestep(sig), ref.astype(np.float32))


def test_sigma_log_interp(ms):
    assert ms.sigma(np.float32(10.0)) == pytest.approx(float(ms.sigmas[10]), rel=1e-6)
    expected = math.exp(0.5 * (float(ms.log_sigmas[10]) + float(ms.log_sigmas[11])))
    assert float(ms.sigma(np.float32(10.5))) == pytest.approx(expected, rel=1e-6)
    expected = math.exp(0.75 * float(ms.log_sigmas[3]) + 0.25 * float(ms.log_sigmas[4]))
    assert float(ms.sigma(np.float32(3.25))) == pytest.approx(expected, rel=1e-6)
    assert ms.sigma(np.float32(-5.0)) == ms.sigma(np.float32(0.0))
    assert ms.sigma(np.float32(5000.0)) == ms.sigma(np.float32(999.0))
    out = ms.sigma(np.array([0.0, 499.5, 999.0], np.float32))
    assert out.dtype == np.float32 and out.shape == (3,)


def test_sigma_vs_torch(ms):
    torch = pytest.importorskip("torch")
    ts = np.linspace(0, 999, 4001, dtype=np.float32)
    ls = torch.from_numpy(ms.log_sigmas)
    t = torch.from_numpy(ts)
    w = t.frac()
    ref = ((1 - w) * ls[t.floor().long()] + w * ls[t.ceil().long()]).exp().numpy()
    ours = ms.sigma(ts)
    np.testing.assert_allclose(ours, ref, rtol=2.5e-7, atol=0)  # torch's float32 exp is ~1 ulp
    assert np.mean(ours == ref) > 0.9


def test_percent_to_sigma(ms):
    assert ms.percent_to_sigma(0.0) == 999999999.9
    assert ms.percent_to_sigma(-1.0) == 999999999.9
    assert ms.percent_to_sigma(1.0) == 0.0
    assert ms.percent_to_sigma(0.5) == pytest.approx(float(ms.sigma(np.float32(499.5))), rel=1e-7)


def test_eps_formulas(ms):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    out = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    s = np.float32(3.5)
    np.testing.assert_allclose(ms.calculate_input(s, x), x / math.sqrt(3.5 ** 2 + 1), rtol=1e-6)
    np.testing.assert_allclose(ms.calculate_denoised(s, out, x), x - 3.5 * out, rtol=1e-6, atol=1e-6)
    noise = out
    np.testing.assert_allclose(ms.noise_scaling(s, noise, x, max_denoise=True), noise * math.sqrt(1 + 3.5 ** 2) + x,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ms.noise_scaling(s, noise, x, max_denoise=False), noise * 3.5 + x, rtol=1e-6, atol=1e-6)
    assert ms.inverse_noise_scaling(s, x) is x
    # per-row sigma broadcasts over the batch
    per_row = np.array([1.0, 2.0], np.float32)
    d = ms.calculate_denoised(per_row, out, x)
    np.testing.assert_allclose(d[1], x[1] - 2.0 * out[1], rtol=1e-6, atol=1e-6)


def test_v_prediction_denoised_hand_math():
    ms = ModelSamplingDiscrete(prediction="v")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 4, 2, 2)).astype(np.float32)
    v = rng.standard_normal((1, 4, 2, 2)).astype(np.float32)
    for s in (0.03, 1.0, 14.6):
        # x0 = c_skip * x - c_out * v with c_skip = 1/(s^2+1), c_out = s/sqrt(s^2+1) (sigma_data = 1)
        expected = x.astype(np.float64) / (s * s + 1) - v.astype(np.float64) * s / math.sqrt(s * s + 1)
        np.testing.assert_allclose(ms.calculate_denoised(np.float32(s), v, x), expected, rtol=1e-5, atol=1e-6)
    # at sigma = 1: (x - v) / 2 * ... = x/2 - v/sqrt(2)
    np.testing.assert_allclose(ms.calculate_denoised(np.float32(1.0), v, x), x / 2 - v / math.sqrt(2), rtol=1e-6,
                               atol=1e-6)


def test_zsnr():
    ms = ModelSamplingDiscrete(zsnr=True)
    smax = float(ms.sigma_max)
    assert smax == pytest.approx(math.sqrt((1 - 4.8973451890853435e-08) / 4.8973451890853435e-08), rel=1e-6)
    assert 4400 < smax < 4600
    # the first entry is unchanged by the rescale
    assert float(ms.sigma_min) == pytest.approx(float(ModelSamplingDiscrete().sigma_min), rel=1e-6)
    assert np.all(np.diff(ms.sigmas) > 0)
    assert ms.timestep(np.float32(smax)) == 999


def test_zsnr_vs_torch():
    torch = pytest.importorskip("torch")
    b = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - b, dim=0)
    s = ((1 - ac) / ac) ** 0.5
    r = (1 / (s * s + 1)).sqrt()
    r0, rT = r[0].clone(), r[-1].clone()
    r -= rT
    r *= r0 / (r0 - rT)
    a = r ** 2
    a[-1] = 4.8973451890853435e-08
    s = ((1 - a) / a) ** 0.5
    ms = ModelSamplingDiscrete(zsnr=True)
    np.testing.assert_array_equal(ms.sigmas, s.float().numpy())
    np.testing.assert_array_equal(ms.log_sigmas, s.log().float().numpy())


def test_validation_and_families():
    with pytest.raises(ValueError, match="prediction"):
        ModelSamplingDiscrete(prediction="x0")
    assert get_family("sdxl").adm_channels == 2816 and get_family("sdxl-refiner").adm_channels == 2560
    assert FAMILIES["sd15"].latent_scale == 0.18215 and FAMILIES["sdxl"].latent_scale == 0.13025
    with pytest.raises(ValueError, match="family"):
        get_family("flux-dev")
