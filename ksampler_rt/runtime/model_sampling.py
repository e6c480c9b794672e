"""Model sampling: the sigma table, sigma <-> timestep, prediction types, latent formats.

Behaviour matches ComfyUI 0.3.64 ``comfy/model_sampling.py`` (``ModelSamplingDiscrete``, ``EPS``,
``V_PREDICTION``, ``CONST``, ``ModelSamplingDiscreteFlow``, ``ModelSamplingFlux``) and
``comfy/latent_formats.py``.

Discrete VP (SD1.x, SD2.x, SDXL):

* the beta schedule ComfyUI calls "linear" (diffusers' ``scaled_linear``) is computed in float64,
  the sigma table is stored as float32 and ``log_sigmas`` is the float64 log cast to float32;
* ``timestep(sigma)`` is the *nearest* table index (no interpolation), ``sigma(t)`` interpolates
  linearly in log-sigma;
* denoised predictions are formed in float32, as ComfyUI does on the CPU.

Rectified flow (SD3 / SD3.5, FLUX.1): see :class:`ModelSamplingDiscreteFlow` and
:class:`ModelSamplingFlux`; both predict with ``CONST`` (the network sees the latent unscaled,
denoised = x - out * sigma, noise enters as sigma * noise + (1 - sigma) * latent).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PREDICTION_TYPES = ("eps", "v")


def _sigma_column(sigma, ndim: int):
    """Broadcast a scalar or per-row sigma against an [N, ...] array (ComfyUI's reshape_sigma)."""
    sigma = np.asarray(sigma, dtype=np.float32)
    if sigma.size == 1:
        return sigma.reshape(())
    return sigma.reshape(sigma.shape[:1] + (1,) * (ndim - 1))


def _rescale_zero_terminal_snr(sigmas: np.ndarray) -> np.ndarray:
    """Zero-terminal-SNR rescaling (Lin et al. 2023) as ComfyUI's rescale_zero_terminal_snr_sigmas."""
    alphas_bar_sqrt = np.sqrt(1.0 / (sigmas * sigmas + 1.0))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt ** 2
    alphas_bar[-1] = 4.8973451890853435e-08
    return ((1 - alphas_bar) / alphas_bar) ** 0.5


class _SigmaTable:
    """A model sampling's ``sigmas`` table, ascending; its ends are sigma_min and sigma_max."""

    sigmas: np.ndarray

    @property
    def sigma_min(self) -> np.float32:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> np.float32:
        return self.sigmas[-1]


class ModelSamplingDiscrete(_SigmaTable):
    """The 1000-step discrete VP schedule of SD1.x / SD2.x / SDXL in sigma (Karras) form."""

    sigma_data = 1.0

    def __init__(self, prediction: str = "eps", zsnr: bool = False, linear_start: float = 0.00085,
                 linear_end: float = 0.012, timesteps: int = 1000):
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction: received {prediction!r}, expected one of {PREDICTION_TYPES}")
        self.prediction = prediction
        self.zsnr = bool(zsnr)
        self.linear_start, self.linear_end, self.num_timesteps = linear_start, linear_end, int(timesteps)
        betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
        alphas_cumprod = np.cumprod(1.0 - betas)
        sigmas64 = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        if self.zsnr:
            sigmas64 = _rescale_zero_terminal_snr(sigmas64)
        self.sigmas = sigmas64.astype(np.float32)
        self.log_sigmas = np.log(sigmas64).astype(np.float32)
        self._timestep_cache: dict[float, np.float32] = {}

    # -- the table -------------------------------------------------------------------------
    def timestep(self, sigma) -> np.ndarray:
        """Nearest table index for each sigma, as float32 (what the UNet receives)."""
        sigma = np.asarray(sigma, dtype=np.float32)
        first = sigma.reshape(-1)[:1]
        if first.size and (sigma.size == 1 or (sigma == first[0]).all()):
            # every row of a sampling step has the same sigma: one lookup, cached per schedule value
            key = float(first[0])
            t = self._timestep_cache.get(key)
            if t is None:
                t = self._nearest_index(first)[0]
                if len(self._timestep_cache) < 4096:
                    self._timestep_cache[key] = t
            return np.full(sigma.shape, t, dtype=np.float32)
        return self._nearest_index(sigma.reshape(-1)).reshape(sigma.shape)

    def _nearest_index(self, sigma: np.ndarray) -> np.ndarray:
        log_sigma = np.log(sigma.astype(np.float64)).astype(np.float32)
        dists = np.abs(log_sigma.reshape(1, -1) - self.log_sigmas[:, None])
        return dists.argmin(axis=0).astype(np.float32)

    def sigma(self, timestep) -> np.ndarray:
        """Sigma at a (fractional) timestep: linear interpolation in log-sigma, float32."""
        t = np.clip(np.asarray(timestep, dtype=np.float32), 0, len(self.sigmas) - 1)
        low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
        w = (t - np.floor(t)).astype(np.float32)
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        # exp in float64, rounded to float32: matches torch's float32 exp far more often than np.exp does
        return np.exp(log_sigma.astype(np.float64)).astype(np.float32)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(np.float32((1.0 - percent) * 999.0)))

    # -- prediction types ------------------------------------------------------------------
    def calculate_input(self, sigma, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """c_in * x: the scaled latent the UNet sees (written into ``out`` when given).

        ``** 0.5`` is written as ``np.sqrt``: numpy's float32 arrays take a sqrt fast path for it but
        0-d arrays go through powf, which is 1 ulp off for some sigmas; this way one sigma gives the
        same c_in whether it comes as a scalar or as a row of a batch."""
        sigma = _sigma_column(sigma, x.ndim)
        return np.divide(x, np.sqrt(sigma ** 2 + np.float32(self.sigma_data ** 2)), out=out)

    def calculate_denoised(self, sigma, model_output: np.ndarray, x: np.ndarray) -> np.ndarray:
        sigma = _sigma_column(sigma, model_output.ndim)
        if self.prediction == "eps":
            return x - model_output * sigma
        sd = np.float32(self.sigma_data)
        return (x * sd ** 2 / (sigma ** 2 + sd ** 2)
                - model_output * sigma * sd / np.sqrt(sigma ** 2 + sd ** 2))

    def noise_scaling(self, sigma, noise: np.ndarray, latent: np.ndarray, max_denoise: bool = False) -> np.ndarray:
        sigma = _sigma_column(sigma, noise.ndim)
        if max_denoise:
            noise = noise * np.sqrt(np.float32(1.0) + sigma ** np.float32(2.0))
        else:
            noise = noise * sigma
        return noise + latent

    def inverse_noise_scaling(self, sigma, x: np.ndarray) -> np.ndarray:
        return x


@dataclass(frozen=True)
class Family:
    """What the runtime needs to know about a model family.

    ``sampling``: ``"discrete"`` (VP table), ``"flow"`` (ComfyUI ModelSamplingDiscreteFlow) or ``"flux"``
    (ModelSamplingFlux); ``shift`` / ``multiplier``: the flow samplings' defaults. ``latent_shift``:
    the latent format's shift factor (process_in = (x - shift) * scale). ``pooled_dim``: a flow family's pooled text width (its ``y``). ``guidance``: the network
    takes FLUX.1 dev's distilled-guidance input.
    """

    name: str
    prediction: str
    latent_scale: float
    latent_channels: int = 4
    context_dim: int = 768
    adm_channels: int = 0  # SDXL's `y` width (pooled text embedding + size/crop time ids)
    pooled_dim: int = 0    # flow families: `y` is the pooled text vector itself, this wide
    latent_shift: float = 0.0
    sampling: str = "discrete"
    shift: float = 1.0
    multiplier: float = 1000.0
    guidance: bool = False

    @property
    def is_flow(self) -> bool:
        return self.sampling != "discrete"


FAMILIES: dict[str, Family] = {
    "sd15": Family("sd15", "eps", 0.18215, context_dim=768),
    "sd2": Family("sd2", "eps", 0.18215, context_dim=1024),
    "sd2-v": Family("sd2-v", "v", 0.18215, context_dim=1024),
    "sdxl": Family("sdxl", "eps", 0.13025, context_dim=2048, adm_channels=2816),
    "sdxl-refiner": Family("sdxl-refiner", "eps", 0.13025, context_dim=1280, adm_channels=2560),
    # comfy/supported_models.py SD3 / Flux / FluxSchnell with comfy/latent_formats.py SD3 / Flux
    "sd3": Family("sd3", "const", 1.5305, latent_channels=16, context_dim=4096, pooled_dim=2048,
                  latent_shift=0.0609, sampling="flow", shift=3.0, multiplier=1000.0),
    "flux": Family("flux", "const", 0.3611, latent_channels=16, context_dim=4096, pooled_dim=768,
                   latent_shift=0.1159, sampling="flux", shift=1.15, guidance=True),
    "flux-schnell": Family("flux-schnell", "const", 0.3611, latent_channels=16, context_dim=4096,
                           pooled_dim=768, latent_shift=0.1159, sampling="flow", shift=1.0, multiplier=1.0),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"family: received {name!r}, expected one of {tuple(FAMILIES)}") from None


def make_model_sampling(family: Family, *, zsnr: bool = False, shift: float | None = None):
    """The model sampling ComfyUI builds for ``family`` (``shift`` overrides a flow family's, as the
    ModelSamplingSD3 / ModelSamplingFlux nodes do)."""
    if family.sampling == "discrete":
        if shift is not None:
            raise ValueError(f"shift: received {shift!r}, expected None for the discrete VP family {family.name!r} "
                             "(only flow families take a shift)")
        return ModelSamplingDiscrete(prediction=family.prediction, zsnr=zsnr)
    if zsnr:
        raise ValueError(f"zsnr: received True, expected False for the flow family {family.name!r}")
    shift = family.shift if shift is None else _check_shift(shift)
    if family.sampling == "flux":
        return ModelSamplingFlux(shift=shift)
    return ModelSamplingDiscreteFlow(shift=shift, multiplier=family.multiplier)


def _check_shift(shift) -> float:
    if isinstance(shift, (bool, np.bool_)) or not isinstance(shift, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(shift)) or float(shift) <= 0:
        raise ValueError(f"shift: received {shift!r}, expected a finite number > 0")
    return float(shift)


def flux_shift(width: int, height: int, max_shift: float = 1.15, base_shift: float = 0.5) -> float:
    """The shift the ModelSamplingFlux node computes (comfy_extras/nodes_model_advanced.py): linear in
    the image-token count (w * h / 256) from base_shift at 256 tokens to max_shift at 4096."""
    x1, x2 = 256, 4096
    mm = (max_shift - base_shift) / (x2 - x1)
    b = base_shift - mm * x1
    return (width * height / (8 * 8 * 2 * 2)) * mm + b


# -- rectified flow ------------------------------------------------------------------------------
_F32 = np.float32


class _Const(_SigmaTable):
    """ComfyUI's ``CONST`` prediction (rectified flow), float32 as torch computes it on the CPU."""

    prediction = "const"
    sigma_data = 1.0
    zsnr = False

    def calculate_input(self, sigma, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The network sees the latent as it is (no c_in)."""
        if out is None:
            return x
        np.copyto(out, x)
        return out

    def calculate_denoised(self, sigma, model_output: np.ndarray, x: np.ndarray) -> np.ndarray:
        return x - model_output * _sigma_column(sigma, model_output.ndim)

    def noise_scaling(self, sigma, noise: np.ndarray, latent: np.ndarray, max_denoise: bool = False) -> np.ndarray:
        sigma = _sigma_column(sigma, noise.ndim)
        return sigma * noise + (_F32(1.0) - sigma) * latent

    def inverse_noise_scaling(self, sigma, x: np.ndarray) -> np.ndarray:
        return x / (_F32(1.0) - _sigma_column(sigma, x.ndim))



class ModelSamplingDiscreteFlow(_Const):
    """ComfyUI's ``ModelSamplingDiscreteFlow`` (SD3 / SD3.5: shift 3, multiplier 1000; FLUX.1 schnell:
    shift 1, multiplier 1).

    ``sigma(t) = time_snr_shift(shift, t / multiplier)`` with ``time_snr_shift(a, t) = a t / (1 + (a-1) t)``
    (the identity for a = 1), the table ``sigma(arange(1, 1001) / 1000 * multiplier)``, and
    ``timestep(sigma) = sigma * multiplier`` -- all float32 as torch evaluates them.
    ``percent_to_sigma`` is ComfyUI's python-float version.
    """

    def __init__(self, shift: float = 1.0, multiplier: float = 1000.0, timesteps: int = 1000):
        self.shift, self.multiplier, self.num_timesteps = float(shift), float(multiplier), int(timesteps)
        t = np.arange(1, timesteps + 1, dtype=_F32) / _F32(timesteps) * _F32(multiplier)
        self.sigmas = self.sigma(t)

    def timestep(self, sigma) -> np.ndarray:
        return np.asarray(sigma, dtype=_F32) * _F32(self.multiplier)

    def sigma(self, timestep) -> np.ndarray:
        t = np.asarray(timestep, dtype=_F32) / _F32(self.multiplier)
        if self.shift == 1.0:
            return t
        a = self.shift
        return (_F32(a) * t) / (_F32(1.0) + _F32(a - 1.0) * t)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        t, a = 1.0 - percent, self.shift
        return t if a == 1.0 else a * t / (1 + (a - 1) * t)


class ModelSamplingFlux(_Const):
    """ComfyUI's ``ModelSamplingFlux`` (FLUX.1 dev): ``sigma(t) = e^shift / (e^shift + (1/t - 1))`` over
    10 000 table entries ``t = arange(1, 10001) / 10000``; ``timestep(sigma) = sigma``.

    float32 as torch evaluates ``math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)``: a python float
    over a tensor is the tensor's reciprocal times the float (torch's ``__rtruediv__``), and the float
    enters float32 arithmetic rounded to float32.
    """

    def __init__(self, shift: float = 1.15, timesteps: int = 10000):
        self.shift, self.num_timesteps = float(shift), int(timesteps)
        self.multiplier = 1.0
        self.sigmas = self.sigma(np.arange(1, timesteps + 1, dtype=_F32) / _F32(timesteps))

    def timestep(self, sigma) -> np.ndarray:
        return np.asarray(sigma, dtype=_F32)

    def sigma(self, timestep) -> np.ndarray:
        t = np.asarray(timestep, dtype=_F32)
        e = _F32(math.exp(self.shift))
        with np.errstate(divide="ignore"):
            denom = e + ((_F32(1.0) / t) * _F32(1.0) - _F32(1.0))
            return (_F32(1.0) / denom) * e

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        e = math.exp(self.shift)
        return e / (e + (1 / (1.0 - percent) - 1))
