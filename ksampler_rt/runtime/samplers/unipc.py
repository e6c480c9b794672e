"""UniPC (bh1 and bh2): the unified predictor-corrector multistep solver, as ComfyUI wraps it.

Behaviour follows ComfyUI 0.3.64 ``comfy/extra_samplers/uni_pc.py`` (``sample_unipc``,
``UniPC.multistep_uni_pc_bh_update``, ``UniPC.sample``), re-derived and written in numpy:

* the sampler runs in VP space: x_vp = x / sqrt(1 + sigma_0^2), and each model call turns the
  denoiser into an eps prediction at x_vp sqrt(1 + sigma^2) and back into a data (x0) prediction
  through alpha = 1/sqrt(1 + sigma^2) and sigma_vp = sigma alpha;
* a final sigma of 0 is replaced by 0.001 (a VP time the schedule can represent), and the result
  is divided by alpha(last sigma) at the end. ComfyUI makes that replacement in place, through the
  view ``sigmas[:]``, so its KSAMPLER's ``inverse_noise_scaling(sigmas[-1], x)`` afterwards sees
  0.001: an identity for VP models, but a division by 1 - 0.001 for flow (CONST) models, which is
  applied here (the KSampler's own inverse scaling at sigma 0 is then exact);
* order = min(3, steps - 1); the first steps ramp the order up, the last ones lower it
  (lower_order_final), the corrector runs on every step but the last, whose model value is never
  needed, so there are exactly ``steps`` model calls;
* the step coefficients depend only on the schedule, so they are computed once up front;
* with the compiled kernels (:mod:`..fused_jit`) each step's array maths runs as two fused passes,
  the same float32 operations in the same order (bit-identical; the numpy code below is the
  reference and the fallback).

Reference: Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models" (NeurIPS 2023, arXiv:2302.04867).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import fused_jit
from .common import F32, exp, expm1, is_flow, log, schedule_cached, sqrt
from .spec import SamplerSpec


# -- the VP view of sigma (ComfyUI's SigmaConvert), float32 ---------------------------------
# These scalars suffer cancellation (1 - e^{2 log alpha} near sigma -> 0); exp / log / sqrt / expm1 are
# the correctly rounded float32 scalar functions of .common (torch's 0-d path), not numpy's float32 SIMD
# ones, which can be several ulp off near 1.
def _log_alpha(sigma):
    return F32(0.5) * log(1 / (sigma * sigma + 1))


def _alpha(sigma):
    return exp(_log_alpha(sigma))


def _std(sigma):
    return sqrt(1 - exp(2 * _log_alpha(sigma)))


def _lambda(sigma):
    """log(alpha) - log(sigma_vp): the half-log-SNR of the VP view."""
    log_alpha = _log_alpha(sigma)
    return log_alpha - F32(0.5) * log(1 - exp(2 * log_alpha))


@dataclass
class _Update:
    """Coefficients of one UniPC-B(h) update from t_prev to t (data prediction)."""

    order: int
    x_scale: np.float32       # sigma_t / sigma_prev
    m0_scale: np.float32      # alpha_t h phi_1(-h)
    b_scale: np.float32       # alpha_t B(h)
    rks: np.ndarray           # lambda ratios of the older points (order - 1 of them)
    rhos_p: np.ndarray | None  # predictor weights on D1s (None: first order)
    rhos_c: np.ndarray | None  # corrector weights on D1s and D1_t (None: no corrector)


def _update_coefficients(t: np.ndarray, k: int, order: int, variant: str, use_corrector: bool) -> _Update:
    """The UniPC-B(h) coefficients for the step to t[k] using t[k-1], ..., t[k-order].

    Reference: ComfyUI ``UniPC.multistep_uni_pc_bh_update`` (predict_x0=True)."""
    lam_prev, lam_t = _lambda(t[k - 1]), _lambda(t[k])
    alpha_t = exp(_log_alpha(t[k]))
    h = lam_t - lam_prev
    rks = np.array([(_lambda(t[k - 1 - i]) - lam_prev) / h for i in range(1, order)] + [1.0], dtype=F32)
    hh = -h
    h_phi_1 = expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else h_phi_1
    rows, b, factorial = [], [], 1
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - F32(1 / factorial)
    R, b = np.stack(rows).astype(F32), np.array(b, dtype=F32)
    rhos_p = None
    if order >= 2:
        rhos_p = np.array([0.5], dtype=F32) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).astype(F32)
    rhos_c = None
    if use_corrector:
        rhos_c = np.array([0.5], dtype=F32) if order == 1 else np.linalg.solve(R, b).astype(F32)
    return _Update(order, _std(t[k]) / _std(t[k - 1]), alpha_t * h_phi_1, alpha_t * b_h, rks[:-1], rhos_p, rhos_c)


def _dot(weights, tensors):
    """sum_k w_k T_k."""
    acc = tensors[0] * weights[0]
    for w, tk in zip(weights[1:], tensors[1:]):
        acc = acc + tk * w
    return acc


@schedule_cached()
def unipc_plan(t: np.ndarray, variant: str = "bh1") -> list:
    """One _Update per step k = 1..steps: the order ramps up over the first steps and drops
    near the end (ComfyUI ``UniPC.sample`` with method='multistep', lower_order_final=True)."""
    steps = len(t) - 1
    order = min(3, len(t) - 2)
    if order <= 0:
        return []
    plan = []
    for k in range(1, steps + 1):
        step_order = k if k < order else min(order, steps + 1 - k)
        plan.append(_update_coefficients(t, k, step_order, variant, use_corrector=k != steps))
    return plan


def _data_prediction(model, x_vp, sigma, fused: bool):
    """The denoiser turned into UniPC's data prediction at x_vp (VP space)."""
    x_in = x_vp * ((sigma ** 2 + F32(1.0)) ** F32(0.5))
    d = model(x_in, sigma)
    if fused and fused_jit.fusable(x_vp, d):
        return fused_jit.unipc_data_prediction(x_vp, x_in, d, sigma, _std(sigma), _alpha(sigma))
    eps = (x_in - d) / sigma
    return (x_vp - _std(sigma) * eps) / _alpha(sigma)


