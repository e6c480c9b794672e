"""ComfyUI's KSampler and KSampler (Advanced) nodes, in numpy.

Follows ComfyUI 0.3.64 ``nodes.common_ksampler`` -> ``comfy.sample.sample`` ->
``comfy.samplers.KSampler.sample`` -> ``CFGGuider`` -> ``KSAMPLER.sample``:

1. noise = zeros when noise is disabled, else ``prepare_noise(latent, seed, batch_index)``;
2. sigmas = the scheduler's list for ``steps`` (discard-penultimate samplers, denoise tail),
   then the start/end window (``window_sigmas``), which may return the input unchanged;
3. a non-zero latent is scaled into the model's space (``process_latent_in``);
4. x = noise_scaling(sigma_0, noise, latent, max_denoise) -- max_denoise when sigma_0 is sigma_max;
5. the sampler runs on the CFG denoiser with a noise source seeded by the node seed;
6. the result goes back to VAE space (``process_latent_out``) as float32.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np

from .cfg import CFGDenoiser
from .continuation import (EVALUATION_STEP_SAMPLERS, STATE_KEY, ContinuationState, RecordingDenoiser, StopAtStep,
                           check_mode, fingerprint, latent_samples, usable_state)
from .model import Model
from .noise import NoiseSource, prepare_noise
from .samplers import SAMPLERS, get_sampler
from .schedulers import calculate_sigmas, window_sigmas

ProgressCallback = Callable[[int, int, np.ndarray, np.ndarray], None]

_ENABLE_DISABLE = ("enable", "disable")
_STEPS_MAX = 10000
_CFG_MAX = 100.0


def _flag(name: str, value) -> bool:
    """"enable"/"disable" as ComfyUI's combos take them; bools accepted too."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if value in _ENABLE_DISABLE:
        return value == "enable"
    raise ValueError(f"{name}: received {value!r}, expected one of {_ENABLE_DISABLE} (or a bool)")


def _int_in(name: str, value, low: int, high: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: received {value!r} ({type(value).__name__}), expected an integer in [{low}, {high}]")
    if not low <= int(value) <= high:
        raise ValueError(f"{name}: received {value}, expected an integer in [{low}, {high}]")
    return int(value)


def _check_cfg(cfg) -> float:
    try:
        value = float(cfg)
    except (TypeError, ValueError):
        raise ValueError(f"cfg: received {cfg!r}, expected a number in [0, {_CFG_MAX}]") from None
    if math.isnan(value) or not 0.0 <= value <= _CFG_MAX:
        raise ValueError(f"cfg: received {cfg!r}, expected a number in [0, {_CFG_MAX}]")
    return value


def _check_latent(latent_image) -> np.ndarray:
    if not isinstance(latent_image, dict) or "samples" not in latent_image:
        raise ValueError(f"latent_image: received {type(latent_image).__name__}, expected a LATENT dict "
                         "{'samples': float32 array [B, C, H, W]}")
    samples = np.asarray(latent_image["samples"])
    if samples.ndim != 4 or not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"latent_image['samples']: received a {samples.dtype} array of shape {samples.shape}, "
                         "expected a 4-D float array [B, C, H, W]")
    if latent_image.get("noise_mask") is not None:
        raise ValueError("latent_image['noise_mask']: inpainting masks are not supported yet; "
                         "received a LATENT with a noise_mask, expected none")
    return samples.astype(np.float32, copy=False)


