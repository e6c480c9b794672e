"""Stochastic exponential-integrator samplers: ER-SDE, SEEDS-2/3, SA-Solver (and its PECE mode).

Behaviour follows ComfyUI 0.3.64 ``comfy/k_diffusion/sampling.py`` (``sample_er_sde``,
``sample_seeds_2``, ``sample_seeds_3``, ``sample_sa_solver``) and ``comfy/k_diffusion/sa_solver.py``,
re-derived and written in numpy, float32 throughout like ComfyUI's CPU path. The SD models here
are VP/eps (not CONST), so ``offset_first_sigma_for_snr`` is a no-op and the half-log-SNR is
lambda = -log(sigma). Noise comes from ``noise.default(x)``, built where ComfyUI builds
``default_noise_sampler(x, seed)``, and is drawn at the same points in the same order.
"""
from __future__ import annotations

import math

import numpy as np

from .common import F32, half_log_snr_to_sigma, schedule_cached, sigma_to_half_log_snr, nan_to_zero, times
from .registry import SamplerSpec


def _half_log_snr(sigmas):
    """lambda = -log(sigma) of a schedule, rounded from float64 like a correctly rounded float32
    log (numpy's float32 SIMD log can be a few ulp off; torch's is within an ulp)."""
    with np.errstate(divide="ignore"):
        return (-np.log(np.asarray(sigmas, dtype=np.float64))).astype(F32)


def _lerp(start, end, weight):
    """torch.lerp: start + w (end - start) for |w| < 0.5, else end - (end - start)(1 - w)."""
    weight = F32(weight)
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (F32(1.0) - weight)


def _neg_expm1_sqrt(v):
    """sqrt(-expm1(v)): the std of the fresh noise over a segment of an exponential SDE step."""
    return np.sqrt(-np.expm1(F32(v)))


# -- ER-SDE ---------------------------------------------------------------------------------
def _er_sde_noise_scaler(x):
    """ComfyUI's default ER-SDE noise scaler x (e^{x^0.3} + 10)."""
    return x * (np.exp(x ** F32(0.3)) + F32(10.0))


@schedule_cached()
def _er_sde_plan(sigmas: np.ndarray, max_stage: int) -> list:
    """The scalar coefficients of every ER-SDE step (they depend on the schedule only), computed
    with the same float32 operations as ComfyUI's loop: per step (r_alpha * r, alpha_t * (1 - r),
    stage-2 divisor and weight, stage-3 divisor and weight, alpha_t, noise std), None for the last
    step to sigma = 0."""
    n_points = F32(200.0)
    point_index = np.arange(200, dtype=F32)
    with np.errstate(over="ignore"):
        lambdas = np.exp(-_half_log_snr(sigmas).astype(np.float64)).astype(F32)  # er_lambda = sigma/alpha
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
    plan = _er_sde_plan(sigmas, int(max_stage))
    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        if plan[i] is None:
            x = denoised
        else:
            x_weight, d_weight, d2, w2, d3, w3, alpha_t, std = plan[i]
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
def _phi1_h(h):
    """h phi_1(h) = e^h - 1 (ComfyUI ``ei_h_phi_1``)."""
    return np.expm1(h)


def _phi2_h(h):
    """h phi_2(h) = (e^h - 1 - h) / h (ComfyUI ``ei_h_phi_2``)."""
    return (np.expm1(h) - h) / h


def _seeds_drift(alpha, hh, k: int, rs, preds: list):
    """alpha_r sum_j w_j D_j for stage k: the SEEDS exponential-integrator weights, where hh is
    -r h (1 + eta) and preds holds D at x_i and at the stage points reached so far."""
    if k == 0:
        return alpha * _phi1_h(hh) * preds[0]
    if len(rs) == 1:  # SEEDS-2: D extrapolated from the midpoint (weight 1/(2r) on it)
        return alpha * _phi1_h(hh) * _lerp(preds[0], preds[1], 1 / (2 * rs[0]))
    # SEEDS-3: a phi_2 correction on the latest stage prediction
    w = F32(rs[1] / rs[0]) * _phi2_h(hh) if k == 1 else _phi2_h(hh) / F32(rs[1])
    return alpha * ((_phi1_h(hh) - w) * preds[0] + w * preds[k])


