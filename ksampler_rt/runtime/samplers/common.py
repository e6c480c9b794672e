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


def sigma_to_half_log_snr(sigma):
    """lambda = log(alpha / sigma) = -log(sigma) for the VP/eps family (non-CONST branch); -log 0 = inf.
    A scalar gives a float32 scalar (libm path), an array a float32 array."""
    if np.ndim(sigma) == 0:
        return -log(sigma)
    with np.errstate(divide="ignore"):
        return -np.log(np.asarray(sigma, dtype=F32))


def half_log_snr_to_sigma(half_log_snr):
    """sigma = exp(-lambda), the inverse of :func:`sigma_to_half_log_snr`."""
    if np.ndim(half_log_snr) == 0:
        return exp(-F32(half_log_snr))
    return np.exp(-np.asarray(half_log_snr, dtype=F32))


def offset_first_sigma_for_snr(sigmas: np.ndarray) -> np.ndarray:
    """ComfyUI moves sigmas[0] off 1 only for CONST (flow) models; the discrete VP models here keep it."""
    return sigmas


def ei_h_phi_1(h):
    """h * phi_1(h) = expm1(h) (exponential-integrator weight)."""
    return expm1(h) if np.ndim(h) == 0 else np.expm1(h)


def ei_h_phi_2(h):
    """h * phi_2(h) = (expm1(h) - h) / h."""
    return (ei_h_phi_1(h) - h) / h


def lerp(start, end, weight):
    """torch.lerp's two-sided formula: start + w (end - start) for |w| < 1/2, else end - (end - start)(1 - w)."""
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


def brownian_bounds(sigmas: np.ndarray):
    """(smallest positive sigma, largest sigma): the interval ComfyUI builds its BrownianTree on."""
    sigmas = np.asarray(sigmas, dtype=F32)
    return F32(sigmas[sigmas > 0].min()), F32(sigmas.max())


def fma32(a, b, c) -> np.float32:
    """float32 fused multiply-add a * b + c (single rounding), emulated through float64."""
    return F32(np.float64(a) * np.float64(b) + np.float64(c))


def torch_linspace(start, end, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32, as torch's CPU (AVX2 build) kernel computes it.

    step = (end - start) / (steps - 1) in float32; element i is start + step * i for i < steps // 2 and
    end - step * (steps - 1 - i) otherwise, each contracted into one fused multiply-add. Matched bit for
    bit against torch 2.13 on an AVX2 CPU.
    """
    start, end = F32(start), F32(end)
    if steps == 1:
        return np.array([start], dtype=F32)
    step = F32((end - start) / F32(steps - 1))
    half = steps // 2
    out = [fma32(step, i, start) if i < half else fma32(-step, steps - 1 - i, end) for i in range(steps)]
    return np.array(out, dtype=F32)


def notify(callback, i, x, denoised) -> None:
    """The per-step callback of the sampler contract: ``callback(i, x, denoised)``."""
    if callback is not None:
        callback(i, x, denoised)
