"""The classic k-diffusion samplers: Euler, Heun, DPM-Solver-2, LMS, DPM-Solver fast/adaptive, DDPM, LCM.

Each function follows the sampler contract of :mod:`ksampler_rt.runtime.samplers` and reproduces the
ComfyUI 0.3.64 function of the same name in ``comfy/k_diffusion/sampling.py`` (k-diffusion by
Katherine Crowson), including where it draws noise and the float32 order of its arithmetic. ``ddim``
is ComfyUI's euler (``comfy/samplers.py: sampler_object``); ``dpm_fast`` / ``dpm_adaptive`` include the
wrappers of ``comfy/samplers.py: ksampler``. ``exp_heun_2_x0(_sde)`` are the SEEDS-2 special cases
newer ComfyUI adds (r = 1, phi_2 corrector).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import integrate

from .common import (
    F32, ei_h_phi_1, ei_h_phi_2, exp, expm1, f32, get_ancestral_step, half_log_snr_to_sigma, lerp, log, notify,
    offset_first_sigma_for_snr, schedule_cached, sigma_to_half_log_snr, sqrt, times, to_d, torch_linspace,
)
from .registry import SamplerSpec


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
    """Euler to sigma_down, then fresh noise of std sigma_up; the last step returns D."""
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


def sample_euler_ancestral_cfg_pp(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0):
    """CFG++ (Chung et al. 2024) ancestral Euler: the direction uses the unconditional D, the
    target the guided one, written as a DDIM step in VP space (alpha = sigma * exp(lambda))."""
    noise_sampler = noise.default(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised, uncond_denoised = model.with_uncond(x, sigma)
        notify(callback, i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        alpha_s = sigma * exp(sigma_to_half_log_snr(sigma))
        alpha_t = sigma_next * exp(sigma_to_half_log_snr(sigma_next))
        d = to_d(x, sigma, alpha_s * uncond_denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma / alpha_s, sigma_next / alpha_t, eta)
        sigma_down = alpha_t * sigma_down
        x = alpha_t * denoised + sigma_down * d
        if eta > 0 and s_noise > 0:
            x = x + times(noise_sampler(sigma, sigma_next), alpha_t, s_noise, sigma_up)
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
    """Ancestral sampling with DPM-Solver-2 steps to sigma_down plus noise of std sigma_up."""
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


# -- Linear multistep ---------------------------------------------------------------------------------

def linear_multistep_coeff(order: int, t: np.ndarray, i: int, j: int) -> float:
    """Adams-Bashforth weight of slope i - j over [t_i, t_{i+1}]: the integral of its Lagrange basis
    polynomial, by scipy's adaptive quadrature (epsrel 1e-4) on the float32 sigmas, as k-diffusion."""
    if order - 1 > i:
        raise ValueError(f"Order {order} too high for step {i}")

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
        ds.append(to_d(x, sigma, denoised))
        if len(ds) > order:
            ds.pop(0)
        notify(callback, i, x, denoised)
        if t[i + 1] == 0:
            x = denoised
        else:
            x = x + sum(coeff * d for coeff, d in zip(coeffs[i], reversed(ds)))
    return x


# -- DPM-Solver (Lu et al. 2022, arXiv:2206.00927) in t = -log sigma ------------------------------------

def _eps_cache(model):
    """eps(key, x, t) = (x - D(x, sigma(t))) / sigma(t), evaluated once per key within a step."""
    cache = {}

    def eps(key, x, t):
        if key not in cache:
            sigma = half_log_snr_to_sigma(t)
            cache[key] = (x - model(x, sigma)) / sigma
        return cache[key]
    return eps


def _dpm_solver_1_step(eps, x, t, t_next):
    h = t_next - t
    return x - half_log_snr_to_sigma(t_next) * expm1(h) * eps("eps", x, t)


def _dpm_solver_2_step(eps, x, t, t_next, r1=1 / 2):
    h = t_next - t
    e = eps("eps", x, t)
    s1 = t + r1 * h
    u1 = x - half_log_snr_to_sigma(s1) * expm1(r1 * h) * e
    e_r1 = eps("eps_r1", u1, s1)
    sigma_next = half_log_snr_to_sigma(t_next)
    return x - sigma_next * expm1(h) * e - sigma_next / (2 * r1) * expm1(h) * (e_r1 - e)


