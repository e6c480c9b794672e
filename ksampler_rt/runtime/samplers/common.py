"""Steps shared by several samplers, written once (float32 throughout, like ComfyUI on the CPU).

Reference: ComfyUI 0.3.64 ``comfy/k_diffusion/sampling.py`` (k-diffusion, Katherine Crowson, MIT).
Sigmas are float32 scalars and latents float32 arrays; a Python float mixed in stays weak (NEP 50),
exactly like a Python float mixed with a 0-d float32 torch tensor. ``x ** 2`` / ``x ** 0.5`` on tensors
are a square / a square root in torch, so they are written that way here.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections import OrderedDict

import numpy as np

from .. import fused_jit

F32 = np.float32


def _cache_key(arg):
    if isinstance(arg, np.ndarray):
        return ("ndarray", arg.dtype.str, arg.shape, arg.tobytes())
    return (type(arg).__name__, arg)


def _read_only(value):
    """Make the arrays in a cached result read-only (a caller writing into one would corrupt the cache)."""
    if isinstance(value, np.ndarray):
        value.setflags(write=False)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _read_only(v)
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            _read_only(getattr(value, field.name))
    return value


def schedule_cached(maxsize: int = 256):
    """Memoise a pure function of the sigma schedule (arrays keyed by dtype, shape and bytes; other
    arguments by type and value). Coefficient tables that depend on nothing but the schedule are
    then computed once per distinct schedule, not once per run: a server repeating the same steps,
    scheduler and denoise pays them once. Results are returned read-only and shared."""
    def decorate(fn):
        cache: OrderedDict = OrderedDict()
        lock = threading.Lock()

        @functools.wraps(fn)
        def cached(*args):
            key = tuple(_cache_key(a) for a in args)
            with lock:
                if key in cache:
                    cache.move_to_end(key)
                    return cache[key]
            value = _read_only(fn(*args))
            with lock:
                cache[key] = value
                while len(cache) > maxsize:
                    cache.popitem(last=False)
            return value

        cached.cache_clear = cache.clear
        return cached
    return decorate


def f32(value) -> np.float32:
    """A float32 scalar (the 0-d tensor ``sigmas[i]`` of ComfyUI)."""
    return np.float32(value)


# -- float32 scalar maths as torch does it on 0-d CPU tensors --------------------------------------------
# A 0-d float32 tensor's exp / log / expm1 run the scalar libm path (expf, logf, expm1f: correctly
# rounded in almost every case), not a SIMD kernel. numpy's float32 ufuncs use their own SIMD code that
# is often 1 ulp off, so sigma arithmetic goes through float64 libm and one rounding to float32.

def exp(v) -> np.float32:
    """exp of a float32 scalar (``tensor.exp()`` on a 0-d tensor)."""
    try:
        return F32(math.exp(v))
    except OverflowError:
        return F32(math.inf)


def expm1(v) -> np.float32:
    """expm1 of a float32 scalar."""
    try:
        return F32(math.expm1(v))
    except OverflowError:
        return F32(math.inf)


def log(v) -> np.float32:
    """log of a float32 scalar; log 0 = -inf and a negative argument gives nan, as in torch."""
    v = float(v)
    if v > 0:
        return F32(math.log(v))
    return F32(-math.inf) if v == 0 else F32(math.nan)


def sqrt(v) -> np.float32:
    """sqrt of a float32 scalar (correctly rounded either way); a negative argument gives nan."""
    v = float(v)
    return F32(math.sqrt(v)) if v >= 0 or v != v else F32(math.nan)


def to_d(x: np.ndarray, sigma, denoised: np.ndarray) -> np.ndarray:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022)."""
    return (x - denoised) / F32(sigma)


def times(a: np.ndarray, *factors) -> np.ndarray:
    """``a * f1 * f2 * ...`` evaluated left to right as written, with the same float32 roundings, but
    in one fresh array for the whole chain instead of one per factor, and factors of exactly 1
    skipped (``v * 1 == v`` for every float; ``s_noise`` is 1 by default). ``a`` is never modified.
    A factor that would widen the dtype is applied as written."""
    out = None
    for f in factors:
        src = a if out is None else out
        if np.result_type(src, f) != src.dtype:
            out = src * f
        elif f == 1:
            continue
        elif out is None:
            out = a * f
        else:
            out *= f
    return a if out is None else out


