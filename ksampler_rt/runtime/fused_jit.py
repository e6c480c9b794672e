"""Compiled fused array passes (numba, extra ``[jit]``) for the Brownian noise and UniPC.

On a 16-channel latent (SD3, Flux: 1 MiB per [1,16,128,128] array) the host time of these samplers
is numpy's array passes: one call, one temporary and one sweep through memory per operation. The
kernels here do the same float32 operations in the same order per element, in one loop, so results
are bit-identical to the numpy code (which stays the reference and the fallback):

* :func:`brownian_sum`: a Brownian-tree query's increment, the sum of its tree intervals' values left
  to right, negated and divided by sqrt(|dt|) as the noise sampler does (one pass instead of
  about 15 on Flux at 20 steps);
* :func:`unipc_predict`, :func:`unipc_correct`, :func:`unipc_data_prediction`: the UniPC-B(h)
  predictor (its model input) in one pass, the data prediction and the corrector in another (about
  25 numpy passes per step become 2; the corrector recomputes the predictor's values instead of
  reading them back);
* :func:`rf_renoise`, :func:`cfg_pp_renoise`, :func:`ddpm`, :func:`dpmpp_2m_cfg_pp`: one step's update
  of the ancestral RF Euler, ancestral CFG++ Euler, DDPM and CFG++ DPM-Solver++(2M) samplers in one
  pass each (callers in :mod:`.samplers.common` / :mod:`.samplers.dpmpp` keep the numpy fallback).

They follow the compiled kernels' switch (:func:`.jit.available`: numba present, ``KSAMPLER_RT_JIT``
not 0) and add their own self-check against the numpy expressions on first use. Importing this module
never imports numba.
"""
from __future__ import annotations


import numpy as np

from . import jit

__all__ = ["available", "brownian_sum", "cfg_pp_renoise", "ddpm", "dpmpp_2m_cfg_pp", "fusable", "ready", "rf_renoise",
           "scalars_f32", "unipc_data_prediction", "unipc_correct", "unipc_predict"]

F32 = np.float32
_K: dict = {}
_EMPTY = np.empty(0, F32)


def available() -> bool:
    """True when the compiled kernels are on (:func:`.jit.available`) and these passed their check."""
    return _KERNELS.available()


def fusable(*arrays) -> bool:
    """Whether the kernels can take these arrays: C-contiguous float32 of one shape (anything else,
    e.g. a float64 model output, keeps numpy's own promotion rules on the numpy path)."""
    shape = arrays[0].shape
    return all(isinstance(a, np.ndarray) and a.dtype == F32 and a.flags.c_contiguous and a.shape == shape
               for a in arrays)


def ready(*arrays) -> bool:
    """:func:`available` and :func:`fusable` for these arrays: whether a caller may take the compiled pass."""
    return available() and fusable(*arrays)


def scalars_f32(*values) -> bool:
    """Whether every value is a numpy float32 scalar (what the kernels compute in; a Python float or a
    float64 scalar would follow other promotion rules on the numpy path)."""
    return all(isinstance(v, F32) for v in values)


def _compile() -> None:
    if not _K:
        from . import _fused_kernels as k

        _K.update(sum_scaled=k.sum_scaled, unipc_predict=k.unipc_predict, unipc_correct=k.unipc_correct,
                  data_prediction=k.data_prediction, rf_renoise=k.rf_renoise,
                  cfg_pp_renoise=k.cfg_pp_renoise, ddpm=k.ddpm,
                  dpmpp_2m_cfg_pp=k.dpmpp_2m_cfg_pp)


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1)


# ------------------------------------------------------------------------------ Brownian increment
def brownian_sum(values: list, negate: bool, divisor) -> np.ndarray:
    """``(+-(values[0] + values[1] + ...)) / divisor`` in float32, summed left to right (numpy:
    ``w = values[0].copy(); w = w + v ...; w = -w; w / divisor``). values: C-contiguous float32
    arrays of one shape (checked); divisor: a float32 scalar. Callers check :func:`available`."""
    if not values or not fusable(*values):
        raise ValueError("values: received arrays that are not C-contiguous float32 of one shape, expected such")
    addrs = np.array([v.__array_interface__["data"][0] for v in values], dtype=np.int64)
    out = np.empty_like(values[0])
    _K["sum_scaled"](addrs, values[0].size, bool(negate), F32(divisor), _flat(out))
    return out  # ``values`` (the caller's list) keeps every input alive during the call


