"""Sigma schedules: ComfyUI's nine schedulers and the sigma list its KSampler hands a sampler.

Behaviour matches ComfyUI 0.3.64 (commit a125cd84), ``comfy/samplers.py``: the scheduler
functions (``simple_scheduler``, ``normal_scheduler``, ``ddim_scheduler``, ``beta_scheduler``,
``linear_quadratic_schedule``, ``kl_optimal_scheduler``), ``SCHEDULER_HANDLERS`` /
``calculate_sigmas``, and ``KSampler.calculate_sigmas`` / ``set_steps`` / ``sample``; plus
``comfy/k_diffusion/sampling.py`` (``get_sigmas_karras``, ``get_sigmas_exponential``).
See ``/work/shared/reference/comfyui-sampling.md`` §4 and §5.

Float details. ComfyUI builds every list as a float32 tensor, so every function here returns a
fresh float32 array ending in 0 (kl_optimal with one step: see its docstring). Where ComfyUI does
float32 arithmetic, this module does the same float32 operations in the same order:

* ``torch.linspace`` is emulated exactly (float32 step, fused multiply-add, the symmetric
  "first half from the start, second half from the end" fill) by the samplers' one
  :func:`~ksampler_rt.runtime.samplers.common.torch_linspace`;
* transcendental functions (exp, pow, tan) are evaluated in float64 and rounded to float32.
  torch's float32 versions (SLEEF) are accurate to about 1 ulp, so a handful of entries may differ
  from ComfyUI's in the last bit; evaluating in float64 agrees with torch far more often than
  numpy's own float32 kernels do.

Schedules that only pick entries of the sigma table (simple, ddim_uniform, beta) are bit-exact.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import numpy as np

from .samplers.common import torch_linspace
from .samplers.spec import DISCARD_PENULTIMATE_SIGMA_SAMPLERS, SAMPLER_NAMES

SCHEDULER_NAMES: tuple[str, ...] = (
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
    "linear_quadratic", "kl_optimal",
)

# An implied schedule longer than this (steps / denoise with a tiny denoise) is refused rather than
# allocated; ComfyUI would try to build it.
MAX_SCHEDULE_STEPS = 10_000_000


# -- float32 helpers matching torch ----------------------------------------------------------------
def _f32_via_f64(fn: Callable, x) -> np.ndarray:
    """fn evaluated in float64 on float32 input, rounded to float32 (see module docstring)."""
    return fn(np.asarray(x, dtype=np.float32).astype(np.float64)).astype(np.float32)


def _append_zero(sigmas) -> np.ndarray:
    return np.concatenate([np.asarray(sigmas, dtype=np.float32), np.zeros(1, dtype=np.float32)])


def _table_sigmas(model_sampling, indices) -> np.ndarray:
    table = np.asarray(model_sampling.sigmas, dtype=np.float32)
    return _append_zero(table[np.asarray(indices, dtype=np.int64)])


# -- the schedulers (model_sampling, steps) -> float32 array ---------------------------------------
def simple_scheduler(model_sampling, steps: int) -> np.ndarray:
    """``simple``: every (1000/N)-th table entry from the top, then 0.

    Entry k is ``sigmas[-(1 + int(k * len(sigmas) / N))]`` (the stride is a float; ``int``
    truncates). SD1.5, N=10: 14.6146, 8.3028, 5.0878, ..., 0.3417, 0.
    """
    n = len(model_sampling.sigmas)
    ss = n / steps
    return _table_sigmas(model_sampling, [n - 1 - int(k * ss) for k in range(steps)])


def normal_scheduler(model_sampling, steps: int, sgm: bool = False) -> np.ndarray:
    """``normal`` (and ``sgm_uniform`` with ``sgm=True``): uniform timesteps, log-interpolated sigmas.

    start = timestep(sigma_max) (999), end = timestep(sigma_min) (0). sgm: N timesteps from
    ``linspace(start, end, N + 1)`` without its last point. normal: ``linspace(start, end, N)``, so
    the last non-zero sigma is sigma_min; if sigma(end) is within 1e-5 of 0 (never for the SD
    tables) ComfyUI uses N + 1 timesteps and appends no 0, which is reproduced.
    Each timestep goes through ``model_sampling.sigma`` one at a time, as in ComfyUI.
    """
    ms = model_sampling
    start = float(np.asarray(ms.timestep(np.float32(ms.sigma_max))).reshape(()))
    end = float(np.asarray(ms.timestep(np.float32(ms.sigma_min))).reshape(()))
    append_zero = True
    if sgm:
        timesteps = torch_linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(np.asarray(ms.sigma(np.float32(end))).reshape(())), 0.0, abs_tol=1e-5):
            steps += 1
            append_zero = False
        timesteps = torch_linspace(start, end, steps)
    sigs = np.array([np.asarray(ms.sigma(t)).reshape(()) for t in timesteps], dtype=np.float32)
    return _append_zero(sigs) if append_zero else sigs


def sgm_uniform_scheduler(model_sampling, steps: int) -> np.ndarray:
    """``sgm_uniform``: ``normal_scheduler(..., sgm=True)``."""
    return normal_scheduler(model_sampling, steps, sgm=True)


def karras_scheduler(model_sampling, steps: int, rho: float = 7.0) -> np.ndarray:
    """``karras`` (k-diffusion ``get_sigmas_karras``, rho 7) from sigma_min/sigma_max as Python floats.

    sigma_k = (max^(1/rho) + ramp_k * (min^(1/rho) - max^(1/rho)))^rho with ramp = linspace(0, 1, N),
    then 0. The scalars are combined in float64 and enter the float32 tensor math as float32.
    """
    sigma_min = float(model_sampling.sigma_min)
    sigma_max = float(model_sampling.sigma_max)
    ramp = torch_linspace(0.0, 1.0, steps)
    min_inv_rho = sigma_min ** (1.0 / rho)
    max_inv_rho = sigma_max ** (1.0 / rho)
    base = np.float32(max_inv_rho) + ramp * np.float32(min_inv_rho - max_inv_rho)
    sigmas = np.power(base.astype(np.float64), np.float64(np.float32(rho))).astype(np.float32)
    return _append_zero(sigmas)


def exponential_scheduler(model_sampling, steps: int) -> np.ndarray:
    """``exponential`` (k-diffusion ``get_sigmas_exponential``): exp(linspace(ln max, ln min, N)), then 0."""
    sigma_min = float(model_sampling.sigma_min)
    sigma_max = float(model_sampling.sigma_max)
    log_sigmas = torch_linspace(math.log(sigma_max), math.log(sigma_min), steps)
    return _append_zero(_f32_via_f64(np.exp, log_sigmas))


def ddim_uniform_scheduler(model_sampling, steps: int) -> np.ndarray:
    """``ddim_uniform``: table entries 1, 1 + s, 1 + 2s, ... (s = max(1000 // N, 1)), reversed, after a 0.

    It does not start at sigma_max (N=10 uses indices 901, 801, ..., 1) and makes more than N steps
    whenever 1 + N*s < 1000: N=3 -> 3 steps from 2.93, N=7 -> 8 steps from 14.27, N=20 -> 20 from
    11.03, N=30 -> 31 from 13.93. If sigmas[1] is within 1e-5 of 0, ComfyUI uses N + 1 and no 0.
    """
    table = np.asarray(model_sampling.sigmas, dtype=np.float32)
    n = len(table)
    if math.isclose(float(table[1]), 0.0, abs_tol=1e-5):
        steps += 1
        head: list[float] = []
    else:
        head = [0.0]
    stride = max(n // steps, 1)
    picked = table[np.arange(1, n, stride)]
    return np.concatenate([np.asarray(head, dtype=np.float32), picked])[::-1].copy()


def beta_scheduler(model_sampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """``beta`` (arXiv 2407.12173, alpha = beta = 0.6).

    t_k = rint(BetaPPF(1 - k/N) * 999) for k < N (float64, round-half-even), a t equal to the previous
    one is dropped, sigma = sigmas[int(t)], then 0. Large N can give fewer than N steps (N=200 -> 199).
    """
    from scipy.stats import beta as beta_dist

    total = len(model_sampling.sigmas) - 1
    u = 1.0 - np.linspace(0.0, 1.0, steps, endpoint=False)
    ts = np.rint(beta_dist.ppf(u, alpha, beta) * total)
    indices = []
    last = -1.0
    for t in ts:
        if t != last:
            indices.append(int(t))
        last = t
    return _table_sigmas(model_sampling, indices)


def linear_quadratic_scheduler(model_sampling, steps: int, threshold_noise: float = 0.025,
                               linear_steps: int | None = None) -> np.ndarray:
    """``linear_quadratic`` (Mochi's schedule): linear then quadratic in [0, 1], flipped, times sigma_max.

    N = 1 gives [1, 0] * sigma_max. Otherwise with L = N // 2: entries i * threshold / L for i < L,
    then q*i^2 + l*i + c for L <= i < N, then 1.0; each x becomes 1 - x (all in float64), the list is
    cast to float32 and multiplied by the float32 sigma_max.
    """
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        linear_part = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        q = step_diff / (linear_steps * quadratic_steps ** 2)
        lin = threshold_noise / linear_steps - 2 * step_diff / (quadratic_steps ** 2)
        c = q * (linear_steps ** 2)
        quadratic_part = [q * (i ** 2) + lin * i + c for i in range(linear_steps, steps)]
        schedule = [1.0 - x for x in linear_part + quadratic_part + [1.0]]
    return np.asarray(schedule, dtype=np.float32) * np.float32(model_sampling.sigma_max)


def kl_optimal_scheduler(model_sampling, steps: int) -> np.ndarray:
    """``kl_optimal``: tan(a_k * atan(sigma_min) + (1 - a_k) * atan(sigma_max)), a_k = k/(N-1), then 0.

    Reproduces ComfyUI exactly, including N = 1: a_0 = 0/0 is NaN, so the result is [nan, 0]
    (ComfyUI then samples with a NaN sigma and produces a NaN latent). ``calculate_sigmas`` can reach
    this with steps = 1, or with a denoise above 0.5 at steps = 1.
    """
    atan_min = np.float32(math.atan(float(model_sampling.sigma_min)))
    atan_max = np.float32(math.atan(float(model_sampling.sigma_max)))
    with np.errstate(invalid="ignore", divide="ignore"):
        a = np.arange(steps, dtype=np.float32) / np.float32(steps - 1)
        mixed = a * atan_min + (np.float32(1.0) - a) * atan_max
    return _append_zero(_f32_via_f64(np.tan, mixed))


SCHEDULERS: dict[str, Callable[..., np.ndarray]] = {
    "simple": simple_scheduler,
    "sgm_uniform": sgm_uniform_scheduler,
    "karras": karras_scheduler,
    "exponential": exponential_scheduler,
    "ddim_uniform": ddim_uniform_scheduler,
    "beta": beta_scheduler,
    "normal": normal_scheduler,
    "linear_quadratic": linear_quadratic_scheduler,
    "kl_optimal": kl_optimal_scheduler,
}
assert tuple(SCHEDULERS) == SCHEDULER_NAMES


def get_scheduler(name: str) -> Callable[..., np.ndarray]:
    """The scheduler function for a ComfyUI scheduler name; an unknown name lists the valid ones."""
    try:
        return SCHEDULERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"scheduler: received {name!r}, expected one of: {', '.join(SCHEDULER_NAMES)}") from None


# -- validation ------------------------------------------------------------------------------------
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: received {value!r}, expected an integer >= {minimum}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name}: received {value}, expected an integer >= {minimum}")
    return value


def _check_sampler_name(sampler_name) -> None:
    if sampler_name not in SAMPLER_NAMES:
        raise ValueError(f"sampler_name: received {sampler_name!r}, expected one of: {', '.join(SAMPLER_NAMES)}")


def _model_sampling_of(model):
    ms = getattr(model, "model_sampling", None)
    if ms is None and hasattr(model, "sigmas") and hasattr(model, "sigma"):
        ms = model  # a ModelSamplingDiscrete passed directly
    if ms is None:
        raise TypeError(f"model: received {type(model).__name__}, expected an object with a "
                        "`model_sampling` attribute (a ModelSamplingDiscrete)")
    return ms


# -- what KSampler hands the sampler ---------------------------------------------------------------
def scheduler_sigmas(model_sampling, scheduler: str, steps: int, sampler_name: str | None = None) -> np.ndarray:
    """ComfyUI's ``KSampler.calculate_sigmas(steps)``: the schedule, minus the penultimate sigma for
    dpm_2 / dpm_2_ancestral / uni_pc / uni_pc_bh2 (computed for steps + 1, then
    ``[s_0 ... s_{N-1}, 0]``). No validation; see ``calculate_sigmas``."""
    fn = get_scheduler(scheduler)
    if sampler_name in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        sigmas = fn(model_sampling, steps + 1)
        return np.concatenate([sigmas[:-2], sigmas[-1:]]).astype(np.float32)
    return np.asarray(fn(model_sampling, steps), dtype=np.float32)


def calculate_sigmas(model, scheduler: str, steps: int, sampler_name: str | None = None,
                     denoise: float = 1.0) -> np.ndarray:
    """The sigma list ComfyUI's plain KSampler node hands its sampler (``KSampler.set_steps``).

    * ``model``: anything with a ``.model_sampling`` (a ModelSamplingDiscrete), or one itself.
    * discard-penultimate samplers (dpm_2, dpm_2_ancestral, uni_pc, uni_pc_bh2) get the schedule for
      steps + 1 with its second-to-last entry dropped; ``sampler_name=None`` means no such sampler.
    * ``denoise`` > 0.9999 (or None): the full schedule. ``denoise`` <= 0: an empty array (ComfyUI
      then returns the input latent unchanged). Otherwise the schedule is made for
      ``int(steps / denoise)`` steps and its last ``steps + 1`` entries are kept
      (20 steps at 0.5 -> 40-step schedule from entry 20).

    Raises ValueError for an unknown scheduler or sampler name, steps < 1 or not an integer,
    denoise outside [0, 1] or NaN (ComfyUI's node would silently fall back to simple/euler for
    unknown names; its node validation rejects them first).
    """
    ms = _model_sampling_of(model)
    get_scheduler(scheduler)
    if sampler_name is not None:
        _check_sampler_name(sampler_name)
    steps = _check_int("steps", steps, 1)
    if denoise is None:
        denoise = 1.0
    if isinstance(denoise, (bool, np.bool_)) or not isinstance(denoise, numbers.Real):
        raise ValueError(f"denoise: received {denoise!r}, expected a number in [0, 1]")
    denoise = float(denoise)
    if not (0.0 <= denoise <= 1.0):  # also rejects NaN
        raise ValueError(f"denoise: received {denoise!r}, expected a number in [0, 1]")

    if denoise > 0.9999:
        return scheduler_sigmas(ms, scheduler, steps, sampler_name)
    if denoise <= 0.0:
        return np.zeros(0, dtype=np.float32)
    implied = steps / denoise
    if implied > MAX_SCHEDULE_STEPS:
        raise ValueError(f"denoise: received {denoise!r}, which with steps={steps} implies a "
                         f"{implied:.0f}-step schedule; expected steps / denoise <= {MAX_SCHEDULE_STEPS}")
    new_steps = int(implied)
    return scheduler_sigmas(ms, scheduler, new_steps, sampler_name)[-(steps + 1):].copy()


def window_sigmas(sigmas, start_at_step: int | None, end_at_step: int | None,
                  force_full_denoise: bool) -> tuple[np.ndarray, bool]:
    """KSamplerAdvanced's start/end window (ComfyUI ``KSampler.sample`` steps 1-2, §5).

    1. If ``end_at_step < len(sigmas) - 1``: keep ``sigmas[:end_at_step + 1]`` and, with
       ``force_full_denoise``, set that last kept entry to 0 (ComfyUI writes it in place; here the
       input is never modified). Otherwise nothing changes.
    2. If ``start_at_step < len(sigmas) - 1`` (length after step 1): ``sigmas[start_at_step:]``.
       Otherwise ComfyUI returns the input latent unchanged without sampling: the result is then
       ``(sigmas after step 1, True)`` and the caller must return the latent as is.

    ``None`` skips a step (the plain KSampler passes None for both). Returns a new float32 array and
    the early-return flag.
    """
    out = np.array(sigmas, dtype=np.float32, copy=True).reshape(-1)
    if end_at_step is not None:
        end_at_step = _check_int("end_at_step", end_at_step, 0)
        if end_at_step < len(out) - 1:
            out = out[:end_at_step + 1].copy()
            if force_full_denoise:
                out[-1] = 0.0
    if start_at_step is not None:
        start_at_step = _check_int("start_at_step", start_at_step, 0)
        if start_at_step < len(out) - 1:
            out = out[start_at_step:].copy()
        else:
            return out, True
    return out, False
