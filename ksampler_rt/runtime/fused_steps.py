"""Compiled fused passes (numba, extra ``[jit]``) for sampler updates on big latents.

Each replaces a chain of numpy array expressions (one call, one temporary and one sweep through
memory per operation) by one loop doing the same float32 operations in the same order, so results
are bit-identical to the numpy code in :mod:`.samplers`, which stays the reference and the fallback:

* :func:`ipndm_step`: iPNDM's Adams-Bashforth update ``x + (sigma_next - sigma) * sum_k w_k d_k / div``
  (ComfyUI ``sample_ipndm``); :func:`res_step`: ``res_multistep``'s second-order step;
* :func:`eps_of`, :func:`lin_step`, :func:`rms_scaled`: DPM-Solver's eps, its stages and steps, and
  the adaptive solver's scaled error (``dpm_fast``, ``dpm_adaptive``); :func:`lms_step`: LMS's slope
  and Adams-Bashforth update;
* :func:`seeds_stage`, :func:`er_sde_step`, :func:`sa_step`: a SEEDS stage, an ER-SDE step and an
  SA-Solver predictor or corrector, each with its SDE noise; :func:`ge_step`: a gradient-estimation
  step (plain or CFG++).

Callers check :func:`available` and :func:`fusable` (and that their scalars are float32). Follows
:func:`.jit.available` and self-checks on first use; importing this module never imports numba.
"""
from __future__ import annotations

import numpy as np

from . import jit
from .fused_jit import fusable, scalars_f32  # one definition of what the compiled passes take

__all__ = ["available", "eps_of", "er_sde_step", "fusable", "ge_step", "ipndm_step", "lin_step", "lms_step", "ready", "res_step",
           "rms_scaled", "sa_step", "scalars_f32", "seeds_stage"]

F32 = np.float32
_K: dict = {}


def available() -> bool:
    """True when the compiled kernels are on and passed their self-check."""
    return _KERNELS.available()


def _compile() -> None:
    if not _K:
        from . import _fused_step_kernels as k

        _K.update(ipndm_step=k.ipndm_step, res_step=k.res_step, eps_of=k.eps_of, lin_step=k.lin_step,
                  lms_step=k.lms_step, rms_scaled=k.rms_scaled, seeds_stage=k.seeds_stage,
                  er_sde_step=k.er_sde_step, sa_step=k.sa_step, ge_step=k.ge_step)


def ipndm_step(x: np.ndarray, ds: list, weights, div: int, step) -> np.ndarray:
    """``x + step * (w0 ds[0] + w1 ds[1] + ...) / div`` (2 to 4 terms, left to right); integer weights
    and div exact in float32, ``step`` a float32 scalar. Callers check :func:`available` and
    :func:`fusable`."""
    if not 2 <= len(ds) <= 4 or len(weights) != len(ds):
        raise ValueError(f"ds: received {len(ds)} arrays, expected 2 to 4 matching weights")
    flat = [d.reshape(-1) for d in ds]
    flat += [flat[0]] * (4 - len(flat))
    w = [F32(v) for v in weights] + [F32(0)] * (4 - len(weights))
    out = np.empty_like(x)
    _K["ipndm_step"](x.reshape(-1), *flat, len(ds) - 1, *w, F32(step), F32(div), out.reshape(-1))
    return out


def res_step(x, denoised, guide, old, nz, cfg_pp: bool, a, h, b1, b2, s_noise, sigma_up) -> np.ndarray:
    """ComfyUI ``res_multistep``'s second-order step ``a * x + h * (b1 * guide + b2 * old)`` (x first
    shifted by ``denoised - guide`` under CFG++), then ``+ nz * s_noise * sigma_up`` when ``nz`` is not
    None; every scalar a float32 (callers check, with :func:`available` and :func:`fusable`)."""
    noisy = nz is not None
    out = np.empty_like(x)
    f = [v.reshape(-1) for v in (x, denoised, guide, old, nz if noisy else x)]
    _K["res_step"](*f, bool(cfg_pp), F32(a), F32(h), F32(b1), F32(b2), F32(s_noise), F32(sigma_up), noisy,
                   out.reshape(-1))
    return out


def ready(*arrays) -> bool:
    """:func:`available` and :func:`fusable` for these arrays: whether a caller may take the compiled pass."""
    return available() and fusable(*arrays)


def _f(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1)


