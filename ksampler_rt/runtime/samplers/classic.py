"""The classic k-diffusion samplers: Euler, Heun, DPM-Solver-2, LMS, DPM-Solver fast/adaptive, DDPM, LCM.

Each function follows the sampler contract of :mod:`ksampler_rt.runtime.samplers` and reproduces the
ComfyUI 0.3.64 function of the same name in ``comfy/k_diffusion/sampling.py`` (k-diffusion by
Katherine Crowson), including where it draws noise and the float32 order of its arithmetic. ``ddim``
is ComfyUI's euler (``comfy/samplers.py: sampler_object``); ``dpm_fast`` / ``dpm_adaptive`` include the
wrappers of ``comfy/samplers.py: ksampler``. ``exp_heun_2_x0(_sde)`` are the SEEDS-2 special cases
newer ComfyUI adds (r = 1, phi_2 corrector), calling :func:`.stochastic.sample_seeds_2` as ComfyUI does.
For flow (CONST) models euler_ancestral and dpm_2_ancestral take ComfyUI's separate ``*_RF`` functions,
and the CFG++ Euler samplers use the model sampling's half-log-SNR (alpha = 1 - sigma).
"""
from __future__ import annotations

import numpy as np
from scipy import integrate

from .. import fused_steps
from .common import (
    F32, cfg_pp_renoise, ddpm_update, exp, f32, get_ancestral_step, get_ancestral_step_rf, half_log_snr_to_sigma,
    is_flow, lerp, log, notify, rf_step, rf_step_renoise, schedule_cached, sigma_to_half_log_snr, times, to_d,
    torch_linspace,
)
from .dpm_solver import (
    DPM_SOLVER_STEPS, PIDStepSizeController, dpm_sigma_range, dpm_solver_1_step, dpm_solver_2_step,
    dpm_solver_3_step, eps_cache, rms_error,
)
from .spec import SamplerSpec
from .stochastic import sample_seeds_2


# -- Euler family ----------------------------------------------------------------------------------

