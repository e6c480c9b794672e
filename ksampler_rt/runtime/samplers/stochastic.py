"""Stochastic exponential-integrator samplers: ER-SDE, SEEDS-2/3, SA-Solver (and its PECE mode).

Behaviour follows ComfyUI 0.3.64 ``comfy/k_diffusion/sampling.py`` (``sample_er_sde``,
``sample_seeds_2``, ``sample_seeds_3``, ``sample_sa_solver``) and ``comfy/k_diffusion/sa_solver.py``,
re-derived and written in numpy, float32 throughout like ComfyUI's CPU path. The half-log-SNR is
the model sampling's: lambda = -log(sigma) for VP models, -logit(sigma) for flow (CONST) models,
whose first sigma >= 1 ``offset_first_sigma_for_snr`` moves to ``percent_to_sigma(1e-4)``. Noise
comes from ``noise.default(x)``, built where ComfyUI builds ``default_noise_sampler(x, seed)``, and
is drawn at the same points in the same order. With the compiled kernels (:mod:`..fused_steps`) each
stage or step update, noise included, is one pass with the same float32 operations as the numpy
expressions here (the reference and fallback).
"""
from __future__ import annotations

import math

import numpy as np

from .. import fused_steps
from .common import (
    F32, ei_h_phi_1, ei_h_phi_2, exp, expm1, half_log_snr_to_sigma, lerp, nan_to_zero, offset_first_sigma_for_snr,
    schedule_cached, sigma_to_half_log_snr, sqrt, times, weak_or_f32,
)
from .spec import SamplerSpec


# -- ER-SDE ---------------------------------------------------------------------------------
def _er_sde_noise_scaler(x):
    """ComfyUI's default ER-SDE noise scaler x (e^{x^0.3} + 10)."""
    return x * (np.exp(x ** F32(0.3)) + F32(10.0))


@schedule_cached()
def _er_sde_plan(sigmas: np.ndarray, lambdas: np.ndarray, max_stage: int) -> list:
    """The scalar coefficients of every ER-SDE step (they depend on the schedule only: ``lambdas`` are
    the er_lambdas sigma / alpha = exp(-half-log-SNR) of the model sampling), computed
    with the same float32 operations as ComfyUI's loop: per step (r_alpha * r, alpha_t * (1 - r),
    stage-2 divisor and weight, stage-3 divisor and weight, alpha_t, noise std), None for the last
    step to sigma = 0."""
    n_points = F32(200.0)
    point_index = np.arange(200, dtype=F32)
    ns = _er_sde_noise_scaler
    plan = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == 0:
            plan.append(None)
            continue
        stage = min(max_stage, i + 1)
        lam_s, lam_t = lambdas[i], lambdas[i + 1]
        alpha_s, alpha_t = sigma / lam_s, sigma_next / lam_t
        r_alpha = alpha_t / alpha_s
        r = ns(lam_t) / ns(lam_s)
        d2 = w2 = d3 = w3 = None
        if stage >= 2:
            dt = lam_t - lam_s
            step = -dt / n_points
            lam_pos = lam_t + point_index * step
            scaled = ns(lam_pos)
            s = np.sum(1 / scaled, dtype=F32) * step
            d2, w2 = lam_s - lambdas[i - 1], alpha_t * (dt + s * ns(lam_t))
            if stage >= 3:
                s_u = np.sum((lam_pos - lam_s) / scaled, dtype=F32) * step
                d3, w3 = (lam_s - lambdas[i - 2]) / 2, alpha_t * ((dt ** 2) / 2 + s_u * ns(lam_t))
        with np.errstate(invalid="ignore"):
            std = nan_to_zero(np.sqrt(lam_t ** 2 - lam_s ** 2 * r ** 2))
        plan.append((r_alpha * r, alpha_t * (1 - r), d2, w2, d3, w3, alpha_t, std))
    return plan