# ------------------------------------------------------------------------------ UniPC
def _history3(history: list) -> tuple:
    """(m0, h1, h2): the newest data predictions (m0 stands in for one not there yet; unused then)."""
    m0 = history[-1]
    h1 = history[-2] if len(history) > 1 else m0
    h2 = history[-3] if len(history) > 2 else m0
    return _flat(m0), _flat(h1), _flat(h2)


def _pair(w) -> tuple:
    w = [] if w is None else list(w)
    return (F32(w[0]) if w else F32(0.0)), (F32(w[1]) if len(w) > 1 else F32(0.0))


def _coefficients(up) -> tuple:
    """The step plan's scalars in the kernels' argument order (nd, r1, r2, xs, ms, bs, p1, p2)."""
    nd = up.order - 1
    r1, r2 = _pair(up.rks)
    p1, p2 = _pair(up.rhos_p if nd else None)
    return nd, r1, r2, F32(up.x_scale), F32(up.m0_scale), F32(up.b_scale), p1, p2


def unipc_predict(up, x: np.ndarray, history: list, c_in=None) -> np.ndarray:
    """The predictor of one UniPC step (see :mod:`.samplers.unipc`): x_new * c_in, the model's input,
    or x_new itself when ``c_in`` is None (the last step, no model call). c_in > 0."""
    out = np.empty_like(x)
    _K["unipc_predict"](_flat(x), *_history3(history), *_coefficients(up),
                        F32(0.0 if c_in is None else c_in), _flat(out))
    return out


def unipc_correct(up, x, history, d, c_in, sigma, std, alpha) -> tuple:
    """The corrector of one UniPC step from the denoiser value ``d`` at the model input that
    :func:`unipc_predict` gave for ``c_in``: returns (the corrected x, model_t, the data prediction)."""
    c1, c2 = _pair(up.rhos_c[:-1])
    model_t = np.empty_like(x)
    x_out = np.empty_like(x)
    _K["unipc_correct"](_flat(x), *_history3(history), _flat(d), *_coefficients(up), F32(c_in), c1, c2,
                        F32(up.rhos_c[-1]), F32(sigma), F32(std), F32(alpha), _flat(model_t), _flat(x_out))
    return x_out, model_t


def unipc_data_prediction(x_vp, x_in, d, sigma, std, alpha) -> np.ndarray:
    """(x_vp - std ((x_in - d) / sigma)) / alpha in one pass."""
    out = np.empty_like(x_vp)
    _K["data_prediction"](_flat(x_vp), _flat(x_in), _flat(d), F32(sigma), F32(std), F32(alpha), _flat(out))
    return out


# ------------------------------------------------------------------------------ ancestral RF step
def rf_renoise(x, d, nz, ratio, alpha_ratio, s_noise, coeff) -> np.ndarray:
    """``alpha_ratio * (ratio * x + (1 - ratio) * d) + nz * s_noise * coeff`` in one pass (the RF Euler
    step then the rescale and renoise of ComfyUI's ``sample_euler_ancestral_RF``); scalars float32."""
    out = np.empty_like(x)
    ratio = F32(ratio)
    _K["rf_renoise"](_flat(x), _flat(d), _flat(nz), ratio, F32(1) - ratio, F32(alpha_ratio), F32(s_noise),
                     F32(coeff), _flat(out))
    return out


def cfg_pp_renoise(x, d, u, nz, sigma, alpha_s, alpha_t, sigma_down, s_noise, sigma_up) -> np.ndarray:
    """``(alpha_t d + sigma_down ((x - alpha_s u) / sigma)) + nz alpha_t s_noise sigma_up`` in one pass."""
    out = np.empty_like(x)
    _K["cfg_pp_renoise"](_flat(x), _flat(d), _flat(u), _flat(nz), *(F32(v) for v in (
        sigma, alpha_s, alpha_t, sigma_down, s_noise, sigma_up)), _flat(out))
    return out


def ddpm(x, d, nz, q, sigma, oma, k1, k2, k3, k4) -> np.ndarray:
    """``(k1 (x / q - (oma ((x - d) / sigma)) / k2) + k3 nz) k4`` in one pass (a DDPM step)."""
    out = np.empty_like(x)
    _K["ddpm"](_flat(x), _flat(d), _flat(nz), *(F32(v) for v in (q, sigma, oma, k1, k2, k3, k4)), _flat(out))
    return out


