"""The fused ancestral rectified-flow step (samplers.common.rf_step_renoise) against the numpy path."""
import numpy as np
import pytest

from ksampler_rt.runtime import fused_jit
from ksampler_rt.runtime.samplers import common
from ksampler_rt.runtime.samplers.common import get_ancestral_step_rf, rf_step, times

F32 = np.float32


def _numpy(x, sigma, sigma_to, d, ar, nz, s_noise, c):
    return ar * rf_step(x, sigma, sigma_to, d) + times(nz, s_noise, c)


@pytest.mark.skipif(not fused_jit.available(), reason="compiled kernels off")
@pytest.mark.parametrize("shape", [(1, 16, 16, 16), (1, 3, 7, 5), (2, 4, 9, 11), (1,)])
@pytest.mark.parametrize("s_noise", [1.0, 0.7, F32(1.3)])
def test_rf_step_renoise_bit_identical(shape, s_noise):
    rng = np.random.default_rng(sum(shape))
    x, d, nz = (rng.standard_normal(shape).astype(F32) * 3 for _ in range(3))
    for sigma, sigma_next, eta in ((0.9, 0.7, 1.0), (0.55, 0.31, 0.6), (0.12, 0.02, 1.0)):
        sigma, sigma_next = F32(sigma), F32(sigma_next)
        sd, ar, c = get_ancestral_step_rf(sigma, sigma_next, eta)
        got = fused_jit.rf_renoise(x, d, nz, sd / sigma, ar, s_noise, c)
        want = _numpy(x, sigma, sd, d, ar, nz, s_noise, c)
        assert got.dtype == want.dtype == F32
        assert np.array_equal(got, want)
        assert np.array_equal(common.rf_step_renoise(x, sigma, sd, d, ar, nz, s_noise, c), want)


def test_rf_step_renoise_falls_back_on_float64():
    rng = np.random.default_rng(1)
    x, nz = (rng.standard_normal((1, 4, 5, 3)).astype(F32) for _ in range(2))
    d = rng.standard_normal((1, 4, 5, 3))  # float64 denoiser output: numpy's promotions apply
    sd, ar, c = get_ancestral_step_rf(F32(0.8), F32(0.6), 1.0)
    got = common.rf_step_renoise(x, F32(0.8), sd, d, ar, nz, 1.0, c)
    want = _numpy(x, F32(0.8), sd, d, ar, nz, 1.0, c)
    assert got.dtype == want.dtype == np.float64
    assert np.array_equal(got, want)


SHAPES = [(1, 16, 16, 16), (1, 3, 7, 5), (2, 4, 9, 11)]


@pytest.mark.skipif(not fused_jit.available(), reason="compiled kernels off")
@pytest.mark.parametrize("shape", SHAPES)
def test_cfg_pp_renoise_bit_identical(shape):
    rng = np.random.default_rng(sum(shape) + 1)
    x, d, u, nz = (rng.standard_normal(shape).astype(F32) * 2 for _ in range(4))
    for s_noise in (1.0, 0.8):
        k = [F32(v) for v in (0.7, 0.31, 0.42, 0.25, 0.37)]  # sigma, alpha_s, alpha_t, sigma_down, sigma_up
        want = (k[2] * d + k[3] * ((x - k[1] * u) / k[0])) + nz * k[2] * F32(s_noise) * k[4]
        got = common.cfg_pp_renoise(x, d, u, k[0], k[1], k[2], k[3], nz, s_noise, k[4])
        assert got.dtype == F32 and np.array_equal(got, want)


class _Noise:
    def __init__(self, nz):
        self.nz = nz

    def __call__(self, sigma, sigma_next):
        return self.nz


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sigmas", [(0.9, 0.6), (14.6, 3.2), (0.4, 0.0)])
def test_ddpm_update_matches_numpy(shape, sigmas):
    """ddpm_update (fused or not) against ComfyUI's DDPMSampler_step written out in float32 numpy."""
    rng = np.random.default_rng(sum(shape) + 2)
    x, d, nz = (rng.standard_normal(shape).astype(F32) for _ in range(3))
    s, sn = F32(sigmas[0]), F32(sigmas[1])
    acp, acp_prev = F32(1) / (s * s + F32(1)), F32(1) / (sn * sn + F32(1))
    alpha = acp / acp_prev
    mu = F32(np.sqrt(F32(1) / alpha)) * (x / F32(np.sqrt(F32(1) + s * s))
                                         - (F32(1) - alpha) * ((x - d) / s) / F32(np.sqrt(F32(1) - acp)))
    if sn > 0:
        mu = mu + F32(np.sqrt((F32(1) - alpha) * (F32(1) - acp_prev) / (F32(1) - acp))) * nz
        mu = mu * F32(np.sqrt(F32(1) + sn * sn))
    got = common.ddpm_update(x, d, s, sn, _Noise(nz))
    assert got.dtype == F32 and np.array_equal(got, mu)