def _check_conditioning(name: str, conditioning, width: int | None) -> int:
    """Validate a CONDITIONING list; returns the context width D shared by every entry."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(f"{name}: received {type(conditioning).__name__}, expected a non-empty CONDITIONING list "
                         "of [array [1, T, D], dict] pairs")
    for i, entry in enumerate(conditioning):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[1], dict):
            raise ValueError(f"{name}[{i}]: received {type(entry).__name__}, expected a [array [1, T, D], dict] pair")
        context = np.asarray(entry[0])
        if context.ndim != 3 or 0 in context.shape:
            raise ValueError(f"{name}[{i}]: received a context of shape {context.shape}, expected [1, T, D] (3-D, non-empty)")
        if width is not None and context.shape[2] != width:
            raise ValueError(f"{name}[{i}]: received context width D={context.shape[2]}, expected D={width} "
                             "like the other conditioning entries")
        width = context.shape[2]
    return width


def _fit_channels(model: Model, latent: np.ndarray) -> np.ndarray:
    """comfy.sample.fix_empty_latent_channels: an all-zero latent takes the model's channel count."""
    channels = model.latent_channels
    if latent.shape[1] == channels:
        return latent
    if not latent.any():
        return np.zeros((latent.shape[0], channels) + latent.shape[2:], dtype=np.float32)
    raise ValueError(f"latent_image: received {latent.shape[1]} channels, expected {channels} for family "
                     f"{model.family.name!r}")


def _checked_inputs(model, seed, steps, cfg, sampler_name, positive, negative, latent):
    """(seed, steps, cfg, sampler spec, latent samples) after every input check both nodes share."""
    if not isinstance(model, Model):
        raise ValueError(f"model: received {type(model).__name__}, expected a ksampler_rt.runtime.Model")
    seed = _int_in("seed", seed, 0, 2 ** 64 - 1)
    steps = _int_in("steps", steps, 1, _STEPS_MAX)
    cfg = _check_cfg(cfg)
    spec = get_sampler(sampler_name)
    if model.family.is_flow and not spec.flow:
        supported = ", ".join(n for n, s in SAMPLERS.items() if s.flow)
        raise ValueError(f"sampler_name: received {sampler_name!r}, expected a sampler that supports flow models "
                         f"(family {model.family.name!r}): {supported}")
    width = _check_conditioning("positive", positive, None)
    _check_conditioning("negative", negative, width)
    return seed, steps, cfg, spec, _fit_channels(model, _check_latent(latent))


def _initial_x(model: Model, sigma_0, noise: np.ndarray, latent_image: np.ndarray) -> np.ndarray:
    """KSAMPLER.sample's start: the latent scaled in (unless empty), then noise_scaling at sigma_0."""
    if latent_image.any():  # ComfyUI does not shift an empty latent
        latent_image = model.process_latent_in(latent_image)
    ms = model.model_sampling
    sigma_max, sigma_0 = float(ms.sigma_max), float(sigma_0)
    max_denoise = math.isclose(sigma_max, sigma_0, rel_tol=1e-05) or sigma_0 > sigma_max
    return ms.noise_scaling(np.float32(sigma_0), noise, latent_image, max_denoise)


def common_ksampler(model: Model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                    positive, negative, latent: dict, denoise: float = 1.0, disable_noise: bool = False,
                    start_step: int | None = None, last_step: int | None = None,
                    force_full_denoise: bool = False, callback: ProgressCallback | None = None) -> dict:
    """The shared body of both nodes (nodes.common_ksampler)."""
    seed, steps, cfg, spec, latent_image = _checked_inputs(model, seed, steps, cfg, sampler_name, positive,
                                                           negative, latent)

    if disable_noise:
        noise = np.zeros_like(latent_image)
    else:
        noise = prepare_noise(latent_image, seed, latent.get("batch_index"))

    sigmas = calculate_sigmas(model, scheduler, steps, sampler_name, denoise)
    sigmas, returns_input = window_sigmas(sigmas, start_step, last_step, force_full_denoise)
    out = dict(latent)
    if returns_input or len(sigmas) == 0:
        out["samples"] = latent_image.copy()
        return out

    x = _initial_x(model, sigmas[0], noise, latent_image)
    total = len(sigmas) - 1
    offset = start_step or 0  # step i of this sampler run is step offset + i of the KSampler's schedule

    def denoiser_at(step: int) -> CFGDenoiser:
        return CFGDenoiser(model, _active(positive, offset + step), _active(negative, offset + step), cfg,
                           latent_image.shape[0], latent_image.shape[2:4], cfg_pp=spec.cfg_pp, sigmas=sigmas)

    on_step = None if callback is None else (lambda i, x_i, denoised: callback(i, total, x_i, denoised))
    cuts = _schedule_cuts([*positive, *negative], offset, total)
    if not cuts:
        samples = _run_sampler(spec, denoiser_at(0), x, sigmas, seed, on_step)
    else:
        samples, _ = _sample_in_windows(spec, sampler_name, denoiser_at, x, sigmas, seed, on_step, cuts=cuts)
    samples = model.model_sampling.inverse_noise_scaling(sigmas[-1], samples)
    out["samples"] = model.process_latent_out(samples.astype(np.float32))
    return out