def sample_er_sde(model, x, sigmas, noise, callback=None, s_noise=1.0, max_stage=3):
    """Extended Reverse-Time SDE solver, VP ER-SDE-Solver-3: an Euler stage plus up to two
    Taylor stages from the denoised history, with the stage integrals taken by a 200-point sum
    (all scalar coefficients in :func:`_er_sde_plan`).

    Reference: ComfyUI ``sample_er_sde``; Cui et al., "Elucidating the solution space of extended
    reverse-time SDE for diffusion models" (arXiv:2309.06169)."""
    sigmas = np.asarray(sigmas, dtype=F32)
    noise_sampler = noise.default(x)
    ms = model.model_sampling
    sigmas = offset_first_sigma_for_snr(sigmas, ms)
    # er_lambda = sigma / alpha = exp(-lambda): ComfyUI's ``half_log_snrs.neg().exp()`` for every model
    er_lambdas = half_log_snr_to_sigma(sigma_to_half_log_snr(sigmas, ms))
    plan = _er_sde_plan(sigmas, er_lambdas, int(max_stage))
    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        if plan[i] is None:
            x = denoised
            old_denoised = denoised
            continue
        x_weight, d_weight, d2, w2, d3, w3, alpha_t, std = plan[i]
        if weak_or_f32(s_noise) and fused_steps.scalars_f32(*(v for v in plan[i] if v is not None)) \
                and fused_steps.ready(x, denoised, *(a for a in (old_denoised, old_denoised_d) if a is not None)):
            # one pass, the same float32 operations as below
            nz = noise_sampler(sigma, sigma_next) if s_noise > 0 else None
            x, denoised_d = fused_steps.er_sde_step(x, denoised, old_denoised, old_denoised_d, nz, x_weight,
                                                    d_weight, d2, w2, d3, w3, (alpha_t, F32(s_noise), std))
            if d2 is not None:
                old_denoised_d = denoised_d
        else:
            x = x_weight * x + d_weight * denoised  # stage 1: Euler
            if d2 is not None:
                denoised_d = (denoised - old_denoised) / d2
                x = x + w2 * denoised_d
                if d3 is not None:
                    denoised_u = (denoised_d - old_denoised_d) / d3
                    x = x + w3 * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                x = x + times(noise_sampler(sigma, sigma_next), alpha_t, F32(s_noise), std)
        old_denoised = denoised
    return x


# -- SEEDS ----------------------------------------------------------------------------------
def _stage_update(x, a, c, u, *, v=None, lerp_w=None, pq=None, sde=None, nz=None, e=None, qn=None, sig=None,
                 s_noise=1.0, last=False):
    """One SEEDS stage ``a * x - c * z``, z = ``u``, ``lerp(u, v, lerp_w)`` or ``pq[0] * u + pq[1] * v``;
    with the drawn noise ``nz`` the stage's SDE noise ``s = qn * nz`` (or ``sde * e + qn * nz``) is added
    as ``s * sig * s_noise``. Returns (x_next, s or None; the compiled pass, one when the kernels take
    it, does not keep s for the ``last`` stage of a step)."""
    arrays = [t for t in (x, u, v, sde, nz) if t is not None]
    scalars = [t for t in (a, c, e, qn, sig) if t is not None] + list(pq or ())
    if weak_or_f32(s_noise) and fused_steps.scalars_f32(*scalars) and fused_steps.ready(*arrays):
        return fused_steps.seeds_stage(x, a, c, u, v=v, lerp=lerp_w, pq=pq, sde=sde, nz=nz, e=e, qn=qn, sig=sig,
                                       s_noise=s_noise, keep_noise=not last)
    if lerp_w is not None:
        y = a * x - c * lerp(u, v, lerp_w)
    elif pq is not None:
        y = a * x - c * (pq[0] * u + pq[1] * v)
    else:
        y = a * x - c * u
    if nz is None:
        return y, None
    noise = qn * nz if sde is None else sde * e + qn * nz
    return y + times(noise, sig, s_noise), noise