def nan_to_zero(v):
    """``torch.nan_to_num(v, nan=0.0)`` of a float32 scalar: NaN -> 0, +-inf -> the largest finite
    float32 of its sign (what ``np.nan_to_num`` does, without its tens of microseconds per scalar call)."""
    if math.isnan(v):
        return F32(0.0)
    if math.isinf(v):
        return F32(np.finfo(F32).max) if v > 0 else F32(np.finfo(F32).min)
    return v


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Split a step into a deterministic move to sigma_down and fresh noise of std sigma_up.

    sigma_up = min(sigma_to, eta * sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)),
    sigma_down = sqrt(sigma_to^2 - sigma_up^2); eta = 0 gives (sigma_to, 0).
    """
    sigma_from, sigma_to = F32(sigma_from), F32(sigma_to)
    if not eta:
        return sigma_to, F32(0.0)
    up = eta * sqrt(sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from))
    sigma_up = min(sigma_to, F32(up))  # Python min: keeps sigma_to unless up is strictly smaller
    sigma_down = sqrt(sigma_to * sigma_to - sigma_up * sigma_up)
    return sigma_down, sigma_up


def get_ancestral_step_rf(sigma_from, sigma_to, eta=1.0):
    """The rectified-flow ancestral split of ComfyUI 0.3.64's ``*_ancestral_RF`` samplers:
    (sigma_down, alpha_ratio, renoise_coeff) with sigma_down = sigma_to (1 + (sigma_to / sigma_from - 1) eta),
    alpha_ratio = (1 - sigma_to) / (1 - sigma_down) (the rescale that puts x back on the flow path) and
    renoise_coeff = sqrt(sigma_to^2 - sigma_down^2 (1 - sigma_to)^2 / (1 - sigma_down)^2), float32 in
    ComfyUI's order."""
    sigma_from, sigma_to = F32(sigma_from), F32(sigma_to)
    one = F32(1.0)
    downstep_ratio = one + (sigma_to / sigma_from - one) * eta
    sigma_down = sigma_to * downstep_ratio
    alpha_ip1 = one - sigma_to
    alpha_down = one - sigma_down
    renoise_coeff = sqrt(sigma_to * sigma_to
                         - sigma_down * sigma_down * (alpha_ip1 * alpha_ip1) / (alpha_down * alpha_down))
    return sigma_down, alpha_ip1 / alpha_down, renoise_coeff


def rf_step(x: np.ndarray, sigma, sigma_to, denoised: np.ndarray) -> np.ndarray:
    """The rectified-flow Euler step of ComfyUI's ``*_RF`` samplers: with r = sigma_to / sigma,
    x <- r x + (1 - r) D (exact along the flow path x = (1 - sigma) D + sigma n for a constant D)."""
    ratio = sigma_to / sigma
    return ratio * x + (1 - ratio) * denoised


def weak_or_f32(v) -> bool:
    """A Python int / float (numpy casts it to the array's float32) or a float32 scalar: a factor a compiled
    pass applies as the numpy path does. A float64 scalar is not one (``np.float64`` subclasses ``float``,
    but numpy widens a float32 array multiplied by it to float64)."""
    return type(v) in (int, float) or isinstance(v, np.float32)


def rf_step_renoise(x, sigma, sigma_to, denoised, alpha_ratio, noise, s_noise, coeff) -> np.ndarray:
    """``alpha_ratio * rf_step(x, sigma, sigma_to, denoised) + times(noise, s_noise, coeff)``: the step,
    rescale and renoise of ComfyUI's ``sample_euler_ancestral_RF``; one compiled pass (bit-identical)
    when the arrays are float32 and the scalars float32 (``s_noise`` may be a Python number)."""
    if (fused_jit.scalars_f32(sigma, sigma_to, alpha_ratio, coeff) and weak_or_f32(s_noise)
            and fused_jit.ready(x, denoised, noise)):
        return fused_jit.rf_renoise(x, denoised, noise, sigma_to / sigma, alpha_ratio, s_noise, coeff)
    return alpha_ratio * rf_step(x, sigma, sigma_to, denoised) + times(noise, s_noise, coeff)


def cfg_pp_renoise(x, denoised, uncond, sigma, alpha_s, alpha_t, sigma_down, noise, s_noise, sigma_up):
    """The renoised step of ComfyUI's ``sample_euler_ancestral_cfg_pp``: ``alpha_t * denoised + sigma_down *
    to_d(x, sigma, alpha_s * uncond) + times(noise, alpha_t, s_noise, sigma_up)``; one compiled pass
    (bit-identical) for float32 arrays and scalars."""
    if (fused_jit.scalars_f32(sigma, alpha_s, alpha_t, sigma_down, sigma_up) and weak_or_f32(s_noise)
            and fused_jit.ready(x, denoised, uncond, noise)):
        return fused_jit.cfg_pp_renoise(x, denoised, uncond, noise, sigma, alpha_s, alpha_t, sigma_down, s_noise,
                                        sigma_up)
    x = alpha_t * denoised + sigma_down * to_d(x, sigma, alpha_s * uncond)
    return x + times(noise, alpha_t, s_noise, sigma_up)


