"""DPM-Solver++ samplers (Lu et al. 2022, arXiv:2211.01095) in data prediction and t = -log sigma.

Each function follows the sampler contract of :mod:`ksampler_rt.runtime.samplers` and reproduces the
ComfyUI 0.3.64 function of the same name in ``comfy/k_diffusion/sampling.py`` (k-diffusion by
Katherine Crowson), including where noise is drawn and the float32 order of its arithmetic. On a CPU
run the ``*_gpu`` variants (Brownian tree on x's device) are the same as the plain ones.
"""
from __future__ import annotations

from .. import fused_jit
from .common import (
    brownian_bounds, exp, expm1, f32, get_ancestral_step, get_ancestral_step_rf, half_log_snr_to_sigma, is_flow, log,
    notify, offset_first_sigma_for_snr, rf_step, sigma_to_half_log_snr, sqrt, times, to_d,
)
from .spec import SamplerSpec

t_fn = sigma_to_half_log_snr   # t = lambda = -log sigma (VP; given the model sampling, -logit sigma for flow)
sigma_fn = half_log_snr_to_sigma


def _dpmpp_1(x, t, t_next, denoised):
    """First-order DPM-Solver++ step (= DDIM): x_t = (sigma_t / sigma_s) x - expm1(-h) D."""
    h = t_next - t
    return (sigma_fn(t_next) / sigma_fn(t)) * x - expm1(-h) * denoised


# -- DPM-Solver++(2S) ancestral -------------------------------------------------------------------------