def sample_seeds_2(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0, r=0.5, solver_type="phi_1"):
    """SEEDS-2: Stochastic Explicit Exponential Derivative-free Solver, 2 stages (VP data prediction).
    A DPM-Solver++(1) step (+ SDE noise) to lambda_s + r h, a second D there, then the step to lambda_t
    with D extrapolated from the two (phi_1: lerp with weight 1/(2r)) or with the phi_2 corrector
    (newer ComfyUI's ``solver_type="phi_2"``, which its exp_heun_2_x0 samplers use with r = 1).

    Reference: ComfyUI ``sample_seeds_2``; Gonzalez et al., NeurIPS 2023 (arXiv:2305.14267)."""
    if solver_type not in {"phi_1", "phi_2"}:
        raise ValueError(f"solver_type: received {solver_type!r}, expected 'phi_1' or 'phi_2'")
    sigmas = np.asarray(sigmas, dtype=F32)
    noise_sampler = noise.default(x)
    inject_noise = eta > 0 and s_noise > 0
    ms = model.model_sampling
    sigmas = offset_first_sigma_for_snr(sigmas, ms)
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        lambda_s, lambda_t = sigma_to_half_log_snr(sigma, ms), sigma_to_half_log_snr(sigma_next, ms)
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = lerp(lambda_s, lambda_t, r)
        sigma_s_1 = half_log_snr_to_sigma(lambda_s_1, ms)
        alpha_s_1 = sigma_s_1 * exp(lambda_s_1)
        alpha_t = sigma_next * exp(lambda_t)

        # Step 1
        noise_1 = {}
        if inject_noise:
            noise_1 = dict(qn=sqrt(-expm1(-2 * r * h * eta)), nz=noise_sampler(sigma, sigma_s_1), sig=sigma_s_1)
        x_2, sde_noise = _stage_update(x, sigma_s_1 / sigma * exp(-r * h * eta),
                                      alpha_s_1 * ei_h_phi_1(-r * h_eta), denoised, s_noise=s_noise, **noise_1)
        denoised_2 = model(x_2, sigma_s_1)

        # Step 2
        noise_2 = {}
        if inject_noise:
            segment_factor = (r - 1) * h * eta
            noise_2 = dict(sde=sde_noise, e=exp(segment_factor), qn=sqrt(-expm1(segment_factor * 2)),
                           nz=noise_sampler(sigma_s_1, sigma_next), sig=sigma_next)
        a = sigma_next / sigma * exp(-h * eta)
        if solver_type == "phi_1":
            x, _ = _stage_update(x, a, alpha_t * ei_h_phi_1(-h_eta), denoised, v=denoised_2, lerp_w=fac,
                                s_noise=s_noise, last=True, **noise_2)
        else:
            b2 = ei_h_phi_2(-h_eta) / r
            b1 = ei_h_phi_1(-h_eta) - b2
            x, _ = _stage_update(x, a, alpha_t, denoised, v=denoised_2, pq=(b1, b2), s_noise=s_noise, last=True,
                                **noise_2)
    return x


def sample_seeds_3(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0, r_1=1.0 / 3, r_2=2.0 / 3):
    """SEEDS-3: 3 stages at lambda fractions r_1 and r_2, each restarting from x_i; the second and the
    final stage add a phi_2 correction from the latest stage prediction.

    Reference: ComfyUI ``sample_seeds_3``; Gonzalez et al., NeurIPS 2023 (arXiv:2305.14267)."""
    sigmas = np.asarray(sigmas, dtype=F32)
    noise_sampler = noise.default(x)
    inject_noise = eta > 0 and s_noise > 0
    ms = model.model_sampling
    sigmas = offset_first_sigma_for_snr(sigmas, ms)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        lambda_s, lambda_t = sigma_to_half_log_snr(sigma, ms), sigma_to_half_log_snr(sigma_next, ms)
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = lerp(lambda_s, lambda_t, r_1)
        lambda_s_2 = lerp(lambda_s, lambda_t, r_2)
        sigma_s_1, sigma_s_2 = half_log_snr_to_sigma(lambda_s_1, ms), half_log_snr_to_sigma(lambda_s_2, ms)
        alpha_s_1 = sigma_s_1 * exp(lambda_s_1)
        alpha_s_2 = sigma_s_2 * exp(lambda_s_2)
        alpha_t = sigma_next * exp(lambda_t)

        # Step 1
        nz = {}
        if inject_noise:
            nz = dict(qn=sqrt(-expm1(-2 * r_1 * h * eta)), nz=noise_sampler(sigma, sigma_s_1), sig=sigma_s_1)
        x_2, sde_noise = _stage_update(x, sigma_s_1 / sigma * exp(-r_1 * h * eta),
                                      alpha_s_1 * ei_h_phi_1(-r_1 * h_eta), denoised, s_noise=s_noise, **nz)
        denoised_2 = model(x_2, sigma_s_1)

        # Step 2
        a3_2 = r_2 / r_1 * ei_h_phi_2(-r_2 * h_eta)
        a3_1 = ei_h_phi_1(-r_2 * h_eta) - a3_2
        if inject_noise:
            segment_factor = (r_1 - r_2) * h * eta
            nz = dict(sde=sde_noise, e=exp(segment_factor), qn=sqrt(-expm1(segment_factor * 2)),
                      nz=noise_sampler(sigma_s_1, sigma_s_2), sig=sigma_s_2)
        x_3, sde_noise = _stage_update(x, sigma_s_2 / sigma * exp(-r_2 * h * eta), alpha_s_2, denoised,
                                      v=denoised_2, pq=(a3_1, a3_2), s_noise=s_noise, **nz)
        denoised_3 = model(x_3, sigma_s_2)

        # Step 3
        b3 = ei_h_phi_2(-h_eta) / r_2
        b1 = ei_h_phi_1(-h_eta) - b3
        if inject_noise:
            segment_factor = (r_2 - 1) * h * eta
            nz = dict(sde=sde_noise, e=exp(segment_factor), qn=sqrt(-expm1(segment_factor * 2)),
                      nz=noise_sampler(sigma_s_2, sigma_next), sig=sigma_next)
        x, _ = _stage_update(x, sigma_next / sigma * exp(-h * eta), alpha_t, denoised, v=denoised_3, pq=(b1, b3),
                            s_noise=s_noise, last=True, **nz)
    return x