def _dpm_solver_3_step(eps, x, t, t_next, r1=1 / 3, r2=2 / 3):
    h = t_next - t
    e = eps("eps", x, t)
    s1, s2 = t + r1 * h, t + r2 * h
    u1 = x - half_log_snr_to_sigma(s1) * expm1(r1 * h) * e
    e_r1 = eps("eps_r1", u1, s1)
    sigma_s2 = half_log_snr_to_sigma(s2)
    u2 = (x - sigma_s2 * expm1(r2 * h) * e
          - sigma_s2 * (r2 / r1) * (expm1(r2 * h) / (r2 * h) - 1) * (e_r1 - e))
    e_r2 = eps("eps_r2", u2, s2)
    sigma_next = half_log_snr_to_sigma(t_next)
    return x - sigma_next * expm1(h) * e - sigma_next / r2 * (expm1(h) / h - 1) * (e_r2 - e)


_DPM_SOLVER_STEPS = {1: _dpm_solver_1_step, 2: _dpm_solver_2_step, 3: _dpm_solver_3_step}


def _dpm_sigma_range(sigmas):
    """ComfyUI's dpm_fast / dpm_adaptive wrappers: sigma_max = sigmas[0], sigma_min = the last sigma,
    or the one before it when the last is 0."""
    sigma_min = f32(sigmas[-1])
    if sigma_min == 0:
        sigma_min = f32(sigmas[-2])
    sigma_max = f32(sigmas[0])
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    return sigma_min, sigma_max


def sample_dpm_fast(model, x, sigmas, noise, callback=None):
    """DPM-Solver-fast: n = len(sigmas) - 1 model calls spread over floor(n/3) + 1 steps uniform in
    t = -log sigma from sigma_max to sigma_min, orders 3, ..., 3 then [2, 1] (n % 3 == 0) or [n % 3].
    Only the two ends of the schedule matter. ComfyUI adds eta = 0 times fresh default noise after each
    step, which leaves x unchanged, so no noise is drawn here."""
    if len(sigmas) <= 1:
        return x
    sigma_min, sigma_max = _dpm_sigma_range(sigmas)
    nfe = len(sigmas) - 1
    noise.default(x)  # where ComfyUI builds its (eta = 0, so unused) noise sampler
    m = nfe // 3 + 1
    ts = torch_linspace(sigma_to_half_log_snr(sigma_max), sigma_to_half_log_snr(sigma_min), m + 1)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        eps = _eps_cache(model)
        t, t_next = ts[i], ts[i + 1]
        denoised = x - half_log_snr_to_sigma(t) * eps("eps", x, t)
        notify(callback, i, x, denoised)
        x = _DPM_SOLVER_STEPS[order](eps, x, t, t_next)
    return x