def _predict(up: _Update, x, history: list) -> tuple:
    """(d1s, x_new): the scaled differences of the older data predictions and the predictor's x."""
    m0 = history[-1]
    d1s = [(history[-1 - i] - m0) / up.rks[i - 1] for i in range(1, up.order)]
    x_base = up.x_scale * x - up.m0_scale * m0
    return d1s, (x_base - up.b_scale * _dot(up.rhos_p, d1s) if up.rhos_p is not None else x_base)


def _correct(up: _Update, x, history: list, d1s: list, model_t):
    """The corrector's x from the data prediction model_t at the step's sigma."""
    corr = up.rhos_c[-1] * (model_t - history[-1])
    if d1s:
        corr = _dot(up.rhos_c[:-1], d1s) + corr
    return (up.x_scale * x - up.m0_scale * history[-1]) - up.b_scale * corr


def _step(model, up: _Update, x, history: list, sigma):
    """One predictor(-corrector) update to ``sigma`` in numpy: (x, the data prediction at sigma or None)."""
    d1s, x_new = _predict(up, x, history)
    if up.rhos_c is None:
        return x_new, None
    model_t = _data_prediction(model, x_new, sigma, False)  # also the model value at sigma
    return _correct(up, x, history, d1s, model_t), model_t


def _step_fused(model, up: _Update, x, history: list, sigma):
    """:func:`_step` with the compiled passes (the same float32 operations in the same order): the
    predictor's model input in one pass, the data prediction and the corrector in another."""
    if not fused_jit.fusable(x, *history):
        return _step(model, up, x, history, sigma)
    if up.rhos_c is None:
        return fused_jit.unipc_predict(up, x, history), None
    c_in = (sigma ** 2 + F32(1.0)) ** F32(0.5)
    x_in = fused_jit.unipc_predict(up, x, history, c_in)
    d = model(x_in, sigma)
    if not fused_jit.fusable(x, d):  # e.g. a float64 denoiser output: numpy's promotions, as in _step
        d1s, x_new = _predict(up, x, history)
        model_t = (x_new - _std(sigma) * ((x_in - d) / sigma)) / _alpha(sigma)
        return _correct(up, x, history, d1s, model_t), model_t
    return fused_jit.unipc_correct(up, x, history, d, c_in, sigma, _std(sigma), _alpha(sigma))


def sample_unipc(model, x, sigmas, noise=None, callback=None, variant="bh1"):
    """UniPC multistep (B(h) = h for bh1, e^h - 1 for bh2), data prediction, in VP space."""
    t = np.array(sigmas, dtype=F32)
    if t[-1] == 0:
        t[-1] = F32(0.001)
    plan = unipc_plan(t, variant)
    x = x / np.sqrt(F32(1.0) + t[0] ** F32(2.0))
    fused = fused_jit.ready(x)
    step = _step_fused if fused else _step
    history = [_data_prediction(model, x, t[0], fused)]  # data predictions at t[k-1], t[k-2], ... (newest last)
    steps = len(t) - 1
    if callback is not None:
        callback(0, x, history[-1])
    for k, up in enumerate(plan, start=1):
        x, model_t = step(model, up, x, history, t[k])
        if model_t is not None:
            history = (history + [model_t])[-3:]
        # ComfyUI reports once per model call: the last call's report comes after the final update.
        if callback is not None and k != steps - 1:
            callback(k if k < steps else steps - 1, x, history[-1])
    x = x / _alpha(t[-1])
    if sigmas[-1] == 0 and is_flow(model.model_sampling):
        # ComfyUI's in-place sigmas[-1] = 0.001 reaches its inverse_noise_scaling (see the module notes)
        x = model.model_sampling.inverse_noise_scaling(t[-1], x)
    return x


def sample_unipc_bh2(model, x, sigmas, noise=None, callback=None):
    return sample_unipc(model, x, sigmas, noise, callback, variant="bh2")


SAMPLERS: dict[str, SamplerSpec] = {
    "uni_pc": SamplerSpec(sample_unipc),
    "uni_pc_bh2": SamplerSpec(sample_unipc_bh2),
}