# -- SA-Solver ------------------------------------------------------------------------------
def _exponential_coeffs(s, t, order: int, tau: float) -> np.ndarray:
    """(1+tau^2) int_s^t e^{(1+tau^2)(u-t)} u^p du for p < order, by integration by parts
    (SA-Solver data-prediction weights; ComfyUI ``sa_solver.compute_exponential_coeffs``)."""
    tau_mul = 1 + tau ** 2
    h = t - s
    p = np.arange(order, dtype=F32)
    terms = t ** p - s ** p * np.exp(F32(-tau_mul) * h)
    depth = p[:, None] - p[None, :]
    log_fact = np.array([math.lgamma(k + 1) for k in range(order)], dtype=F32)
    log_coeff = log_fact[:, None] - log_fact[None, :]
    if tau > 0:
        log_coeff = log_coeff - depth * F32(math.log(tau_mul))
    signs = np.where(depth % 2 == 0, F32(1.0), F32(-1.0))
    return np.tril(np.exp(log_coeff) * signs) @ terms


@schedule_cached(maxsize=1024)
def sa_b_coeffs(sigma_next, lambdas, lam_s, lam_t, tau: float) -> np.ndarray:
    """b_i of the stochastic Adams step from lam_s to lam_t (SA-Solver eqs. 15 and 18): the
    integrals of the Lagrange basis through ``lambdas``, weighted by alpha_t.

    Reference: ComfyUI ``sa_solver.compute_stochastic_adams_b_coeffs`` (simple_order_2 off)."""
    k = len(lambdas)
    integrals = _exponential_coeffs(lam_s, lam_t, k, tau)
    vander_t = np.vander(np.asarray(lambdas, dtype=F32), k, increasing=True).T
    return (sigma_next * exp(lam_t)) * np.linalg.solve(vander_t, integrals).astype(F32)


def _combine(preds: list, b: np.ndarray):
    """sum_k b_k pred_k."""
    acc = preds[0] * b[0]
    for pk, bk in zip(preds[1:], b[1:]):
        acc = acc + pk * bk
    return acc


def _sa_update(x, sc, preds: list, b, added=None, nz=None, factors=()):
    """``sc * x + sum_k b_k pred_k``, then ``+ added`` or ``+ times(nz, *factors)`` (the new step noise,
    returned too): one compiled pass when the kernels take it."""
    arrays = [x, *preds] + [t for t in (added, nz) if t is not None]
    if len(preds) <= 4 and fused_steps.scalars_f32(sc, *b[:len(preds)], *factors) and fused_steps.ready(*arrays):
        return fused_steps.sa_step(x, sc, preds, b[:len(preds)], added=added, nz=nz, factors=factors or None)
    x = sc * x + _combine(preds, b)
    if added is not None:
        return x + added, None
    if nz is None:
        return x, None
    new = times(nz, *factors)
    return x + new, new


