"""Steps shared by several samplers, written once (float32 throughout, like ComfyUI on the CPU)."""
from __future__ import annotations

import numpy as np

F32 = np.float32


def to_d(x: np.ndarray, sigma, denoised: np.ndarray) -> np.ndarray:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022)."""
    return (x - denoised) / F32(sigma)


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Split a step into a deterministic move to sigma_down and fresh noise of std sigma_up."""
    sigma_from, sigma_to = F32(sigma_from), F32(sigma_to)
    if not eta:
        return sigma_to, F32(0.0)
    sigma_up = min(sigma_to, F32(eta) * np.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
    sigma_down = np.sqrt(sigma_to ** 2 - sigma_up ** 2)
    return F32(sigma_down), F32(sigma_up)


def sigma_to_half_log_snr(sigma):
    """lambda = -log(sigma) for the VP/eps family (ComfyUI's sigma_to_half_log_snr, non-CONST branch)."""
    return -np.log(np.asarray(sigma, dtype=F32))


def half_log_snr_to_sigma(half_log_snr):
    return np.exp(-np.asarray(half_log_snr, dtype=F32))
