"""Multistep ODE samplers: iPNDM, iPNDM-v, DEIS, RES multistep, gradient estimation.

Behaviour follows ComfyUI 0.3.64 ``comfy/k_diffusion/sampling.py`` (``sample_ipndm``,
``sample_ipndm_v``, ``sample_deis``, ``res_multistep``, ``sample_gradient_estimation``) and
``comfy/k_diffusion/deis.py`` (the 'tab' coefficient table), re-derived and written in numpy.
All maths is float32 like ComfyUI's CPU path: sigmas are float32 scalars and tensor updates are
applied in the same order, so results agree to float32 rounding.
"""
from __future__ import annotations

import numpy as np

from .. import fused_steps
from .common import (
    F32, get_ancestral_step, half_log_snr_to_sigma, nan_to_zero, phi1, phi2, schedule_cached, sigma_to_half_log_snr,
    times, to_d, torch_linspace,
)
from .spec import SamplerSpec


def _denoise(model, x, sigma, cfg_pp: bool):
    """(denoised, direction denoised): the CFG++ samplers steer with the uncond prediction."""
    if cfg_pp:
        return model.with_uncond(x, sigma)
    denoised = model(x, sigma)
    return denoised, denoised


def _push(buffer: list, d, max_order: int) -> None:
    """Keep the last ``max_order - 1`` derivatives, oldest first."""
    buffer.append(d)
    del buffer[:-(max_order - 1)]


# -- iPNDM ----------------------------------------------------------------------------------
# Adams-Bashforth weights on the derivative history, newest first (Zhang & Chen, "Fast Sampling
# of Diffusion Models with Exponential Integrator", 2022, iPNDM).
_IPNDM_WEIGHTS = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


def _weighted(ds, weights):
    """sum_k w_k * d_k, accumulated left to right like ComfyUI's expressions."""
    acc = weights[0] * ds[0]
    for w, d in zip(weights[1:], ds[1:]):
        acc = acc + w * d
    return acc


def sample_ipndm(model, x, sigmas, noise=None, callback=None, max_order=4):
    """Improved PNDM: fixed-weight Adams-Bashforth on d = (x - D)/sigma, order ramping up to 4.

    Reference: ComfyUI ``sample_ipndm``; Zhang & Chen 2022 (arXiv:2204.13902)."""
    sigmas = np.asarray(sigmas, dtype=F32)
    history: list = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        d = to_d(x, sigma, denoised)
        order = min(max_order, i + 1)
        if sigma_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (sigma_next - sigma) * d
        else:
            weights, div = _IPNDM_WEIGHTS[order]
            ds = [d] + history[::-1]
            if fused_steps.ready(x, *ds):
                x_next = fused_steps.ipndm_step(x, ds, weights, div, sigma_next - sigma)  # same bits, 1 pass
            else:
                x_next = x + (sigma_next - sigma) * _weighted(ds, weights) / div
        _push(history, d, max_order)
        x = x_next
    return x


