"""Every ComfyUI sampler, keyed by ComfyUI's own names (``comfy.samplers.KSampler.SAMPLERS``).

The contract every sampler function follows (k-diffusion style)::

    def sample_NAME(model, x, sigmas, noise, callback=None, **options) -> np.ndarray

* ``model(x, sigma) -> denoised``: the CFG-combined x0 prediction, float32, shaped like ``x``;
  ``sigma`` is a float32 scalar applied to every row.
* ``model.with_uncond(x, sigma) -> (denoised, uncond_denoised)``: for the CFG++ samplers.
* ``model.model_sampling``: the :class:`~ksampler_rt.runtime.model_sampling.ModelSamplingDiscrete`, or for
  a flow family ``ModelSamplingDiscreteFlow`` / ``ModelSamplingFlux`` (ComfyUI's CONST: samplers with a
  rectified-flow branch test :func:`.common.is_flow`; ``SamplerSpec.flow`` false refuses flow models).
* ``x``: the already noise-scaled float32 latent (ComfyUI's ``noise_scaling`` was applied).
* ``sigmas``: float32 1-D array, the exact list ComfyUI hands the sampler.
* ``noise``: a :class:`~ksampler_rt.runtime.noise.NoiseSource`; ``noise.default(x)`` and
  ``noise.brownian(x, sigma_min, sigma_max)`` return ``noise_sampler(sigma, sigma_next)``
  exactly where ComfyUI builds ``default_noise_sampler`` / ``BrownianTreeNoiseSampler``.
* ``callback(i, x, denoised)`` once per step, where ComfyUI's sampler calls its callback.

All randomness comes from ``noise``; all maths stays float32 like ComfyUI's CPU path.
"""
from __future__ import annotations

from .registry import DISCARD_PENULTIMATE_SIGMA_SAMPLERS, SAMPLER_NAMES, SAMPLERS, SamplerSpec, get_sampler

__all__ = ["DISCARD_PENULTIMATE_SIGMA_SAMPLERS", "SAMPLER_NAMES", "SAMPLERS", "SamplerSpec", "get_sampler"]