def eps_of(x: np.ndarray, den: np.ndarray, sigma) -> np.ndarray:
    """``(x - den) / sigma`` in one pass."""
    out = np.empty_like(x)
    _K["eps_of"](_f(x), _f(den), F32(sigma), _f(out))
    return out


def lin_step(x: np.ndarray, a, e: np.ndarray, b=None, f: np.ndarray | None = None) -> np.ndarray:
    """``x - a * e`` or, with ``b`` and ``f``, ``x - a * e - b * (f - e)`` in one pass."""
    two = f is not None
    out = np.empty_like(x)
    _K["lin_step"](_f(x), _f(e), _f(f if two else e), F32(a), F32(0.0 if b is None else b), two, _f(out))
    return out


def lms_step(x: np.ndarray, den: np.ndarray, sigma, history: list, coeffs) -> tuple:
    """LMS's step: ``d = (x - den) / sigma`` and ``x + sum(c_j * d_j)`` over d then ``history`` (the
    older slopes, newest first, as many as ``coeffs`` has more than one), summed from 0 left to right
    like Python's ``sum``. Returns (x_next, d)."""
    k = len(coeffs) - 1
    if not 0 <= k <= 3 or len(history) < k:
        raise ValueError(f"coeffs: received {len(coeffs)} with {len(history)} older slopes, expected 1 to 4 "
                         "and that many slopes")
    hs = [_f(h) for h in history[:k]] + [_f(x)] * (3 - k)
    c = [F32(v) for v in coeffs] + [F32(0.0)] * (3 - k)
    d, out = np.empty_like(x), np.empty_like(x)
    _K["lms_step"](_f(x), _f(den), F32(sigma), *hs, k, F32(0.0), *c, _f(d), _f(out))
    return out, d


def rms_scaled(x_low: np.ndarray, x_high: np.ndarray, x_prev: np.ndarray, atol, rtol) -> np.ndarray:
    """``((x_low - x_high) / max(atol, rtol * max(|x_low|, |x_prev|))).astype(float64)`` in one pass."""
    out = np.empty(x_low.shape, np.float64)
    _K["rms_scaled"](_f(x_low), _f(x_high), _f(x_prev), F32(atol), F32(rtol), _f(out))
    return out


def seeds_stage(x, a, c, u, *, v=None, lerp=None, pq=None, sde=None, nz=None, e=None, qn=None, sig=None,
                s_noise=1.0, keep_noise: bool = True) -> tuple:
    """One SEEDS stage ``a * x - c * z`` where z is ``u``, ``torch.lerp(u, v, lerp)`` (``lerp``: the float32
    weight) or ``p * u + q * v`` (``pq=(p, q)``); with ``nz`` the stage's SDE noise
    ``s = qn * nz`` (or ``sde * e + qn * nz`` given the previous ``sde``) is added as ``s * sig * s_noise``.
    Returns (x_next, s or None; None also with ``keep_noise=False``, for a last stage)."""
    if lerp is not None:
        mode, w = 1, F32(lerp)
        from_start = bool(abs(w) < 0.5)  # torch.lerp's two forms (see samplers.common.lerp)
        lw = np.float64(w if from_start else w - F32(1.0))
    else:
        mode, from_start, lw = (2 if pq is not None else 0), True, np.float64(0.0)
    p, q = (F32(pq[0]), F32(pq[1])) if pq is not None else (F32(0.0), F32(0.0))
    noise_mode = 0 if nz is None else (1 if sde is None else 2)
    out = np.empty_like(x)
    keep = bool(noise_mode and keep_noise)
    s_out = np.empty_like(x) if keep else x
    _K["seeds_stage"](_f(x), _f(u), _f(v if v is not None else u), _f(sde if sde is not None else x),
                      _f(nz if nz is not None else x), mode, F32(a), F32(c), p, q, lw, from_start, noise_mode,
                      F32(0.0 if e is None else e), F32(0.0 if qn is None else qn), F32(0.0 if sig is None else sig),
                      F32(s_noise), keep, _f(out), _f(s_out))
    return out, (s_out if keep else None)


