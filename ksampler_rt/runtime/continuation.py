"""Exact continuation: split sampling that is bit-identical to the unsplit run, for every sampler.

ComfyUI restarts a sampler at every KSamplerAdvanced window: multistep history is lost, the
ancestral noise stream restarts from the seed, the Brownian tree is rebuilt over the window's
sigma range, and the latent makes a scale/unscale round trip. ``continuation="exact"`` removes all
four without touching any sampler:

* every window runs the sampler over the **full** schedule, from the same initial state, with a
  fresh noise source seeded by the node seed -- exactly what the unsplit run does;
* the denoiser is wrapped so that each evaluation's result is recorded; a window that ends early
  stops the sampler when it announces step ``end`` (its callback comes right after that step's
  first evaluation, which is dropped: it belongs to the next window's model);
* the next window *replays* the recorded evaluations instead of calling the UNet, so the sampler
  recomputes the same state -- history, noise-stream position, tree -- bit for bit (host maths
  only, no UNet call), then continues with its own model and conditioning.

The state travels in the LATENT dict under ``"continuation"``, next to ``samples``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

CONTINUATION_MODES = ("comfyui", "exact")
STATE_KEY = "continuation"


# Samplers whose callback steps are not the schedule's steps: dpm_fast spreads exactly ``steps``
# model evaluations over fewer solver intervals, so a window boundary is an evaluation count
# (the same count ComfyUI's window would spend).
EVALUATION_STEP_SAMPLERS = frozenset({"dpm_fast"})


class StopAtStep(Exception):
    """Raised to end a window at a step boundary (from the callback, or before an evaluation)."""

    def __init__(self, step: int, x: np.ndarray, *, after_evaluation: bool):
        super().__init__(step)
        self.step, self.x = step, x
        self.after_evaluation = after_evaluation  # the last recorded evaluation belongs to the next window


@dataclass
class ContinuationState:
    """What a following window needs to continue exactly where this one stopped."""

    fingerprint: dict
    sigmas: np.ndarray                  # the full schedule the sampler runs over
    x0: np.ndarray                      # the initial (noise-scaled, internal-space) latent
    evaluations: list = field(default_factory=list)  # (denoised, uncond) per denoiser call, in order
    step: int = 0                       # the step the next window starts at
    x: np.ndarray | None = None         # the internal latent at ``step`` (what ``samples`` scales out)
    # the sigma ``x`` is at: None = sigmas[step]; the last sigma when the sampler finished before ``step``
    # (dpm_adaptive counts its own accepted steps, so it may end the whole schedule inside a window)
    x_sigma: float | None = None

    def mismatch(self, fingerprint: dict, start_step: int) -> str | None:
        """Why this state cannot continue a window with these settings (None if it can)."""
        for key, value in fingerprint.items():
            if self.fingerprint.get(key) != value:
                return f"{key} differs (state: {self.fingerprint.get(key)!r}, this window: {value!r})"
        if start_step != self.step:
            return f"start_at_step differs (state stopped at step {self.step}, this window starts at {start_step})"
        return None


def fingerprint(model, seed: int, steps: int, sampler_name: str, scheduler: str, latent_shape) -> dict:
    ms = model.model_sampling
    fp = {"sampler_name": sampler_name, "scheduler": scheduler, "steps": int(steps), "seed": int(seed),
          "prediction": ms.prediction, "zsnr": ms.zsnr, "latent_shape": tuple(int(n) for n in latent_shape)}
    if model.family.is_flow:  # the flow families share a prediction; their sigma tables differ
        fp.update(family=model.family.name, shift=float(ms.shift))
    return fp


class RecordingDenoiser:
    """Wraps a CFG denoiser: replays recorded evaluations first, then evaluates and records."""

    def __init__(self, denoiser, replay: list, stop_at_evaluation: int | None = None):
        self.inner = denoiser
        self.model_sampling = denoiser.model_sampling
        self.evaluations = list(replay)
        self.stop_at_evaluation = stop_at_evaluation
        self._next = 0

    @property
    def replaying(self) -> bool:
        return self._next < len(self.evaluations)

    def with_uncond(self, x: np.ndarray, sigma):
        if self._next < len(self.evaluations):
            denoised, uncond = self.evaluations[self._next]
        elif self._next == self.stop_at_evaluation:
            raise StopAtStep(self._next, x.copy(), after_evaluation=False)
        else:
            denoised, uncond = self.inner.with_uncond(x, sigma)
            self._next += 1
            # samplers may update results in place: the record keeps its own copies
            self.evaluations.append((denoised.copy(), uncond.copy()))
            return denoised, uncond
        self._next += 1
        return denoised.copy(), uncond.copy()

    def __call__(self, x: np.ndarray, sigma) -> np.ndarray:
        return self.with_uncond(x, sigma)[0]


def check_mode(continuation: str) -> str:
    if continuation not in CONTINUATION_MODES:
        raise ValueError(f"continuation: received {continuation!r}, expected one of {CONTINUATION_MODES}")
    return continuation


def latent_samples(model, state: ContinuationState) -> np.ndarray:
    """The LATENT samples of the window that stopped with ``state``, as ComfyUI returns a window with leftover
    noise (comfy/samplers.py KSAMPLER.sample, 0.3.64): the model sampling's inverse noise scaling at the stop
    sigma -- x / (1 - sigma) for the flow families' CONST, nothing for eps / v -- then the latent format's
    process_out."""
    sigma = state.sigmas[state.step] if state.x_sigma is None else state.x_sigma
    x = model.model_sampling.inverse_noise_scaling(np.float32(sigma), state.x)
    return model.process_latent_out(np.asarray(x, np.float32))


def usable_state(latent: dict, fp: dict, start_step: int, scale_out) -> ContinuationState | None:
    """The latent's continuation state if it fits this window; a warning says why not otherwise.

    ``scale_out(state)`` is the LATENT samples the state's window returned (:func:`latent_samples`): samples
    changed since (an edit, a latent op that kept the dict) make the state stale."""
    state = latent.get(STATE_KEY)
    if state is None:
        return None
    if not isinstance(state, ContinuationState):
        warnings.warn(f"latent_image['{STATE_KEY}']: received {type(state).__name__}, expected a ContinuationState; "
                      "ignoring it and sampling as ComfyUI does", stacklevel=3)
        return None
    why = state.mismatch(fp, start_step)
    if why is None and state.x is not None and not np.array_equal(np.asarray(latent["samples"]), scale_out(state)):
        why = "the latent's samples changed since the window that made the state"
    if why:
        warnings.warn(f"latent_image['{STATE_KEY}'] does not fit this window: {why}; ignoring it and sampling as "
                      "ComfyUI does", stacklevel=3)
        return None
    return state