def sample_sa_solver(model, x, sigmas, noise, callback=None, s_noise=1.0, predictor_order=3,
                     corrector_order=4, use_pece=False, eta=1.0):
    """Stochastic Adams predictor-corrector in lambda = -log(sigma) (data prediction). The SDE
    strength tau is eta inside [percent_to_sigma(0.8), percent_to_sigma(0.2)], else 0 (ODE).
    Orders drop near the end when the schedule ends at 0; PECE re-evaluates the corrected state.

    Reference: ComfyUI ``sample_sa_solver``; Xue et al., "SA-Solver: Stochastic Adams Solver for
    Fast Sampling of Diffusion Models" (NeurIPS 2023, arXiv:2309.05019)."""
    sigmas = np.asarray(sigmas, dtype=F32)
    if len(sigmas) <= 1:
        return x
    noise_sampler = noise.default(x)
    ms = model.model_sampling
    sigmas = offset_first_sigma_for_snr(sigmas, ms)
    lambdas = sigma_to_half_log_snr(sigmas, ms)
    start_sigma, end_sigma = ms.percent_to_sigma(0.2), ms.percent_to_sigma(0.8)

    def tau_fn(sig) -> float:
        return float(eta) if eta > 0 and start_sigma >= float(sig) >= end_sigma else 0.0

    n = len(sigmas) - 1
    lower_order_to_end = sigmas[-1] == 0
    x_pred, h, tau, step_noise = x, F32(0.0), 0.0, None
    preds: list = []
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x_pred, sigma)
        if callback is not None:
            callback(i, x_pred, denoised)
        preds = (preds + [denoised])[-max(predictor_order, corrector_order):]
        p_order = min(predictor_order, len(preds))
        c_order = 0 if i == 0 or (sigma_next == 0 and not use_pece) else min(corrector_order, len(preds))
        if lower_order_to_end:
            p_order, c_order = min(p_order, n - 1 - i), min(c_order, n - i)

        if c_order == 0:  # corrector
            x = x_pred
        else:
            b = sa_b_coeffs(sigma, lambdas[i - c_order + 1:i + 1], lambdas[i - 1], lambdas[i], tau)
            added = step_noise if tau > 0 and s_noise > 0 else None
            x, _ = _sa_update(x, sigma / sigmas[i - 1] * exp(-(tau ** 2) * h), preds[-c_order:], b, added=added)
            if use_pece:
                denoised = model(x, sigma)
                preds[-1] = denoised

        if sigma_next == 0:  # predictor
            x = denoised
        else:
            tau = tau_fn(sigma_next)
            b = sa_b_coeffs(sigma_next, lambdas[i - p_order + 1:i + 1], lambdas[i], lambdas[i + 1], tau)
            h = lambdas[i + 1] - lambdas[i]
            sc = sigma_next / sigma * exp(-(tau ** 2) * h)
            if tau > 0 and s_noise > 0:
                x_pred, step_noise = _sa_update(x, sc, preds[-p_order:], b, nz=noise_sampler(sigma, sigma_next),
                                                factors=(sigma_next, sqrt(-expm1(-2 * tau ** 2 * h)), F32(s_noise)))
            else:
                x_pred, _ = _sa_update(x, sc, preds[-p_order:], b)
    return x


def sample_sa_solver_pece(model, x, sigmas, noise, callback=None, s_noise=1.0, predictor_order=3, corrector_order=4):
    """SA-Solver in PECE mode (Predict, Evaluate, Correct, Evaluate): 2 model calls per step."""
    return sample_sa_solver(model, x, sigmas, noise, callback, s_noise=s_noise, predictor_order=predictor_order,
                            corrector_order=corrector_order, use_pece=True)


SAMPLERS: dict[str, SamplerSpec] = {
    "er_sde": SamplerSpec(sample_er_sde),
    "seeds_2": SamplerSpec(sample_seeds_2),
    "seeds_3": SamplerSpec(sample_seeds_3),
    "sa_solver": SamplerSpec(sample_sa_solver),
    "sa_solver_pece": SamplerSpec(sample_sa_solver_pece),
}