def ddpm_update(x, denoised, sigma, sigma_next, noise_sampler) -> np.ndarray:
    """One step of ComfyUI's ``sample_ddpm`` (``DDPMSampler_step`` in VP space, alpha_bar = 1 / (1 +
    sigma^2), between the VP scalings of x); one compiled pass (bit-identical) when sigma_next > 0 and
    the arrays are float32."""
    alpha_cumprod = 1 / (sigma * sigma + 1)
    alpha_cumprod_prev = 1 / (sigma_next * sigma_next + 1)
    alpha = alpha_cumprod / alpha_cumprod_prev
    k1, k2, q = sqrt(1.0 / alpha), sqrt(1 - alpha_cumprod), sqrt(1.0 + sigma * sigma)
    k4 = sqrt(1.0 + sigma_next * sigma_next)
    if sigma_next > 0:
        k3 = sqrt((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod))
        nz = noise_sampler(sigma, sigma_next)
        if fused_jit.scalars_f32(sigma, alpha, q, k1, k2, k3, k4) and fused_jit.ready(x, denoised, nz):
            return fused_jit.ddpm(x, denoised, nz, q, sigma, 1 - alpha, k1, k2, k3, k4)
    mu = k1 * (x / q - (1 - alpha) * ((x - denoised) / sigma) / k2)
    if sigma_next > 0:
        mu += k3 * nz
    return mu * k4 if sigma_next != 0 else mu


def is_flow(model_sampling) -> bool:
    """Whether ``model_sampling`` is ComfyUI's ``CONST`` (rectified flow: x_t = (1 - sigma) x_0 + sigma n),
    the test ComfyUI 0.3.64 makes with ``isinstance(model_sampling, comfy.model_sampling.CONST)``."""
    return getattr(model_sampling, "prediction", None) == "const"


def sigma_to_half_log_snr(sigma, model_sampling=None):
    """lambda = log(alpha / sigma) (ComfyUI ``sigma_to_half_log_snr``): -log(sigma) for the VP/eps
    family (``sigma.log().neg()``; -log 0 = inf), -logit(sigma) = log((1 - sigma) / sigma) for a flow
    model (``sigma.logit().neg()``, alpha = 1 - sigma). ``model_sampling=None`` is the VP branch.

    A scalar gives a float32 scalar, an array a float32 array, both the correctly rounded float32 log
    (through float64): torch's scalar ``logf`` path, which a 0-d tensor and every schedule shorter than one
    SIMD block take. numpy's float32 log is its own SIMD code, a few ulp off and CPU dependent.
    torch's logit forms ``x / (1 - x)`` in float32 before the log, as done here."""
    if is_flow(model_sampling):
        one = F32(1.0)
        if np.ndim(sigma) == 0:
            sigma = F32(sigma)
            with np.errstate(divide="ignore"):
                return -log(sigma / (one - sigma))
        sigma = np.asarray(sigma, dtype=F32)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (-np.log((sigma / (one - sigma)).astype(np.float64))).astype(F32)
    if np.ndim(sigma) == 0:
        return -log(sigma)
    with np.errstate(divide="ignore"):
        return (-np.log(np.asarray(sigma, dtype=F32).astype(np.float64))).astype(F32)


def half_log_snr_to_sigma(half_log_snr, model_sampling=None):
    """The inverse of :func:`sigma_to_half_log_snr` (ComfyUI ``half_log_snr_to_sigma``): exp(-lambda)
    for VP (``half_log_snr.neg().exp()``), sigmoid(-lambda) = 1 / (1 + exp(lambda)) for a flow model
    (``half_log_snr.neg().sigmoid()``, float32 ``1 / (1 + exp(-z))`` as torch's CPU kernel); float32
    rounded from float64 exponentials for a scalar and an array alike."""
    if is_flow(model_sampling):
        one = F32(1.0)
        if np.ndim(half_log_snr) == 0:
            return one / (one + exp(F32(half_log_snr)))
        with np.errstate(over="ignore"):
            e = np.exp(np.asarray(half_log_snr, dtype=F32).astype(np.float64)).astype(F32)
        return one / (one + e)
    if np.ndim(half_log_snr) == 0:
        return exp(-F32(half_log_snr))
    with np.errstate(over="ignore"):
        return np.exp(-np.asarray(half_log_snr, dtype=F32).astype(np.float64)).astype(F32)