def _ipndm_v_coeffs(sigmas: np.ndarray, i: int, order: int) -> tuple:
    """Variable-step iPNDM weights for step i (newest derivative first), float32.

    Reference: ComfyUI ``sample_ipndm_v`` (from zju-pi/diff-sampler ``solvers.py``)."""
    t = sigmas
    h = t[i + 1] - t[i]
    if order == 1:
        return (F32(1.0),)
    h1 = t[i] - t[i - 1]
    c1, c2 = (2 + h / h1) / 2, -(h / h1) / 2
    if order == 2:
        return c1, c2
    h2 = t[i - 1] - t[i - 2]
    temp1 = (1 - h / (3 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return c1 + temp1, c2 - (1 + h1 / h2) * temp1, temp1 * h1 / h2
    h3 = t[i - 2] - t[i - 3]
    temp2 = (((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2)))
             * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
    ratio = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return (c1 + temp1 + temp2,
            c2 - (1 + h1 / h2) * temp1 - (1 + (h1 / h2) + ratio) * temp2,
            temp1 * h1 / h2 + ((h1 / h2) + ratio * (1 + h2 / h3)) * temp2,
            -temp2 * ratio * h1 / h2)


@schedule_cached()
def _ipndm_v_table(sigmas: np.ndarray, max_order: int) -> list:
    """Every step's variable-step weights (None for a step to sigma 0)."""
    n = len(sigmas) - 1
    return [_ipndm_v_coeffs(sigmas, i, min(max_order, i + 1)) if sigmas[i + 1] != 0 else None for i in range(n)]


def sample_ipndm_v(model, x, sigmas, noise=None, callback=None, max_order=4):
    """iPNDM with weights re-derived for non-uniform steps (order up to 4).

    Reference: ComfyUI ``sample_ipndm_v``; Zhang & Chen 2022 (arXiv:2204.13902)."""
    sigmas = np.asarray(sigmas, dtype=F32)
    n = len(sigmas) - 1
    coeffs = _ipndm_v_table(sigmas, max_order)
    history: list = []
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x_next = denoised
        else:
            ds, w = [d] + history[::-1], coeffs[i]
            if len(ds) > 1 and fused_steps.scalars_f32(*w) and fused_steps.ready(x, *ds):
                x_next = fused_steps.ipndm_step(x, ds, w, 1, sigma_next - sigma)  # /1 is exact: same bits
            else:
                x_next = x + (sigma_next - sigma) * _weighted(ds, w)
        _push(history, d, max_order)
        x = x_next
    return x


# -- DEIS -----------------------------------------------------------------------------------
def _deis_vp_times(sigmas: np.ndarray, epsilon_s=1e-3, sigma_min=0.002, sigma_max=80.0):
    """EDM sigma -> VP time t of the linear-beta VP SDE that DEIS integrates in (deis.py ``edm2t``)."""
    log_min, log_max = np.log(F32(sigma_min) ** 2 + 1), np.log(F32(sigma_max) ** 2 + 1)
    beta_d = 2 * (log_min / F32(epsilon_s) - log_max) / F32(epsilon_s - 1)
    beta_min = log_max - F32(0.5) * beta_d
    t = (np.sqrt(beta_min ** 2 + 2 * beta_d * np.log(sigmas ** 2 + 1)) - beta_min) / beta_d
    return t.astype(F32), F32(beta_min), F32(beta_d + beta_min)


@schedule_cached()
def deis_coefficients(sigmas: np.ndarray, max_order: int = 3, n_points: int = 10000) -> list:
    """The 'tab' DEIS table: for each step with order >= 2, the integrals over [t_i, t_{i+1}] of
    the VP exponential-integrator weight times each Lagrange basis polynomial through the
    previous VP times, by a left Riemann sum of ``n_points`` (Zhang & Chen 2022, eq. 14).

    Reference: ComfyUI ``comfy/k_diffusion/deis.py: get_deis_coeff_list(deis_mode='tab')``."""
    t_steps, beta_0, beta_1 = _deis_vp_times(np.asarray(sigmas, dtype=F32))
    table = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(len(t_steps) - 1):
            order = min(i + 1, max_order)
            if order == 1:
                table.append(())
                continue
            t_cur, t_next = t_steps[i], t_steps[i + 1]
            taus = torch_linspace(t_cur, t_next, n_points)  # deis.py: torch.linspace(t_cur, t_next, N)
            dtau = (t_next - t_cur) / F32(n_points)
            alpha = np.exp(F32(-0.5) * taus ** 2 * (beta_1 - beta_0) - taus * beta_0)
            d_log_alpha = -(taus * (beta_1 - beta_0)) - beta_0
            integrand = F32(-0.5) * d_log_alpha / np.sqrt(alpha * (1 - alpha))
            prev_t = t_steps[[i - k for k in range(order)]]
            row = []
            for j in range(order):
                poly = np.ones_like(taus)
                for k in range(order):
                    if k != j:
                        poly = poly * ((taus - prev_t[k]) / (prev_t[j] - prev_t[k]))
                row.append(F32(np.sum(integrand * poly, dtype=F32) * dtau))
            table.append(tuple(row))
    return table


def sample_deis(model, x, sigmas, noise=None, callback=None, max_order=3):
    """DEIS multistep ('tab' mode, order up to 3): x_{i+1} = x_i + sum_j C_ij d_{i-j}.

    Reference: ComfyUI ``sample_deis``; Zhang & Chen 2022 (arXiv:2204.13902)."""
    sigmas = np.asarray(sigmas, dtype=F32)
    table = deis_coefficients(sigmas, max_order)
    history: list = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        d = to_d(x, sigma, denoised)
        order = min(max_order, i + 1) if sigma_next > 0 else 1
        if order == 1:
            x_next = x + (sigma_next - sigma) * d
        else:
            x_next = x
            for c, dk in zip(table[i], [d] + history[::-1]):
                x_next = x_next + c * dk
        _push(history, d, max_order)
        x = x_next
    return x


# -- RES multistep --------------------------------------------------------------------------
t_fn = sigma_to_half_log_snr   # t = lambda = -log sigma, ComfyUI's t_fn on a 0-d tensor
sigma_fn = half_log_snr_to_sigma


def res_multistep(model, x, sigmas, noise, callback=None, eta=1.0, cfg_pp=False, s_noise=1.0):
    """RES second-order multistep exponential integrator in lambda = -log(sigma), with optional
    ancestral noise (eta) and CFG++. The first step and steps to sigma_down = 0 are Euler.

    Reference: ComfyUI ``res_multistep``; Zhang et al. 2023 "Improved order analysis and design
    of exponential integrator for diffusion models sampling" (arXiv:2308.02157)."""
    sigmas = np.asarray(sigmas, dtype=F32)
    noise_sampler = noise.default(x)
    old_denoised = old_sigma_down = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, guide = _denoise(model, x, sigma, cfg_pp)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta=eta)
        if callback is not None:
            callback(i, x, denoised)
        if sigma_down == 0 or old_denoised is None:  # Euler
            if cfg_pp:
                x = denoised + to_d(x, sigma, guide) * sigma_down
            else:
                x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            t, t_old, t_next, t_prev = t_fn(sigma), t_fn(old_sigma_down), t_fn(sigma_down), t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                phi1_val, phi2_val = phi1(-h), phi2(-h)
                b1 = nan_to_zero(phi1_val - phi2_val / c2)
                b2 = nan_to_zero(phi2_val / c2)
            a = sigma_fn(h)
            nz = noise_sampler(sigma, sigma_next) if sigma_next > 0 and eta > 0 else None
            if (fused_steps.scalars_f32(a, h, b1, b2, sigma_up)
                    and fused_steps.ready(x, denoised, guide, old_denoised, *([] if nz is None else [nz]))):
                # one pass, same float32 operations in the same order as below
                x = fused_steps.res_step(x, denoised, guide, old_denoised, nz, cfg_pp, a, h, b1, b2, F32(s_noise),
                                         sigma_up)
                old_denoised, old_sigma_down = guide, sigma_down
                continue
            if cfg_pp:
                x = x + (denoised - guide)
            x = a * x + h * (b1 * guide + b2 * old_denoised)
            if nz is not None:
                x = x + times(nz, F32(s_noise), sigma_up)
            old_denoised, old_sigma_down = guide, sigma_down
            continue
        # ComfyUI draws here even when sigma_up == 0; with eta == 0 every draw is multiplied by 0.
        if sigma_next > 0 and eta > 0:
            x = x + times(noise_sampler(sigma, sigma_next), F32(s_noise), sigma_up)
        old_denoised, old_sigma_down = guide, sigma_down
    return x


def sample_res_multistep(model, x, sigmas, noise, callback=None):
    return res_multistep(model, x, sigmas, noise, callback, eta=0.0, cfg_pp=False)


def sample_res_multistep_cfg_pp(model, x, sigmas, noise, callback=None):
    return res_multistep(model, x, sigmas, noise, callback, eta=0.0, cfg_pp=True)


def sample_res_multistep_ancestral(model, x, sigmas, noise, callback=None, eta=1.0):
    return res_multistep(model, x, sigmas, noise, callback, eta=eta, cfg_pp=False)


def sample_res_multistep_ancestral_cfg_pp(model, x, sigmas, noise, callback=None, eta=1.0):
    return res_multistep(model, x, sigmas, noise, callback, eta=eta, cfg_pp=True)


# -- gradient estimation --------------------------------------------------------------------
def sample_gradient_estimation(model, x, sigmas, noise=None, callback=None, ge_gamma=2.0, cfg_pp=False):
    """Euler steps plus a gradient-estimation correction (gamma - 1)(d_i - d_{i-1}) dt from step 2.

    Reference: ComfyUI ``sample_gradient_estimation``; Permenter & Yuan, "Interpreting and
    Improving Diffusion Models from an Optimization Perspective" (ICML 2024)."""
    sigmas = np.asarray(sigmas, dtype=F32)
    old_d = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, guide = _denoise(model, x, sigma, cfg_pp)
        if callback is not None:
            callback(i, x, denoised)
        dt = sigma_next - sigma
        if sigma_next != 0 and fused_steps.ready(x, denoised, guide, *(() if i < 1 else (old_d,))):
            # one pass, the same float32 operations as below
            x, old_d = fused_steps.ge_step(x, denoised, guide, old_d if i >= 1 else None, cfg_pp, sigma,
                                           sigma_next, dt, F32(ge_gamma - 1))
            continue
        d = to_d(x, sigma, guide)
        if sigma_next == 0:
            x = denoised
        else:
            x = denoised + d * sigma_next if cfg_pp else x + d * dt
            if i >= 1:
                x = x + F32(ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def sample_gradient_estimation_cfg_pp(model, x, sigmas, noise=None, callback=None, ge_gamma=2.0):
    return sample_gradient_estimation(model, x, sigmas, noise, callback, ge_gamma=ge_gamma, cfg_pp=True)


SAMPLERS: dict[str, SamplerSpec] = {
    "ipndm": SamplerSpec(sample_ipndm),
    "ipndm_v": SamplerSpec(sample_ipndm_v),
    "deis": SamplerSpec(sample_deis),
    "res_multistep": SamplerSpec(sample_res_multistep),
    "res_multistep_cfg_pp": SamplerSpec(sample_res_multistep_cfg_pp, cfg_pp=True),
    "res_multistep_ancestral": SamplerSpec(sample_res_multistep_ancestral),
    "res_multistep_ancestral_cfg_pp": SamplerSpec(sample_res_multistep_ancestral_cfg_pp, cfg_pp=True),
    "gradient_estimation": SamplerSpec(sample_gradient_estimation),
    "gradient_estimation_cfg_pp": SamplerSpec(sample_gradient_estimation_cfg_pp, cfg_pp=True),
}
