"""DPM-Solver's building blocks for ``dpm_fast`` and ``dpm_adaptive`` (in :mod:`.classic`): the
first/second/third-order steps in t = -log sigma with a per-step eps cache, the sigma range of ComfyUI's
wrappers, and the PID step-size controller and error norm of the adaptive solver.

With the compiled kernels (:mod:`..fused_steps`) each eps, stage, step and the scaled error is one
pass with the same float32 operations as the numpy expressions here (the reference and fallback).

Reference: ComfyUI 0.3.64 ``comfy/k_diffusion/sampling.py`` (``DPMSolver``, ``PIDStepSizeController``;
k-diffusion by Katherine Crowson, MIT) and ``comfy/samplers.py`` (the dpm_fast / dpm_adaptive
wrappers); Lu et al., "DPM-Solver" (NeurIPS 2022, arXiv:2206.00927).
"""
from __future__ import annotations

import math

import numpy as np

from .. import fused_steps
from .common import F32, expm1, f32, half_log_snr_to_sigma, sqrt


def eps_cache(model):
    """eps(key, x, t) = (x - D(x, sigma(t))) / sigma(t), evaluated once per key within a step."""
    cache = {}

    def eps(key, x, t):
        if key not in cache:
            sigma = half_log_snr_to_sigma(t)
            denoised = model(x, sigma)
            if fused_steps.scalars_f32(sigma) and fused_steps.ready(x, denoised):
                cache[key] = fused_steps.eps_of(x, denoised, sigma)
            else:
                cache[key] = (x - denoised) / sigma
        return cache[key]
    return eps


def _update(x, a, e, b=None, f=None):
    """``x - a * e`` or ``x - a * e - b * (f - e)`` (one pass when the kernels can take it)."""
    if fused_steps.scalars_f32(a, *(() if b is None else (b,))) and fused_steps.ready(x, e, *(() if f is None else (f,))):
        return fused_steps.lin_step(x, a, e, b, f)
    return x - a * e if f is None else x - a * e - b * (f - e)


def dpm_solver_1_step(eps, x, t, t_next):
    h = t_next - t
    return _update(x, half_log_snr_to_sigma(t_next) * expm1(h), eps("eps", x, t))


def dpm_solver_2_step(eps, x, t, t_next, r1=1 / 2):
    h = t_next - t
    e = eps("eps", x, t)
    s1 = t + r1 * h
    u1 = _update(x, half_log_snr_to_sigma(s1) * expm1(r1 * h), e)
    e_r1 = eps("eps_r1", u1, s1)
    sigma_next = half_log_snr_to_sigma(t_next)
    return _update(x, sigma_next * expm1(h), e, sigma_next / (2 * r1) * expm1(h), e_r1)


def dpm_solver_3_step(eps, x, t, t_next, r1=1 / 3, r2=2 / 3):
    h = t_next - t
    e = eps("eps", x, t)
    s1, s2 = t + r1 * h, t + r2 * h
    u1 = _update(x, half_log_snr_to_sigma(s1) * expm1(r1 * h), e)
    e_r1 = eps("eps_r1", u1, s1)
    sigma_s2 = half_log_snr_to_sigma(s2)
    u2 = _update(x, sigma_s2 * expm1(r2 * h), e, sigma_s2 * (r2 / r1) * (expm1(r2 * h) / (r2 * h) - 1), e_r1)
    e_r2 = eps("eps_r2", u2, s2)
    sigma_next = half_log_snr_to_sigma(t_next)
    return _update(x, sigma_next * expm1(h), e, sigma_next / r2 * (expm1(h) / h - 1), e_r2)


DPM_SOLVER_STEPS = {1: dpm_solver_1_step, 2: dpm_solver_2_step, 3: dpm_solver_3_step}


def dpm_sigma_range(sigmas):
    """ComfyUI's dpm_fast / dpm_adaptive wrappers: sigma_max = sigmas[0], sigma_min = the last sigma,
    or the one before it when the last is 0."""
    sigma_min = f32(sigmas[-1])
    if sigma_min == 0:
        sigma_min = f32(sigmas[-2])
    sigma_max = f32(sigmas[0])
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError(f"sigmas: received sigma_min={float(sigma_min)!r} and sigma_max={float(sigma_max)!r}, "
                         "expected both > 0 (k-diffusion: sigma_min and sigma_max must not be 0)")
    return sigma_min, sigma_max


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


def rms_error(x_low, x_high, x_prev, atol, rtol):
    """||(x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|))||_2 / sqrt(numel), float32 result."""
    if fused_steps.scalars_f32(atol, rtol) and fused_steps.ready(x_low, x_high, x_prev):
        scaled = fused_steps.rms_scaled(x_low, x_high, x_prev, atol, rtol)
    else:
        delta = np.maximum(atol, rtol * np.maximum(np.abs(x_low), np.abs(x_prev)))
        scaled = ((x_low - x_high) / delta).astype(np.float64, copy=False)
    norm = F32(sqrt(np.dot(scaled.ravel(), scaled.ravel())))
    return norm / x_low.size ** 0.5