class PIDStepSizeController:
    """k-diffusion's PID controller for the adaptive step size (in Python floats, as there)."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs = []

    @staticmethod
    def limiter(x):
        return 1 + math.atan(x - 1)

    def propose_step(self, error) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.limiter(self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


def _rms_error(x_low, x_high, x_prev, atol, rtol):
    """||(x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|))||_2 / sqrt(numel), float32 result."""
    delta = np.maximum(atol, rtol * np.maximum(np.abs(x_low), np.abs(x_prev)))
    scaled = ((x_low - x_high) / delta).astype(np.float64, copy=False)
    norm = F32(sqrt(np.dot(scaled.ravel(), scaled.ravel())))
    return norm / x_low.size ** 0.5


def sample_dpm_adaptive(model, x, sigmas, noise, callback=None, order=3, rtol=0.05, atol=0.0078, h_init=0.05,
                        pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81):
    """DPM-Solver-23 (or -12) with adaptive step size in t = -log sigma, from sigmas[0] to the smallest
    positive sigma: each attempt compares the order-2 and order-3 solutions, a PID controller accepts or
    rejects and rescales h. The step count is ignored. callback(i, ...) runs after every attempt."""
    if len(sigmas) <= 1:
        return x
    if order not in {2, 3}:
        raise ValueError("order should be 2 or 3")
    sigma_min, sigma_max = _dpm_sigma_range(sigmas)
    noise.default(x)  # where ComfyUI builds its (eta = 0, so unused) noise sampler
    t_start, t_end = sigma_to_half_log_snr(sigma_max), sigma_to_half_log_snr(sigma_min)
    atol, rtol = f32(atol), f32(rtol)
    pid = PIDStepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, order, accept_safety)
    s, x_prev, attempts = t_start, x, 0
    while s < t_end - 1e-5:
        eps = _eps_cache(model)
        t = min(t_end, s + pid.h)  # torch.minimum on float32
        denoised = x - half_log_snr_to_sigma(s) * eps("eps", x, s)
        if order == 2:
            x_low = _dpm_solver_1_step(eps, x, s, t)
            x_high = _dpm_solver_2_step(eps, x, s, t)
        else:
            x_low = _dpm_solver_2_step(eps, x, s, t, r1=1 / 3)
            x_high = _dpm_solver_3_step(eps, x, s, t)
        if pid.propose_step(_rms_error(x_low, x_high, x_prev, atol, rtol)):
            x_prev, x, s = x_low, x_high, t
        attempts += 1
        notify(callback, attempts - 1, x, denoised)
    return x


# -- DDPM and LCM ------------------------------------------------------------------------------------------

def _ddpm_step(x, sigma, sigma_prev, eps, noise_sampler):
    """Ho et al. (2020) ancestral posterior step in VP space (alpha_bar = 1 / (1 + sigma^2))."""
    alpha_cumprod = 1 / (sigma * sigma + 1)
    alpha_cumprod_prev = 1 / (sigma_prev * sigma_prev + 1)
    alpha = alpha_cumprod / alpha_cumprod_prev
    mu = sqrt(1.0 / alpha) * (x - (1 - alpha) * eps / sqrt(1 - alpha_cumprod))
    if sigma_prev > 0:
        mu += sqrt((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)) * noise_sampler(sigma, sigma_prev)
    return mu


def sample_ddpm(model, x, sigmas, noise, callback=None):
    """DDPM ancestral sampling (ComfyUI's generic_step_sampler with DDPMSampler_step)."""
    noise_sampler = noise.default(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        notify(callback, i, x, denoised)
        x = _ddpm_step(x / sqrt(1.0 + sigma * sigma), sigma, sigma_next, (x - denoised) / sigma, noise_sampler)
        if sigma_next != 0:
            x = x * sqrt(1.0 + sigma_next * sigma_next)
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

def _seeds_2_phi2(model, x, sigmas, noise, callback, eta, s_noise, r=1.0):
    """SEEDS-2 (Gonzalez et al., NeurIPS 2023, arXiv:2305.14267) with the phi_2 corrector, as newer
    ComfyUI's sample_seeds_2(solver_type="phi_2"): a DPM-Solver++(1) (+ SDE noise) predictor to
    lambda_s + r h, a second D there, then x_t = (sigma_t / sigma_s) e^{-eta h} x
    - alpha_t (b1 D + b2 D_2) with b2 = h phi_2(-h(1+eta)) / r, b1 = h phi_1(-h(1+eta)) - b2."""
    noise_sampler = noise.default(x)
    inject_noise = eta > 0 and s_noise > 0
    sigmas = offset_first_sigma_for_snr(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = f32(sigmas[i]), f32(sigmas[i + 1])
        denoised = model(x, sigma)
        notify(callback, i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        lambda_s, lambda_t = sigma_to_half_log_snr(sigma), sigma_to_half_log_snr(sigma_next)
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = lerp(lambda_s, lambda_t, r)
        sigma_s_1 = half_log_snr_to_sigma(lambda_s_1)
        alpha_s_1 = sigma_s_1 * exp(lambda_s_1)
        alpha_t = sigma_next * exp(lambda_t)

        x_2 = sigma_s_1 / sigma * exp(-r * h * eta) * x - alpha_s_1 * ei_h_phi_1(-r * h_eta) * denoised
        if inject_noise:
            sde_noise = sqrt(-expm1(-2 * r * h * eta)) * noise_sampler(sigma, sigma_s_1)
            x_2 = x_2 + times(sde_noise, sigma_s_1, s_noise)
        denoised_2 = model(x_2, sigma_s_1)

        b2 = ei_h_phi_2(-h_eta) / r
        b1 = ei_h_phi_1(-h_eta) - b2
        x = sigma_next / sigma * exp(-h * eta) * x - alpha_t * (b1 * denoised + b2 * denoised_2)
        if inject_noise:
            segment_factor = (r - 1) * h * eta
            sde_noise = sde_noise * exp(segment_factor)
            sde_noise = sde_noise + sqrt(-expm1(segment_factor * 2)) * noise_sampler(sigma_s_1, sigma_next)
            x = x + times(sde_noise, sigma_next, s_noise)
    return x


def sample_exp_heun_2_x0(model, x, sigmas, noise, callback=None):
    """Deterministic exponential Heun, second order, in data prediction and logSNR time (SEEDS-2, eta = 0, r = 1)."""
    return _seeds_2_phi2(model, x, sigmas, noise, callback, eta=0.0, s_noise=0.0)


def sample_exp_heun_2_x0_sde(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0):
    """Stochastic exponential Heun (SEEDS-2, r = 1): default noise at the predictor and (weight 0) at the end."""
    return _seeds_2_phi2(model, x, sigmas, noise, callback, eta=eta, s_noise=s_noise)


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