@pytest.mark.skipif(not fused_jit.available(), reason="compiled kernels off")
@pytest.mark.parametrize("shape", SHAPES)
def test_dpmpp_2m_cfg_pp_kernel_bit_identical(shape):
    rng = np.random.default_rng(sum(shape) + 3)
    x, d, u, o = (rng.standard_normal(shape).astype(F32) for _ in range(4))
    h, r = F32(0.37), F32(0.8)
    ne, mc, e = -F32(np.exp(-h)), F32(np.expm1(-h)) * (1 / (2 * r)), F32(np.exp(-h))
    want = d + (ne * u - mc * (d - o)) + e * x
    assert np.array_equal(fused_jit.dpmpp_2m_cfg_pp(x, d, u, o, ne, mc, e), want)


def _zero_cost_unet(x, timestep, context, **kw):
    t = np.asarray(timestep, F32).reshape(-1)[:, None, None, None]
    return (F32(0.9) * x + F32(0.1) * np.tanh(x) + t * F32(0.001)).astype(F32)


@pytest.mark.skipif(not fused_jit.available(), reason="compiled kernels off")
@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("sampler", ["euler_ancestral", "euler_ancestral_cfg_pp", "ddpm", "dpmpp_2m_cfg_pp"])
def test_ksampler_fused_bit_identical_to_numpy(monkeypatch, family, sampler):
    """The whole KSampler path with the fused passes against the numpy path (odd latent size)."""
    from ksampler_rt.runtime import Model, ksampler

    rng = np.random.default_rng(0)
    pooled = {"pooled_output": rng.standard_normal((1, 8)).astype(F32)} if family == "flux" else {}
    pos, neg = ([[rng.standard_normal((1, 7, 16)).astype(F32), dict(pooled)]] for _ in range(2))
    ch = 16 if family == "flux" else 4
    latent = {"samples": rng.standard_normal((1, ch, 33, 21)).astype(F32)}
    model = Model(_zero_cost_unet, family=family)

    def run():
        return [ksampler(model, 9, s, 3.0, sampler, "normal", pos, neg, latent, denoise=0.8)["samples"]
                for s in (1, 2, 5)]

    fused = run()
    monkeypatch.setattr(fused_jit, "available", lambda: False)
    for got, ref in zip(fused, run()):
        assert got.tobytes() == ref.tobytes()


def test_renoise_passes_stand_aside_for_a_float64_s_noise():
    """np.float64 subclasses float, but numpy widens a float32 array times a float64 scalar: the compiled
    passes must leave such an s_noise to the numpy path (float64 result), not round it to float32."""
    rng = np.random.default_rng(2)
    x, d, u, nz = (rng.standard_normal((1, 4, 5, 3)).astype(F32) for _ in range(4))
    sd, ar, c = get_ancestral_step_rf(F32(0.8), F32(0.6), 1.0)
    s_noise = np.float64(0.9)
    got = common.rf_step_renoise(x, F32(0.8), sd, d, ar, nz, s_noise, c)
    want = _numpy(x, F32(0.8), sd, d, ar, nz, s_noise, c)
    assert got.dtype == want.dtype == np.float64 and np.array_equal(got, want)
    k = [F32(v) for v in (0.7, 0.31, 0.42, 0.25, 0.37)]
    got = common.cfg_pp_renoise(x, d, u, k[0], k[1], k[2], k[3], nz, s_noise, k[4])
    assert got.dtype == np.float64
    assert np.array_equal(got, (k[2] * d + k[3] * ((x - k[1] * u) / k[0])) + nz * k[2] * s_noise * k[4])