# -- per-step prompt scheduling ------------------------------------------------------------------
# A conditioning entry may carry {"start_step": a, "end_step": b} (steps of the KSampler's schedule):
# it is used for steps a <= i < b only. One sampler call then behaves exactly like the chain of
# KSamplerAdvanced windows it replaces, joined with exact continuation: the sampler is stopped at
# each step where the active conditioning changes and re-run with the evaluations so far replayed.

def _active(conditioning: list, step: int) -> list:
    return [entry for entry in conditioning
            if entry[1].get("start_step", 0) <= step < entry[1].get("end_step", math.inf)]


def _schedule_cuts(conditioning: list, offset: int, total: int) -> list[int]:
    edges = {int(entry[1][key]) - offset for entry in conditioning for key in ("start_step", "end_step")
             if key in entry[1]}
    return sorted(e for e in edges if 0 < e < total)


def _run_sampler(spec, denoiser, x, sigmas, seed, callback):
    """One sampler run with a fresh noise source; the source knows the schedule so a Brownian tree
    can compute its increments ahead, and draws the default noise stream ahead, overlapping the
    UNet calls (bit-identical either way). Closing the source stops its prefetch threads."""
    with NoiseSource(seed, sigmas=sigmas) as noise:
        return spec.fn(denoiser, x, sigmas, noise, callback=callback)


def _sample_in_windows(spec, sampler_name, denoiser_at, x, sigmas, seed, on_step, *, cuts=(), stop=None,
                       replay=(), first_live=0):
    """Run the sampler over ``sigmas`` as a chain of exactly joined windows.

    The denoiser changes at each step in ``cuts`` (``denoiser_at(step)``); evaluations made before
    ``first_live`` come from ``replay``. Returns ``(samples, None)`` when the sampler finishes (``(samples,
    (None, evaluations))`` when it finishes before a ``stop``), or ``(None, (x, evaluations))`` when it is
    stopped at ``stop``.
    """
    by_evaluation = sampler_name in EVALUATION_STEP_SAMPLERS
    ends = [c for c in cuts if first_live < c and (stop is None or c < stop)] + [stop]
    replay = list(replay)
    for start, end in zip([first_live, *ends[:-1]], ends):
        denoiser = RecordingDenoiser(denoiser_at(start), replay, end if by_evaluation else None)

        def callback(i, x_i, denoised, start=start, end=end, denoiser=denoiser):
            if i == end and not by_evaluation:
                raise StopAtStep(i, x_i, after_evaluation=True)
            if on_step is not None and i >= start and not denoiser.replaying:
                on_step(i, x_i, denoised)

        try:
            samples = _run_sampler(spec, denoiser, x.copy(), sigmas, seed, callback)
            return samples, (None if stop is None else (None, denoiser.evaluations))
        except StopAtStep as stopped:
            # an evaluation that announced step `end` belongs to the next window's model: drop it
            replay = denoiser.evaluations[:-1] if stopped.after_evaluation else denoiser.evaluations
            if end == stop:
                return None, (stopped.x.copy(), replay)
    raise AssertionError("unreachable: only the stop ends the last window early")


def ksampler(model: Model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
             positive, negative, latent_image: dict, denoise: float = 1.0, *,
             callback: ProgressCallback | None = None) -> dict:
    """ComfyUI's ``KSampler`` node: returns a new LATENT dict keeping the input's other keys."""
    return common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                           latent_image, denoise=denoise, callback=callback)


