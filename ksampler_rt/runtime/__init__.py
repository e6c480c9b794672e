"""The numpy runtime: ComfyUI's KSampler / KSamplerAdvanced around any UNet callable.

Imports neither torch nor the export/engines packages: it drives any callable
``unet(x, timestep, context, **kwargs) -> np.ndarray``.
"""
from .ksampler import ksampler, ksampler_advanced
from .model import Model
from .model_sampling import FAMILIES, ModelSamplingDiscrete
from .noise import prepare_noise
from .samplers import SAMPLER_NAMES
from .schedulers import SCHEDULER_NAMES, calculate_sigmas

__all__ = [
    "FAMILIES", "Model", "ModelSamplingDiscrete", "SAMPLER_NAMES", "SCHEDULER_NAMES", "calculate_sigmas",
    "ksampler", "ksampler_advanced", "prepare_noise",
]