def sample_dpmpp_2s_ancestral(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver++(2S) single-step second-order steps to sigma_down (r = 1/2).
    A flow model takes ComfyUI's separate rectified-flow branch (:func:`sample_dpmpp_2s_ancestral_RF`)."""
    if is_flow(model.model_sampling):
        return sample_dpmpp_2s_ancestral_RF(model, x, sigmas, noise, callback, eta=eta, s_noise=s_noise)
    noise_sampler = noise.default(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        notify(callback, i, x, denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            t, t_next = t_fn(sigma), t_fn(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - expm1(-h * 0.5) * denoised
            denoised_2 = model(x_2, sigma_fn(s))
            x = _dpmpp_1(x, t, t_next, denoised_2)
        if sigma_next > 0:
            x = x + times(noise_sampler(sigma, sigma_next), s_noise, sigma_up)
    return x


def _rf_lambda(sigma):
    """log((1 - sigma) / sigma): the half-log-SNR as ComfyUI's 2S RF branch writes it (its own float32
    rounding, not the ``-logit`` of :func:`sigma_to_half_log_snr`)."""
    return log((1 - sigma) / sigma)


def sample_dpmpp_2s_ancestral_RF(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0):
    """ComfyUI's ``sample_dpmpp_2s_ancestral_RF`` (flow models): flow steps through the half-log-SNR
    midpoint sigma_s (0.9999 when sigma = 1, whose lambda is -inf) to the flow sigma_down, then the
    rescale by (1 - sigma_next) / (1 - sigma_down) and renoising; Euler on the step to sigma = 0."""
    noise_sampler = noise.default(x)
    ms = model.model_sampling
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        sigma_down, alpha_ratio, renoise_coeff = get_ancestral_step_rf(sigma, sigma_next, eta)
        notify(callback, i, x, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            if sigma == 1:
                sigma_s = f32(0.9999)
            else:
                t_i, t_down = _rf_lambda(sigma), _rf_lambda(sigma_down)
                sigma_s = sigma_fn(t_i + 0.5 * (t_down - t_i), ms)
            denoised_2 = model(rf_step(x, sigma, sigma_s, denoised), sigma_s)
            x = rf_step(x, sigma, sigma_down, denoised_2)
        if sigma_next > 0 and eta > 0:
            x = alpha_ratio * x + times(noise_sampler(sigma, sigma_next), s_noise, renoise_coeff)
    return x


def sample_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0):
    """CFG++ DPM-Solver++(2S) ancestral: x is shifted by (D - D_uncond) before each sub-step.

    As in ComfyUI, the shift of the second sub-step uses the *midpoint* call's unconditional D (its
    post-CFG hook has overwritten the first one by then) with the first call's guided D."""
    noise_sampler = noise.default(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised, uncond_denoised = model.with_uncond(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        notify(callback, i, x, denoised)
        if sigma_down == 0:
            x = denoised + to_d(x, sigma, uncond_denoised) * sigma_down
        else:
            t, t_next = t_fn(sigma), t_fn(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * (x + (denoised - uncond_denoised)) - expm1(-h * 0.5) * denoised
            denoised_2, uncond_denoised_2 = model.with_uncond(x_2, sigma_fn(s))
            x = (sigma_fn(t_next) / sigma_fn(t)) * (x + (denoised - uncond_denoised_2)) - expm1(-h) * denoised_2
        if sigma_next > 0:
            x = x + times(noise_sampler(sigma, sigma_next), s_noise, sigma_up)
    return x


# -- DPM-Solver++ SDE (single step, r = 1/2) -------------------------------------------------------------

def sample_dpmpp_sde(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0, r=1 / 2):
    """DPM-Solver++ (stochastic): a noisy first-order step to lambda_s + r h, a second D there, then the
    noisy second-order step to lambda_t; Brownian-tree noise on [smallest positive sigma, max sigma]."""
    if len(sigmas) <= 1:
        return x
    noise_sampler = noise.brownian(x, *brownian_bounds(sigmas))
    ms = model.model_sampling
    sigmas = offset_first_sigma_for_snr(sigmas, ms)
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        notify(callback, i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        lambda_s, lambda_t = t_fn(sigma, ms), t_fn(sigma_next, ms)
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        sigma_s_1 = sigma_fn(lambda_s_1, ms)
        alpha_s = sigma * exp(lambda_s)
        alpha_s_1 = sigma_s_1 * exp(lambda_s_1)
        alpha_t = sigma_next * exp(lambda_t)

        # Step 1 (the ancestral split is in exp(-lambda) whatever the model, as in ComfyUI)
        sd, su = get_ancestral_step(sigma_fn(lambda_s), sigma_fn(lambda_s_1), eta)
        h_ = t_fn(sd) - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * exp(-h_) * x - alpha_s_1 * expm1(-h_) * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + times(noise_sampler(sigma, sigma_s_1), alpha_s_1, s_noise, su)
        denoised_2 = model(x_2, sigma_s_1)

        # Step 2
        sd, su = get_ancestral_step(sigma_fn(lambda_s), sigma_fn(lambda_t), eta)
        h_ = t_fn(sd) - lambda_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * exp(-h_) * x - alpha_t * expm1(-h_) * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + times(noise_sampler(sigma, sigma_next), alpha_t, s_noise, su)
    return x


# -- DPM-Solver++(2M) -------------------------------------------------------------------------------------

def sample_dpmpp_2m(model, x, sigmas, noise, callback=None):
    """DPM-Solver++(2M): second-order multistep with D_d = (1 + 1/2r) D - (1/2r) D_prev, r = h_prev / h;
    first order on the first step and on the step to sigma = 0."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        notify(callback, i, x, denoised)
        t, t_next = t_fn(sigma), t_fn(sigma_next)
        if old_denoised is None or sigma_next == 0:
            x = _dpmpp_1(x, t, t_next, denoised)
        else:
            r = (t - t_fn(f32(sigmas[i - 1]))) / (t_next - t)
            x = _dpmpp_1(x, t, t_next, (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised)
        old_denoised = denoised
    return x


def sample_dpmpp_2m_cfg_pp(model, x, sigmas, noise, callback=None):
    """CFG++ DPM-Solver++(2M): the exponential step pulls x along the unconditional D and lands on the guided one."""
    old_uncond_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised, uncond_denoised = model.with_uncond(x, sigma)
        notify(callback, i, x, denoised)
        t, t_next = t_fn(sigma), t_fn(sigma_next)
        h = t_next - t
        if old_uncond_denoised is None or sigma_next == 0:
            denoised_mix = -exp(-h) * uncond_denoised
        else:
            r = (t - t_fn(f32(sigmas[i - 1]))) / h
            ne, mc, e = -exp(-h), expm1(-h) * (1 / (2 * r)), exp(-h)
            if fused_jit.scalars_f32(ne, mc, e) and fused_jit.ready(x, denoised, uncond_denoised, old_uncond_denoised):
                x, old_uncond_denoised = fused_jit.dpmpp_2m_cfg_pp(
                    x, denoised, uncond_denoised, old_uncond_denoised, ne, mc, e), uncond_denoised
                continue  # one compiled pass, bit-identical to the numpy expressions below
            denoised_mix = ne * uncond_denoised - mc * (denoised - old_uncond_denoised)
        x = denoised + denoised_mix + exp(-h) * x
        old_uncond_denoised = uncond_denoised
    return x


# -- DPM-Solver++(2M) SDE and (3M) SDE ----------------------------------------------------------------------

def _sde_noise_term(noise_sampler, sigma, sigma_next, h, eta, s_noise):
    """The SDE's fresh noise for a step: n * sigma_t * sqrt(1 - exp(-2 h eta)) * s_noise."""
    return times(noise_sampler(sigma, sigma_next), sigma_next, sqrt(-expm1(-2 * h * eta)), s_noise)


def sample_dpmpp_2m_sde(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE with the midpoint or Heun correction; the last step returns D."""
    if len(sigmas) <= 1:
        return x
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    noise_sampler = noise.brownian(x, *brownian_bounds(sigmas))
    ms = model.model_sampling
    sigmas = offset_first_sigma_for_snr(sigmas, ms)
    old_denoised, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        notify(callback, i, x, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            lambda_s, lambda_t = t_fn(sigma, ms), t_fn(sigma_next, ms)
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigma_next * exp(lambda_t)
            phi_1 = -expm1(-h_eta)
            x = sigma_next / sigma * exp(-h * eta) * x + alpha_t * phi_1 * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * (phi_1 / -h_eta + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * phi_1 * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = x + _sde_noise_term(noise_sampler, sigma, sigma_next, h, eta, s_noise)
        old_denoised = denoised
        h_last = h
    return x


def sample_dpmpp_2m_sde_heun(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE with the Heun-type correction."""
    return sample_dpmpp_2m_sde(model, x, sigmas, noise, callback, eta=eta, s_noise=s_noise, solver_type="heun")


def sample_dpmpp_3m_sde(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: third-order multistep from two past D's (second order after one);
    the last step returns D."""
    if len(sigmas) <= 1:
        return x
    noise_sampler = noise.brownian(x, *brownian_bounds(sigmas))
    ms = model.model_sampling
    sigmas = offset_first_sigma_for_snr(sigmas, ms)
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        notify(callback, i, x, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            lambda_s, lambda_t = t_fn(sigma, ms), t_fn(sigma_next, ms)
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigma_next * exp(lambda_t)
            x = sigma_next / sigma * exp(-h * eta) * x + alpha_t * -expm1(-h_eta) * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                phi_2 = expm1(-h_eta) / h_eta + 1
                x = x + (alpha_t * phi_2) * d
            if eta > 0 and s_noise > 0:
                x = x + _sde_noise_term(noise_sampler, sigma, sigma_next, h, eta, s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


SAMPLERS: dict[str, SamplerSpec] = {
    "dpmpp_2s_ancestral": SamplerSpec(sample_dpmpp_2s_ancestral),
    "dpmpp_2s_ancestral_cfg_pp": SamplerSpec(sample_dpmpp_2s_ancestral_cfg_pp, cfg_pp=True),
    "dpmpp_sde": SamplerSpec(sample_dpmpp_sde),
    "dpmpp_sde_gpu": SamplerSpec(sample_dpmpp_sde),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m),
    "dpmpp_2m_cfg_pp": SamplerSpec(sample_dpmpp_2m_cfg_pp, cfg_pp=True),
    "dpmpp_2m_sde": SamplerSpec(sample_dpmpp_2m_sde),
    "dpmpp_2m_sde_gpu": SamplerSpec(sample_dpmpp_2m_sde),
    "dpmpp_2m_sde_heun": SamplerSpec(sample_dpmpp_2m_sde_heun),
    "dpmpp_2m_sde_heun_gpu": SamplerSpec(sample_dpmpp_2m_sde_heun),
    "dpmpp_3m_sde": SamplerSpec(sample_dpmpp_3m_sde),
    "dpmpp_3m_sde_gpu": SamplerSpec(sample_dpmpp_3m_sde),
}