def er_sde_step(x, den, old, old_dd, nz, xw, dw, d2, w2, d3, w3, factors) -> tuple:
    """One ER-SDE step ``xw * x + dw * den (+ w2 * dd (+ w3 * (dd - old_dd) / d3))`` with
    ``dd = (den - old) / d2`` when ``d2`` is not None (and the third stage when ``d3`` is not None), then
    ``+ nz * f1 * f2 * f3`` for ``factors=(f1, f2, f3)`` when ``nz`` is not None. Returns (x_next, dd)."""
    stage = 1 if d2 is None else (2 if d3 is None else 3)
    noisy = nz is not None
    f1, f2, f3 = (F32(v) for v in factors) if noisy else (F32(0.0),) * 3
    out = np.empty_like(x)
    dd = np.empty_like(x) if stage >= 2 else x
    _K["er_sde_step"](_f(x), _f(den), _f(old if stage >= 2 else x), _f(old_dd if stage >= 3 else x),
                      _f(nz if noisy else x), stage, F32(xw), F32(dw), *(F32(0.0 if v is None else v)
                                                                     for v in (d2, w2, d3, w3)),
                      noisy, f1, f2, f3, _f(dd), _f(out))
    return out, (dd if stage >= 2 else None)


def sa_step(x, sc, preds: list, b, added=None, nz=None, factors=None) -> tuple:
    """One SA-Solver update ``sc * x + (preds[0] * b[0] + preds[1] * b[1] + ...)`` (1 to 4 terms), then
    ``+ added`` (the predictor's kept noise) or, with ``nz`` and ``factors=(f1, f2, f3)``, + a new noise
    ``nz * f1 * f2 * f3``. Returns (x_next, the new noise or None)."""
    k = len(preds) - 1
    if not 0 <= k <= 3 or len(b) != len(preds):
        raise ValueError(f"preds: received {len(preds)} with {len(b)} weights, expected 1 to 4 and as many weights")
    ps = [_f(p) for p in preds] + [_f(x)] * (3 - k)
    bs = [F32(v) for v in b] + [F32(0.0)] * (3 - k)
    noise_mode = 1 if added is not None else (2 if nz is not None else 0)
    f1, f2, f3 = (F32(v) for v in factors) if noise_mode == 2 else (F32(0.0),) * 3
    out = np.empty_like(x)
    new = np.empty_like(x) if noise_mode == 2 else x
    _K["sa_step"](_f(x), *ps, k, *bs, F32(sc), _f(added if noise_mode == 1 else (nz if noise_mode == 2 else x)),
                  noise_mode, f1, f2, f3, _f(new), _f(out))
    return out, (new if noise_mode == 2 else None)


def ge_step(x, denoised, guide, old_d, cfg_pp: bool, sigma, sigma_next, dt, gamma_minus_1) -> tuple:
    """ComfyUI ``sample_gradient_estimation``'s step: ``d = (x - guide) / sigma``, then ``denoised + d *
    sigma_next`` (CFG++) or ``x + d * dt``, plus ``gamma_minus_1 * (d - old_d) * dt`` when ``old_d`` is not
    None. Returns (x_next, d)."""
    corr = old_d is not None
    d, out = np.empty_like(x), np.empty_like(x)
    _K["ge_step"](_f(x), _f(denoised), _f(guide), _f(old_d if corr else x), bool(cfg_pp), corr, F32(sigma),
                  F32(sigma_next), F32(dt), F32(gamma_minus_1), _f(d), _f(out))
    return out, d


def _reference_ipndm(x, ds, weights, div, step):
    acc = weights[0] * ds[0]
    for w, d in zip(weights[1:], ds[1:]):
        acc = acc + w * d
    return x + step * acc / div


def _self_check() -> None:
    rng = np.random.default_rng(0)
    a = [rng.standard_normal((3, 5, 7)).astype(F32) for _ in range(5)]
    step = F32(-0.137)
    for weights, div in (((3, -1), 2), ((23, -16, 5), 12), ((55, -59, 37, -9), 24)):
        ds = a[1:1 + len(weights)]
        if not np.array_equal(ipndm_step(a[0], ds, weights, div, step), _reference_ipndm(a[0], ds, weights, div, step)):
            raise RuntimeError("self-check failed: ipndm_step")
    x, den, g, od, nz = a
    s = [F32(v) for v in (0.71, -0.33, 1.21, -0.45, 0.9, 0.27)]
    for pp in (False, True):
        xx = x + (den - g) if pp else x
        want = s[0] * xx + s[1] * (s[2] * g + s[3] * od)
        if not (np.array_equal(res_step(x, den, g, od, None, pp, *s), want)
                and np.array_equal(res_step(x, den, g, od, nz, pp, *s), want + nz * s[4] * s[5])):
            raise RuntimeError("self-check failed: res_step")
    _self_check_solver_steps(a)


