"""Noise, as ComfyUI draws it on the CPU: one import point for the noise stack's public names.

The stack, each layer importing only the ones above it in this list:

* :mod:`.randn_reference`: numpy reference maths of torch's CPU ``randn`` (uniforms, Box-Muller);
* :mod:`.randn_numpy`: the fast numpy AVX2 kernel; :mod:`.jit` / :mod:`._jit_kernels`: the
  compiled kernels (numba, optional);
* :mod:`.generator`: :class:`TorchCPUGenerator`, :func:`randn_many`, :func:`prepare_noise`, kernel
  selection (:func:`default_kernel`);
* :mod:`.brownian`: torchsde's ``BrownianTree``;
* :mod:`.noise_sources`: :class:`NoiseSource` and the samplers' noise samplers, prefetched on
  :class:`.lookahead.Lookahead`.

See :mod:`.generator` for which Box-Muller kernel torch runs and how exact each path is.
"""
from __future__ import annotations

from .generator import (KERNELS, TorchCPUGenerator, default_kernel, kernel_for_capability, prepare_noise,
                        randn_many, torch_randn)
from .noise_sources import BrownianNoiseSampler, DefaultNoiseSampler, NoiseSource

__all__ = [
    "KERNELS",
    "BrownianNoiseSampler",
    "DefaultNoiseSampler",
    "NoiseSource",
    "TorchCPUGenerator",
    "default_kernel",
    "kernel_for_capability",
    "prepare_noise",
    "randn_many",
    "torch_randn",
]
