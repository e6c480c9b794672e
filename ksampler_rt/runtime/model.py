"""``Model``: any UNet callable plus the model sampling and latent format of its family.

Mirrors what ComfyUI's ``BaseModel._apply_model`` does around the diffusion model
(comfy/model_base.py, 0.3.64): scale the latent by c_in (VP families; flow families see it
unscaled), hand the network the timestep of its family as float32 (VP: the *nearest* table index;
SD3: sigma * 1000; FLUX.1 dev: sigma; schnell: sigma * 1), and turn its prediction into a denoised
(x0) estimate.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from .model_sampling import Family, get_family, make_model_sampling


class UNet(Protocol):
    def __call__(self, x: np.ndarray, timestep: np.ndarray, context: np.ndarray, **kwargs) -> np.ndarray: ...


class UNetOutputError(RuntimeError):
    """The UNet returned something the sampler cannot use (wrong shape, NaN or inf)."""


class Model:
    """A UNet callable bound to a model family.

    ``unet(x, timestep, context, **kwargs)`` receives the c_in-scaled latent batch [N,C,H,W]
    float32, the timestep float32 [N] and the cross-attention context [N,T,D]; SDXL-shaped
    families also get ``y`` [N, adm_channels], flow families ``y`` [N, pooled_dim] (the pooled text
    vector) and FLUX.1 dev ``guidance`` [N]. It returns the raw prediction (eps, v or the flow's
    velocity).

    ``shift``: a flow family's sampling shift (what the ModelSamplingSD3 node sets, or the number the
    ModelSamplingFlux node computes: :func:`~ksampler_rt.runtime.model_sampling.flux_shift`).
    """

    def __init__(self, unet: UNet | Callable, family: str = "sd15", *, zsnr: bool = False,
                 shift: float | None = None):
        if not callable(unet):
            raise TypeError(f"unet: received {type(unet).__name__}, expected a callable unet(x, timestep, context, **kwargs)")
        self.unet = unet
        self.family: Family = get_family(family)
        self.model_sampling = make_model_sampling(self.family, zsnr=zsnr, shift=shift)
        self.latent_scale = np.float32(self.family.latent_scale)
        self.latent_shift = np.float32(self.family.latent_shift)

    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels

    def process_latent_in(self, latent: np.ndarray) -> np.ndarray:
        """comfy/latent_formats.py ``process_in``: x * scale, or (x - shift) * scale (SD3, Flux)."""
        if self.family.latent_shift:
            return (latent - self.latent_shift) * self.latent_scale
        return latent * self.latent_scale

    def process_latent_out(self, latent: np.ndarray) -> np.ndarray:
        """``process_out``: x / scale, or x / scale + shift."""
        if self.family.latent_shift:
            return latent / self.latent_scale + self.latent_shift
        return latent / self.latent_scale

    def apply_model(self, x: np.ndarray, sigma: np.ndarray, context: np.ndarray, *, control=None,
                    **kwargs) -> np.ndarray:
        """Denoised prediction D(x, sigma) for every row of ``x`` (sigma: float32 [N]).

        ``control``: a :class:`~ksampler_rt.runtime.control.ControlCall` (or any ``control(x_in, timestep,
        sigma) -> dict | None``); its residuals reach the UNet as ``control=`` when it returns some, and the
        UNet is called exactly as without it otherwise (ComfyUI: ``c['control'] = control.get_control(...)``
        in comfy/samplers.py _calc_cond_batch, on the same c_in-scaled input and timestep as the UNet's).

        Always a new array (never the UNet's output buffer): the CFG denoiser hands views of it to the
        samplers, some of which keep them across steps."""
        ms = self.model_sampling
        x_in = ms.calculate_input(sigma, x)
        if control is not None:
            residuals = control(x_in, ms.timestep(sigma), sigma)
            if residuals is not None:
                kwargs["control"] = residuals
        out = self.unet_output(x_in, sigma, context, **kwargs)
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
        shift = f", shift={self.model_sampling.shift!r}" if self.family.is_flow else ""
        return f"Model(family={self.family.name!r}, prediction={self.family.prediction!r}{shift}, unet={self.unet!r})"