def offset_first_sigma_for_snr(sigmas: np.ndarray, model_sampling=None, percent_offset: float = 1e-4) -> np.ndarray:
    """ComfyUI ``offset_first_sigma_for_snr``: for a flow model a first sigma >= 1 (log-SNR -inf) is
    replaced by ``model_sampling.percent_to_sigma(percent_offset)`` in a copy; VP sigmas are returned as
    they are, and so is a schedule of one sigma."""
    if len(sigmas) <= 1 or not is_flow(model_sampling) or not sigmas[0] >= 1:
        return sigmas
    sigmas = np.array(sigmas, dtype=F32)
    sigmas[0] = model_sampling.percent_to_sigma(percent_offset)
    return sigmas


def ei_h_phi_1(h):
    """h * phi_1(h) = expm1(h) (ComfyUI ``ei_h_phi_1``; SEEDS' exponential-integrator weight).
    A scalar goes through :func:`expm1` (torch's scalar path); an array through float64."""
    if np.ndim(h) == 0:
        return expm1(h)
    return np.expm1(np.asarray(h, dtype=F32).astype(np.float64)).astype(F32)


def ei_h_phi_2(h):
    """h * phi_2(h) = (expm1(h) - h) / h (ComfyUI ``ei_h_phi_2``)."""
    return (ei_h_phi_1(h) - h) / h


def phi1(t):
    """phi_1(t) = expm1(t) / t of a float32 scalar (ComfyUI ``res_multistep``'s ``phi1_fn``)."""
    return expm1(t) / t


def phi2(t):
    """phi_2(t) = (phi_1(t) - 1) / t of a float32 scalar (ComfyUI ``res_multistep``'s ``phi2_fn``)."""
    return (phi1(t) - F32(1.0)) / t


def lerp(start, end, weight):
    """``torch.lerp(start, end, weight)`` with a Python-float weight, for float32 scalars and arrays.

    torch rounds the weight to float32 and computes ``start + w (end - start)`` for |w| < 1/2, else
    ``end - (end - start)(1 - w)``, each as one fused multiply-add (ATen ``lerp_vec`` / the scalar
    kernel, both contracted on AVX2 and AVX-512 builds); matched bit for bit against torch 2.13 on
    0-d tensors and arrays. The fma is emulated in float64: w (end - start) is exact there."""
    w = F32(weight)
    diff = end - start  # float32, as torch's (end - self)
    if abs(w) < 0.5:
        coeff, base = w, start
    else:
        coeff, base = w - F32(1.0), end
    if np.ndim(diff) == 0:
        return fma32(coeff, diff, base)
    return (np.float64(coeff) * diff.astype(np.float64) + base).astype(F32)


def brownian_bounds(sigmas: np.ndarray):
    """(smallest positive sigma, largest sigma): the interval ComfyUI builds its BrownianTree on."""
    sigmas = np.asarray(sigmas, dtype=F32)
    return F32(sigmas[sigmas > 0].min()), F32(sigmas.max())


def fma32(a, b, c) -> np.float32:
    """float32 fused multiply-add a * b + c (single rounding), emulated through float64."""
    return F32(np.float64(a) * np.float64(b) + np.float64(c))


def torch_linspace(start, end, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32, as torch's CPU kernel computes it.

    torch casts start and end to float32, computes ``step = (end - start) / (steps - 1)`` in float32,
    fills the first ``steps // 2`` entries as ``start + step * i`` and the rest as
    ``end - step * (steps - 1 - i)``, each one fused multiply-add (ATen ``RangeFactoriesKernel.cpp``,
    contracted on the AVX2 and AVX-512 builds). step * i is exact in float64, so the float64 sum
    rounded to float32 is the fma. Matched bit for bit against torch 2.13 (AVX2 and AVX-512).
    Every torch.linspace of ComfyUI is float32: the schedulers (normal, sgm_uniform, karras,
    exponential), dpm_fast's time steps and DEIS's integration points all use this one.
    """
    s, e = F32(start), F32(end)
    if steps == 1:
        return np.array([s], dtype=F32)
    step = F32((e - s) / F32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    first = np.float64(s) + np.float64(step) * i
    second = np.float64(e) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, first, second).astype(F32)


def notify(callback, i, x, denoised) -> None:
    """The per-step callback of the sampler contract: ``callback(i, x, denoised)``."""
    if callback is not None:
        callback(i, x, denoised)