def _seeds(model, x, sigmas, noise, callback, eta, s_noise, rs):
    """SEEDS (VP data prediction, derivative-free) with intermediate stages at lambda fractions
    ``rs`` (one for SEEDS-2, two for SEEDS-3). Every stage restarts from x_i:

        x_r = (sigma_r / sigma_i) e^{-r h eta} x_i - alpha_r sum_j w_j D_j + sigma_r W_r,

    where the Brownian part W is carried from stage to stage: over a segment with log-decay f it
    decays by e^f and gains sqrt(1 - e^{2f}) of fresh noise. The last step returns D."""
    sigmas = np.asarray(sigmas, dtype=F32)
    noise_sampler = noise.default(x)
    inject = eta > 0 and s_noise > 0
    eta, s_noise = F32(eta), F32(s_noise)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        lam_s, lam_t = sigma_to_half_log_snr(sigma), sigma_to_half_log_snr(sigma_next)
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        stage_lams = [_lerp(lam_s, lam_t, r) for r in rs] + [lam_t]
        stage_sigmas = [half_log_snr_to_sigma(lam) for lam in stage_lams[:-1]] + [sigma_next]
        preds, w_noise, r_prev, sigma_prev = [denoised], None, 0.0, sigma
        for k, r in enumerate(list(rs) + [1.0]):
            sigma_r, lam_r = stage_sigmas[k], stage_lams[k]
            alpha_r = sigma_r * np.exp(lam_r)
            x_r = (sigma_r / sigma * np.exp(F32(-r) * h * eta) * x
                   - _seeds_drift(alpha_r, F32(-r) * h_eta, k, rs, preds))
            if inject:
                f = F32(r_prev - r) * h * eta
                fresh = _neg_expm1_sqrt(2 * f) * noise_sampler(sigma_prev, sigma_r)
                w_noise = fresh if w_noise is None else w_noise * np.exp(f) + fresh
                x_r = x_r + times(w_noise, sigma_r, s_noise)
            if k < len(rs):
                preds.append(model(x_r, sigma_r))
            r_prev, sigma_prev = r, sigma_r
        x = x_r
    return x


def sample_seeds_2(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0, r=0.5):
    """SEEDS-2: Stochastic Explicit Exponential Derivative-free Solver, 2 stages (VP data prediction).

    Reference: ComfyUI ``sample_seeds_2``; Gonzalez et al., NeurIPS 2023 (arXiv:2305.14267)."""
    return _seeds(model, x, sigmas, noise, callback, eta, s_noise, (r,))


def sample_seeds_3(model, x, sigmas, noise, callback=None, eta=1.0, s_noise=1.0, r_1=1.0 / 3, r_2=2.0 / 3):
    """SEEDS-3: 3 stages at lambda fractions 1/3 and 2/3.

    Reference: ComfyUI ``sample_seeds_3``; Gonzalez et al., NeurIPS 2023 (arXiv:2305.14267)."""
    return _seeds(model, x, sigmas, noise, callback, eta, s_noise, (r_1, r_2))


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
    return (sigma_next * np.exp(lam_t)) * np.linalg.solve(vander_t, integrals).astype(F32)


def _combine(preds: list, b: np.ndarray):
    """sum_k b_k pred_k."""
    acc = preds[0] * b[0]
    for pk, bk in zip(preds[1:], b[1:]):
        acc = acc + pk * bk
    return acc


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
    lambdas = _half_log_snr(sigmas)
    ms = model.model_sampling
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
            x = sigma / sigmas[i - 1] * np.exp(F32(-(tau ** 2)) * h) * x + _combine(preds[-c_order:], b)
            if tau > 0 and s_noise > 0:
                x = x + step_noise
            if use_pece:
                denoised = model(x, sigma)
                preds[-1] = denoised

        if sigma_next == 0:  # predictor
            x = denoised
        else:
            tau = tau_fn(sigma_next)
            b = sa_b_coeffs(sigma_next, lambdas[i - p_order + 1:i + 1], lambdas[i], lambdas[i + 1], tau)
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigma_next / sigma * np.exp(F32(-(tau ** 2)) * h) * x + _combine(preds[-p_order:], b)
            if tau > 0 and s_noise > 0:
                step_noise = times(noise_sampler(sigma, sigma_next), sigma_next,
                                   _neg_expm1_sqrt(F32(-2 * tau ** 2) * h), F32(s_noise))
                x_pred = x_pred + step_noise
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