def ksampler_advanced(model: Model, add_noise, noise_seed: int, steps: int, cfg: float, sampler_name: str,
                      scheduler: str, positive, negative, latent_image: dict, start_at_step: int,
                      end_at_step: int, return_with_leftover_noise, *, continuation: str = "comfyui",
                      callback: ProgressCallback | None = None) -> dict:
    """ComfyUI's ``KSamplerAdvanced`` node (denoise 1.0, a start/end window over the full schedule).

    ``continuation="exact"`` makes a chain of windows bit-identical to one unsplit run, for every
    sampler (see :mod:`ksampler_rt.runtime.continuation`); the default keeps ComfyUI's behaviour.
    """
    start = _int_in("start_at_step", start_at_step, 0, _STEPS_MAX)
    end = _int_in("end_at_step", end_at_step, 0, _STEPS_MAX)
    noise_on = _flag("add_noise", add_noise)
    leftover = _flag("return_with_leftover_noise", return_with_leftover_noise)
    if check_mode(continuation) == "exact":
        exact = _exact_window(model, noise_on, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                              latent_image, start, end, leftover, callback)
        if exact is not None:
            return exact
    out = common_ksampler(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                          latent_image, denoise=1.0, disable_noise=not noise_on, start_step=start, last_step=end,
                          force_full_denoise=not leftover, callback=callback)
    out.pop(STATE_KEY, None)
    return out


def _exact_window(model, noise_on, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                  start, end, leftover, callback):
    """One window of an exactly continued chain, or None where ComfyUI's semantics apply unchanged
    (a window that ends the image early, an early return, or no usable state to continue from)."""
    seed, steps, cfg, spec, latent_image = _checked_inputs(model, seed, steps, cfg, sampler_name, positive,
                                                           negative, latent)
    full = calculate_sigmas(model, scheduler, steps, sampler_name, 1.0)
    n = len(full) - 1
    stop = end if end < n else None
    if (stop is not None and not leftover) or start >= (n if stop is None else stop):
        return None
    fp = fingerprint(model, seed, steps, sampler_name, scheduler, latent_image.shape)
    if start > 0:
        state = usable_state(latent, fp, start, lambda state: latent_samples(model, state))
        if state is None and STATE_KEY not in latent:
            warnings.warn(f"continuation='exact': the latent for start_at_step={start} carries no continuation "
                          "state (the previous window must also use continuation='exact' and return leftover "
                          "noise); sampling as ComfyUI does", stacklevel=3)
        if state is not None and noise_on:
            warnings.warn("continuation='exact': add_noise is enabled, so this window does not continue the "
                          "previous one; sampling as ComfyUI does", stacklevel=3)
            state = None
        if state is None:
            return None
        x0, replay = state.x0, state.evaluations
    else:
        noise = prepare_noise(latent_image, seed, latent.get("batch_index")) if noise_on else np.zeros_like(latent_image)
        x0, replay = _initial_x(model, full[0], noise, latent_image), []

    def denoiser_at(step: int) -> CFGDenoiser:
        return CFGDenoiser(model, _active(positive, step), _active(negative, step), cfg, latent_image.shape[0],
                           latent_image.shape[2:4], cfg_pp=spec.cfg_pp, sigmas=full)

    total = (n if stop is None else stop) - start
    on_step = None if callback is None else (lambda i, x_i, denoised: callback(i - start, total, x_i, denoised))
    samples, stopped = _sample_in_windows(spec, sampler_name, denoiser_at, x0, full, seed, on_step,
                                          cuts=_schedule_cuts([*positive, *negative], 0, n), stop=stop,
                                          replay=replay, first_live=start)
    out = dict(latent)
    if stopped is not None:
        x_stop, evaluations = stopped
        if x_stop is None:  # finished inside the window (dpm_adaptive): the next window replays every evaluation
            state = ContinuationState(fp, full, x0, evaluations, stop, samples, x_sigma=full[-1])
        else:
            state = ContinuationState(fp, full, x0, evaluations, stop, x_stop)
        out["samples"] = latent_samples(model, state)  # as ComfyUI returns leftover noise: x / (1 - sigma) on CONST
        out[STATE_KEY] = state
        return out
    samples = model.model_sampling.inverse_noise_scaling(full[-1], samples)
    out["samples"] = model.process_latent_out(samples.astype(np.float32))
    out.pop(STATE_KEY, None)
    return out
