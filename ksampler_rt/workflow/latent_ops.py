"""LATENT resampling as ComfyUI's LatentUpscale (``comfy.utils.common_upscale`` over
``torch.nn.functional.interpolate``), written as separable 1-D interpolation matrices."""
from __future__ import annotations

import math

import numpy as np

UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
CROP_METHODS = ("disabled", "center")


def _matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
    """W [n_out, n_in] such that out = W @ in along one axis (align_corners=False semantics)."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in), np.float64)
    dst = np.arange(n_out)
    if method == "nearest-exact":
        src = np.minimum(np.floor((dst + 0.5) * scale).astype(int), n_in - 1)
        w[dst, src] = 1.0
    elif method == "bilinear":
        src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0
        np.add.at(w, (dst, i0), 1.0 - lam)
        np.add.at(w, (dst, i1), lam)
    elif method == "bicubic":
        a = -0.75
        src = (dst + 0.5) * scale - 0.5
        i0 = np.floor(src).astype(int)
        t = src - i0

        def near(x):  # |x| <= 1
            return ((a + 2) * x - (a + 3)) * x * x + 1

        def far(x):  # 1 < |x| < 2
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

        for k, coeff in ((-1, far(t + 1)), (0, near(t)), (1, near(1 - t)), (2, far(2 - t))):
            np.add.at(w, (dst, np.clip(i0 + k, 0, n_in - 1)), coeff)
    elif method == "area":
        for i in range(n_out):
            start, end = math.floor(i * n_in / n_out), math.ceil((i + 1) * n_in / n_out)
            w[i, start:end] = 1.0 / (end - start)
    else:
        raise ValueError(f"upscale_method: received {method!r}, expected one of {UPSCALE_METHODS[:-1]}")
    return w.astype(np.float32)


def center_crop(samples: np.ndarray, width: int, height: int) -> np.ndarray:
    """comfy/utils.py common_upscale's "center" crop of [..., H, W] to the aspect of width x height."""
    old_h, old_w = samples.shape[-2:]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return samples[..., y:old_h - y, x:old_w - x]


def common_upscale(samples: np.ndarray, width: int, height: int, method: str, crop: str) -> np.ndarray:
    """Resize [B,C,H,W] to [B,C,height,width], optionally centre-cropping to the new aspect first."""
    if method == "bislerp":
        raise ValueError("upscale_method: 'bislerp' is not supported yet; expected one of "
                         f"{UPSCALE_METHODS[:-1]}")
    if crop not in CROP_METHODS:
        raise ValueError(f"crop: received {crop!r}, expected one of {CROP_METHODS}")
    s = center_crop(samples, width, height) if crop == "center" else samples
    wh = _matrix(s.shape[-2], height, method)
    ww = _matrix(s.shape[-1], width, method)
    return np.einsum("oh,bchw,pw->bcop", wh, s.astype(np.float32), ww, optimize=True).astype(np.float32)
