"""``Model``: any UNet callable plus the model sampling and latent format of its family.

Mirrors what ComfyUI's ``BaseModel._apply_model`` does around the diffusion model
(comfy/model_base.py, 0.3.64): scale the latent by c_in, hand the UNet the *nearest-index*
timestep as float32, and turn its prediction into a denoised (x0) estimate.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from .model_sampling import Family, ModelSamplingDiscrete, get_family


class UNet(Protocol):
    def __call__(self, x: np.ndarray, timestep: np.ndarray, context: np.ndarray, **kwargs) -> np.ndarray: ...


class UNetOutputError(RuntimeError):
    """The UNet returned something the sampler cannot use (wrong shape, NaN or inf)."""


class Model:
    """A UNet callable bound to a model family.

    ``unet(x, timestep, context, **kwargs)`` receives the c_in-scaled latent batch [N,C,H,W]
    float32, the timestep float32 [N] and the cross-attention context [N,T,D]; SDXL-shaped
    families also get ``y`` [N, adm_channels]. It returns the raw prediction (eps or v).
    """

    def __init__(self, unet: UNet | Callable, family: str = "sd15", *, zsnr: bool = False):
        if not callable(unet):
            raise TypeError(f"unet: received {type(unet).__name__}, expected a callable unet(x, timestep, context, **kwargs)")
        self.unet = unet
        self.family: Family = get_family(family)
        self.model_sampling = ModelSamplingDiscrete(prediction=self.family.prediction, zsnr=zsnr)
        self.latent_scale = np.float32(self.family.latent_scale)

    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels

    def process_latent_in(self, latent: np.ndarray) -> np.ndarray:
        return latent * self.latent_scale

    def process_latent_out(self, latent: np.ndarray) -> np.ndarray:
        return latent / self.latent_scale

    def apply_model(self, x: np.ndarray, sigma: np.ndarray, context: np.ndarray, **kwargs) -> np.ndarray:
        """Denoised prediction D(x, sigma) for every row of ``x`` (sigma: float32 [N]).

        Always a new array (never the UNet's output buffer): the CFG denoiser hands views of it to the
        samplers, some of which keep them across steps."""
        ms = self.model_sampling
        out = self.unet_output(ms.calculate_input(sigma, x), sigma, context, **kwargs)
        return ms.calculate_denoised(sigma, out, x)

    def unet_output(self, x_in: np.ndarray, sigma: np.ndarray, context: np.ndarray, *,
                    check_finite: bool = True, **kwargs) -> np.ndarray:
        """The UNet's raw prediction (float32, x_in's shape) for an already c_in-scaled batch, at
        ComfyUI's nearest-index timestep of ``sigma``; raises :class:`UNetOutputError` on a wrong
        shape or (with ``check_finite``) on NaN / inf."""
        out = np.asarray(self.unet(x_in, self.model_sampling.timestep(sigma), context, **kwargs))
        if out.shape != x_in.shape:
            raise UNetOutputError(f"the UNet returned shape {out.shape}, expected {x_in.shape} (the shape of its input)")
        if out.dtype != np.float32:
            out = out.astype(np.float32)
        if check_finite and not np.isfinite(out).all():
            bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
            raise UNetOutputError(f"the UNet returned {bad} non-finite values (NaN or inf)")
        return out

    def __repr__(self) -> str:
        return f"Model(family={self.family.name!r}, prediction={self.family.prediction!r}, unet={self.unet!r})"