def dpmpp_2m_cfg_pp(x, d, u, old, ne, mc, e) -> np.ndarray:
    """``d + (ne u - mc (d - old)) + e x`` in one pass (a second-order CFG++ DPM-Solver++(2M) step)."""
    out = np.empty_like(x)
    _K["dpmpp_2m_cfg_pp"](_flat(x), _flat(d), _flat(u), _flat(old), F32(ne), F32(mc), F32(e), _flat(out))
    return out


# ------------------------------------------------------------------------------ self-check
def _self_check() -> None:
    """Each kernel against the numpy expressions it replaces, bit for bit."""
    rng = np.random.default_rng(0)
    arrs = [rng.standard_normal((3, 5, 7)).astype(F32) for _ in range(6)]  # 105 elements: not a whole block
    d = F32(0.37)
    w = arrs[0].copy()
    for v in arrs[1:]:
        w = w + v
    if not np.array_equal(brownian_sum(arrs, True, d), -w / d):
        raise RuntimeError("self-check failed: brownian_sum")
    x, m0, h1, h2, dd, _ = arrs
    s = [F32(v) for v in (0.8, 1.3, -0.7, 0.45, 0.55, 2.5, 1.7, 0.6, 0.9, -0.2, 0.3, 1.1)]
    up = _Up(3, s[0], s[1], s[2], [s[3], s[4]], [s[5], s[6]], [s[7], s[8], s[9]])
    d1 = [(h1 - m0) / s[3], (h2 - m0) / s[4]]
    base = s[0] * x - s[1] * m0
    x_new = base - s[2] * (d1[0] * s[5] + d1[1] * s[6])
    got_in = unipc_predict(up, x, [h2, h1, m0], s[10])
    got_new = unipc_predict(up, x, [h2, h1, m0])
    x_in = x_new * s[10]
    mt = (x_new - s[11] * ((x_in - dd) / s[9])) / s[8]
    x_out = base - s[2] * ((d1[0] * s[7] + d1[1] * s[8]) + s[9] * (mt - m0))
    got_out, got_mt = unipc_correct(up, x, [h2, h1, m0], dd, s[10], s[9], s[11], s[8])
    got_dp = unipc_data_prediction(x, x_in, dd, s[9], s[11], s[8])
    if not (np.array_equal(got_new, x_new) and np.array_equal(got_in, x_in) and np.array_equal(got_mt, mt)
            and np.array_equal(got_out, x_out) and np.array_equal(got_dp, (x - s[11] * ((x_in - dd) / s[9])) / s[8])):
        raise RuntimeError("self-check failed: UniPC step")
    r, a, c = F32(0.83), F32(1.07), F32(0.21)
    for sn in (F32(1.0), F32(0.9)):
        if not np.array_equal(rf_renoise(x, dd, m0, r, a, sn, c), a * (r * x + (1 - r) * dd) + m0 * sn * c):
            raise RuntimeError("self-check failed: rf_renoise")
    k = [F32(v) for v in (1.1, 0.45, 0.62, 0.3, 0.9, 0.55, 1.2)]
    want = (k[2] * dd + k[3] * ((x - k[1] * h1) / k[0])) + m0 * k[2] * k[4] * k[5]
    if not np.array_equal(cfg_pp_renoise(x, dd, h1, m0, *k[:6]), want):
        raise RuntimeError("self-check failed: cfg_pp_renoise")
    want = (k[3] * (x / k[0] - k[2] * ((x - dd) / k[1]) / k[4]) + k[5] * m0) * k[6]
    if not np.array_equal(ddpm(x, dd, m0, *k), want):
        raise RuntimeError("self-check failed: ddpm")
    if not np.array_equal(dpmpp_2m_cfg_pp(x, dd, h1, h2, *k[:3]), dd + (k[0] * h1 - k[1] * (dd - h2)) + k[2] * x):
        raise RuntimeError("self-check failed: dpmpp_2m_cfg_pp")


class _Up:
    """A stand-in for a UniPC step plan (:class:`.samplers.unipc._Update`) in the self-check."""

    def __init__(self, order, x_scale, m0_scale, b_scale, rks, rhos_p, rhos_c):
        self.order, self.x_scale, self.m0_scale, self.b_scale = order, x_scale, m0_scale, b_scale
        self.rks, self.rhos_p, self.rhos_c = np.array(rks, F32), np.array(rhos_p, F32), np.array(rhos_c, F32)


jit.register_warm_up(available)  # jit.warm_up_in_background() loads these too


_KERNELS = jit.CheckedKernels("fused passes", _compile, _self_check)