def _self_check_solver_steps(a: list) -> None:
    """The DPM-Solver, LMS, SEEDS, ER-SDE and SA-Solver passes against their numpy expressions."""
    x, u, v, w, nz = a
    k = [F32(c) for c in (0.83, -0.41, 0.29, 1.7, 0.62, -0.15, 0.9, 0.37)]
    checks = {
        "eps_of": (eps_of(x, u, k[0]), (x - u) / k[0]),
        "lin_step": (lin_step(x, k[1], u, k[2], v), x - k[1] * u - k[2] * (v - u)),
        "lin_step (one term)": (lin_step(x, k[1], u), x - k[1] * u),
    }
    got, d = lms_step(x, u, k[0], [v, w], k[3:6])
    want_d = (x - u) / k[0]
    checks["lms_step"] = (np.stack([got, d]), np.stack([x + (0 + k[3] * want_d + k[4] * v + k[5] * w), want_d]))
    delta = np.maximum(k[7], k[6] * np.maximum(np.abs(x), np.abs(w)))
    checks["rms_scaled"] = (rms_scaled(x, u, w, k[7], k[6]), ((x - u) / delta).astype(np.float64))
    for weight in (0.5, 1.0, 0.25):  # torch.lerp's two forms
        wt = F32(weight)
        coeff, base = (wt, u) if abs(wt) < 0.5 else (wt - F32(1.0), v)
        z = (np.float64(coeff) * (v - u).astype(np.float64) + base).astype(F32)
        got, s1 = seeds_stage(x, k[0], k[1], u, v=v, lerp=weight, sde=w, nz=nz, e=k[2], qn=k[3], sig=k[4],
                              s_noise=k[5])
        want_s = w * k[2] + k[3] * nz
        checks[f"seeds_stage (lerp {weight})"] = (np.stack([got, s1]),
                                                  np.stack([k[0] * x - k[1] * z + want_s * k[4] * k[5], want_s]))
    got, s1 = seeds_stage(x, k[0], k[1], u, nz=nz, qn=k[3], sig=k[4])
    checks["seeds_stage (first)"] = (np.stack([got, s1]), np.stack([k[0] * x - k[1] * u + k[3] * nz * k[4], k[3] * nz]))
    checks["seeds_stage (p u + q v)"] = (seeds_stage(x, k[0], k[1], u, v=v, pq=(k[2], k[3]))[0],
                                         k[0] * x - k[1] * (k[2] * u + k[3] * v))
    got, dd = er_sde_step(x, u, v, w, nz, *k[:6], (k[6], k[7], k[0]))
    want_dd = (u - v) / k[2]
    want = k[0] * x + k[1] * u + k[3] * want_dd + k[5] * ((want_dd - w) / k[4]) + nz * k[6] * k[7] * k[0]
    checks["er_sde_step"] = (np.stack([got, dd]), np.stack([want, want_dd]))
    got, new = sa_step(x, k[0], [u, v, w], k[1:4], nz=nz, factors=k[4:7])
    want_n = nz * k[4] * k[5] * k[6]
    checks["sa_step"] = (np.stack([got, new]), np.stack([k[0] * x + (u * k[1] + v * k[2] + w * k[3]) + want_n, want_n]))
    checks["sa_step (kept noise)"] = (sa_step(x, k[0], [u, v, w, nz], k[1:5], added=v)[0],
                                      k[0] * x + (u * k[1] + v * k[2] + w * k[3] + nz * k[4]) + v)
    for pp in (False, True):
        got, d = ge_step(x, u, v, w, pp, k[0], k[1], k[2], k[3])
        want_d = (x - v) / k[0]
        want = (u + want_d * k[1] if pp else x + want_d * k[2]) + k[3] * (want_d - w) * k[2]
        checks[f"ge_step (cfg_pp {pp})"] = (np.stack([got, d]), np.stack([want, want_d]))
    for name, (got, want) in checks.items():
        if got.dtype != want.dtype or not np.array_equal(got, want):
            raise RuntimeError(f"self-check failed: {name}")


_KERNELS = jit.CheckedKernels("fused step passes", _compile, _self_check)