def sample_euler(model, x, sigmas, noise, callback=None):
    """Karras et al. (2022) Algorithm 2 with Euler steps (s_churn = 0): x += (x - D) / sigma * dt."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        d = to_d(x, sigma, denoised)
        notify(callback, i, x, denoised)
        x = x + d * (sigma_next - sigma)
    return x


def sample_euler_ancestral(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0):
    """Euler to sigma_down, then fresh noise of std sigma_up; the last step returns D.
    A flow model takes ComfyUI's separate rectified-flow branch (:func:`sample_euler_ancestral_RF`)."""
    if is_flow(model.model_sampling):
        return sample_euler_ancestral_RF(model, x, sigmas, noise, callback, eta=eta, s_noise=s_noise)
    noise_sampler = noise.default(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        notify(callback, i, x, denoised)
        if sigma_down == 0:
            x = denoised
        else:
            d = to_d(x, sigma, denoised)
            x = x + d * (sigma_down - sigma) + times(noise_sampler(sigma, sigma_next), s_noise, sigma_up)
    return x


def sample_euler_ancestral_RF(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0):
    """ComfyUI's ``sample_euler_ancestral_RF`` (flow models): the flow step to sigma_down, then x is
    rescaled by (1 - sigma_next) / (1 - sigma_down) and renoised; the last step returns D."""
    noise_sampler = noise.default(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        notify(callback, i, x, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            sigma_down, alpha_ratio, renoise_coeff = get_ancestral_step_rf(sigma, sigma_next, eta)
            x = (rf_step_renoise(x, sigma, sigma_down, denoised, alpha_ratio, noise_sampler(sigma, sigma_next),
                                 s_noise, renoise_coeff) if eta > 0 else rf_step(x, sigma, sigma_down, denoised))
    return x


def sample_euler_ancestral_cfg_pp(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0):
    """CFG++ (Chung et al. 2024) ancestral Euler: the direction uses the unconditional D, the
    target the guided one, written as a DDIM step in VP space (alpha = sigma * exp(lambda), lambda the
    model sampling's half-log-SNR: 1 - sigma for a flow model)."""
    noise_sampler = noise.default(x)
    ms = model.model_sampling
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised, uncond_denoised = model.with_uncond(x, sigma)
        notify(callback, i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        alpha_s = sigma * exp(sigma_to_half_log_snr(sigma, ms))
        alpha_t = sigma_next * exp(sigma_to_half_log_snr(sigma_next, ms))
        # a flow model's sigma = 1 has alpha_s = 0: sigma / alpha_s = inf gives (0, sigma_next), as in torch
        with np.errstate(divide="ignore", invalid="ignore"):
            sigma_down, sigma_up = get_ancestral_step(sigma / alpha_s, sigma_next / alpha_t, eta)
        sigma_down = alpha_t * sigma_down
        if eta > 0 and s_noise > 0:
            x = cfg_pp_renoise(x, denoised, uncond_denoised, sigma, alpha_s, alpha_t, sigma_down,
                               noise_sampler(sigma, sigma_next), s_noise, sigma_up)
        else:
            x = alpha_t * denoised + sigma_down * to_d(x, sigma, alpha_s * uncond_denoised)
    return x


def sample_euler_cfg_pp(model, x, sigmas, noise, callback=None):
    """CFG++ Euler: the ancestral CFG++ step with eta = 0 (ComfyUI's sample_euler_cfg_pp)."""
    return sample_euler_ancestral_cfg_pp(model, x, sigmas, noise, callback, eta=0.0, s_noise=0.0)


# -- Heun family -----------------------------------------------------------------------------------

def sample_heun(model, x, sigmas, noise, callback=None):
    """Karras et al. (2022) Algorithm 2 (s_churn = 0): Heun's method, Euler on the step to sigma = 0."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        d = to_d(x, sigma, denoised)
        notify(callback, i, x, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, model(x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
    return x


def sample_heunpp2(model, x, sigmas, noise, callback=None):
    """Heun++ (sd-webui-samplers-scheduler, MIT): three slopes at sigma_i, sigma_{i+1}, sigma_{i+2}
    weighted by sigma / (3 sigma_0); Heun with weight sigma / (2 sigma_0) on the step before the last,
    Euler on the last. (ComfyUI also draws an unused randn_like(x) from the global generator each step.)"""
    s_end = f32(sigmas[-1])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        d = to_d(x, sigma, denoised)
        notify(callback, i, x, denoised)
        dt = sigma_next - sigma
        if sigma_next == s_end:
            x = x + d * dt
        elif f32(sigmas[i + 2]) == s_end:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, model(x_2, sigma_next))
            w2 = sigma_next / (2 * f32(sigmas[0]))
            w1 = 1 - w2
            x = x + (d * w1 + d_2 * w2) * dt
        else:
            sigma_next2 = f32(sigmas[i + 2])
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, model(x_2, sigma_next))
            x_3 = x_2 + d_2 * (sigma_next2 - sigma_next)
            d_3 = to_d(x_3, sigma_next2, model(x_3, sigma_next2))
            w = 3 * f32(sigmas[0])
            w2, w3 = sigma_next / w, sigma_next2 / w
            w1 = 1 - w2 - w3
            x = x + (w1 * d + w2 * d_2 + w3 * d_3) * dt
    return x


# -- DPM-Solver-2 (Karras-style) --------------------------------------------------------------------

def _log_midpoint(sigma_a, sigma_b):
    """exp(lerp(log a, log b, 1/2)): the geometric midpoint DPM-Solver-2 evaluates at."""
    return exp(lerp(log(sigma_a), log(sigma_b), 0.5))


def _dpm_2_step(model, x, sigma, sigma_to, d):
    """One DPM-Solver-2 step from sigma to sigma_to: slope at the log-midpoint, applied over the whole step."""
    sigma_mid = _log_midpoint(sigma, sigma_to)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid))
    return x + d_2 * (sigma_to - sigma)


def sample_dpm_2(model, x, sigmas, noise, callback=None):
    """A sampler inspired by DPM-Solver-2 and Karras et al. (2022) Algorithm 2 (s_churn = 0)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        d = to_d(x, sigma, denoised)
        notify(callback, i, x, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            x = _dpm_2_step(model, x, sigma, sigma_next, d)
    return x


def sample_dpm_2_ancestral(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver-2 steps to sigma_down plus noise of std sigma_up.
    A flow model takes ComfyUI's separate rectified-flow branch (:func:`sample_dpm_2_ancestral_RF`)."""
    if is_flow(model.model_sampling):
        return sample_dpm_2_ancestral_RF(model, x, sigmas, noise, callback, eta=eta, s_noise=s_noise)
    noise_sampler = noise.default(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        notify(callback, i, x, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            x = _dpm_2_step(model, x, sigma, sigma_down, d)
            x = x + times(noise_sampler(sigma, sigma_next), s_noise, sigma_up)
    return x


def sample_dpm_2_ancestral_RF(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0):
    """ComfyUI's ``sample_dpm_2_ancestral_RF`` (flow models): DPM-Solver-2 to the flow sigma_down, then
    the rescale by (1 - sigma_next) / (1 - sigma_down) and renoising."""
    noise_sampler = noise.default(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        sigma_down, alpha_ratio, renoise_coeff = get_ancestral_step_rf(sigma, sigma_next, eta)
        notify(callback, i, x, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            x = _dpm_2_step(model, x, sigma, sigma_down, d)
            x = alpha_ratio * x + times(noise_sampler(sigma, sigma_next), s_noise, renoise_coeff)
    return x


# -- Linear multistep ---------------------------------------------------------------------------------

def linear_multistep_coeff(order: int, t: np.ndarray, i: int, j: int) -> float:
    """Adams-Bashforth weight of slope i - j over [t_i, t_{i+1}]: the integral of its Lagrange basis
    polynomial, by scipy's adaptive quadrature (epsrel 1e-4) on the float32 sigmas, as k-diffusion."""
    if order - 1 > i:
        raise ValueError(f"order: received {order} at step {i}, expected at most {i + 1}")

    def basis(tau):
        prod = 1.0
        for k in range(order):
            if j != k:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


@schedule_cached()
def lms_coefficients(t: np.ndarray, order: int) -> list:
    """Every step's Adams-Bashforth weights (newest slope first; none for a step to sigma 0)."""
    return [[linear_multistep_coeff(min(i + 1, order), t, i, j) for j in range(min(i + 1, order))]
            if t[i + 1] != 0 else [] for i in range(len(t) - 1)]


def sample_lms(model, x, sigmas, noise, callback=None, order=4):
    """Linear multistep (order 4) on the Karras ODE; the last step returns D.
    The coefficients depend on the schedule only, so they are all computed before the first model call."""
    t = np.asarray(sigmas, dtype=F32)
    coeffs = lms_coefficients(t, order)
    ds = []
    for i in range(len(sigmas) - 1):
        sigma = f32(sigmas[i])
        denoised = model(x, sigma)
        notify(callback, i, x, denoised)
        if t[i + 1] != 0 and 1 <= len(coeffs[i]) <= 4 and fused_steps.ready(x, denoised, *ds):
            # slope and update in one pass, the same float32 operations as below
            older = ds[::-1][:len(coeffs[i]) - 1]
            x, d = fused_steps.lms_step(x, denoised, sigma, older, coeffs[i])
            ds = (ds + [d])[-order:]
            continue
        ds.append(to_d(x, sigma, denoised))
        if len(ds) > order:
            ds.pop(0)
        if t[i + 1] == 0:
            x = denoised
        else:
            x = x + sum(coeff * d for coeff, d in zip(coeffs[i], reversed(ds)))
    return x


# -- DPM-Solver (Lu et al. 2022, arXiv:2206.00927) in t = -log sigma; its steps are in .dpm_solver ------

def sample_dpm_fast(model, x, sigmas, noise, callback=None):
    """DPM-Solver-fast: n = len(sigmas) - 1 model calls spread over floor(n/3) + 1 steps uniform in
    t = -log sigma from sigma_max to sigma_min, orders 3, ..., 3 then [2, 1] (n % 3 == 0) or [n % 3].
    Only the two ends of the schedule matter. ComfyUI adds eta = 0 times fresh default noise after each
    step, which leaves x unchanged, so no noise is drawn here."""
    if len(sigmas) <= 1:
        return x
    sigma_min, sigma_max = dpm_sigma_range(sigmas)
    nfe = len(sigmas) - 1
    noise.default(x)  # where ComfyUI builds its (eta = 0, so unused) noise sampler
    m = nfe // 3 + 1
    ts = torch_linspace(sigma_to_half_log_snr(sigma_max), sigma_to_half_log_snr(sigma_min), m + 1)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        eps = eps_cache(model)
        t, t_next = ts[i], ts[i + 1]
        if callback is not None:  # D only for the callback: the steps read eps
            callback(i, x, x - half_log_snr_to_sigma(t) * eps("eps", x, t))
        x = DPM_SOLVER_STEPS[order](eps, x, t, t_next)
    return x


def sample_dpm_adaptive(model, x, sigmas, noise, callback=None, order=3, rtol=0.05, atol=0.0078, h_init=0.05,
                        pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81):
    """DPM-Solver-23 (or -12) with adaptive step size in t = -log sigma, from sigmas[0] to the smallest
    positive sigma: each attempt compares the order-2 and order-3 solutions, a PID controller accepts or
    rejects and rescales h. The step count is ignored. callback(i, ...) runs after every attempt."""
    if len(sigmas) <= 1:
        return x
    if order not in {2, 3}:
        raise ValueError(f"order: received {order!r}, expected 2 or 3")
    sigma_min, sigma_max = dpm_sigma_range(sigmas)
    noise.default(x)  # where ComfyUI builds its (eta = 0, so unused) noise sampler
    t_start, t_end = sigma_to_half_log_snr(sigma_max), sigma_to_half_log_snr(sigma_min)
    atol, rtol = f32(atol), f32(rtol)
    pid = PIDStepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, order, accept_safety)
    s, x_prev, attempts = t_start, x, 0
    while s < t_end - 1e-5:
        eps = eps_cache(model)
        t = min(t_end, s + pid.h)  # torch.minimum on float32
        if callback is not None:  # D only for the callback (after the attempt, with this step's x)
            denoised = x - half_log_snr_to_sigma(s) * eps("eps", x, s)
        if order == 2:
            x_low = dpm_solver_1_step(eps, x, s, t)
            x_high = dpm_solver_2_step(eps, x, s, t)
        else:
            x_low = dpm_solver_2_step(eps, x, s, t, r1=1 / 3)
            x_high = dpm_solver_3_step(eps, x, s, t)
        if pid.propose_step(rms_error(x_low, x_high, x_prev, atol, rtol)):
            x_prev, x, s = x_low, x_high, t
        attempts += 1
        if callback is not None:
            callback(attempts - 1, x, denoised)
    return x


# -- DDPM and LCM ------------------------------------------------------------------------------------------

def sample_ddpm(model, x, sigmas, noise, callback=None):
    """DDPM ancestral sampling (ComfyUI's generic_step_sampler with DDPMSampler_step)."""
    noise_sampler = noise.default(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        notify(callback, i, x, denoised)
        x = ddpm_update(x, denoised, sigma, sigma_next, noise_sampler)
    return x


def sample_lcm(model, x, sigmas, noise, callback=None):
    """Latent Consistency Model sampling (Luo et al. 2023): jump to D, then re-noise to the next sigma
    with the model's noise_scaling (noise * sigma + D)."""
    noise_sampler = noise.default(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        notify(callback, i, x, denoised)
        x = denoised
        if sigma_next > 0:
            x = model.model_sampling.noise_scaling(sigma_next, noise_sampler(sigma, sigma_next), x)
    return x


# -- Exponential Heun in x0 / half-logSNR time (SEEDS-2 with r = 1) -------------------------------------

def sample_exp_heun_2_x0(model, x, sigmas, noise, callback=None, solver_type="phi_2"):
    """Deterministic exponential Heun, second order, in data prediction and logSNR time: newer ComfyUI's
    ``sample_seeds_2`` with eta = 0, r = 1 and the phi_2 corrector."""
    return sample_seeds_2(model, x, sigmas, noise, callback, eta=0.0, s_noise=0.0, r=1.0, solver_type=solver_type)


def sample_exp_heun_2_x0_sde(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0, solver_type="phi_2"):
    """Stochastic exponential Heun (SEEDS-2, r = 1): default noise at the predictor and (weight 0) at the end."""
    return sample_seeds_2(model, x, sigmas, noise, callback, eta=eta, s_noise=s_noise, r=1.0, solver_type=solver_type)


SAMPLERS: dict[str, SamplerSpec] = {
    "euler": SamplerSpec(sample_euler),
    "euler_cfg_pp": SamplerSpec(sample_euler_cfg_pp, cfg_pp=True),
    "euler_ancestral": SamplerSpec(sample_euler_ancestral),
    "euler_ancestral_cfg_pp": SamplerSpec(sample_euler_ancestral_cfg_pp, cfg_pp=True),
    "heun": SamplerSpec(sample_heun),
    "heunpp2": SamplerSpec(sample_heunpp2),
    "exp_heun_2_x0": SamplerSpec(sample_exp_heun_2_x0),
    "exp_heun_2_x0_sde": SamplerSpec(sample_exp_heun_2_x0_sde),
    "dpm_2": SamplerSpec(sample_dpm_2),
    "dpm_2_ancestral": SamplerSpec(sample_dpm_2_ancestral),
    "lms": SamplerSpec(sample_lms),
    "dpm_fast": SamplerSpec(sample_dpm_fast),
    "dpm_adaptive": SamplerSpec(sample_dpm_adaptive),
    "ddpm": SamplerSpec(sample_ddpm),
    "lcm": SamplerSpec(sample_lcm),
    "ddim": SamplerSpec(sample_euler),  # ComfyUI: euler with an inpaint-only noise option
}
