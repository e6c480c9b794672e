"""SDXL's ADM vector ``y``: the pooled text embedding followed by sinusoidal size/crop embeddings.

Behaviour matches ComfyUI 0.3.64 ``comfy/model_base.py`` (``SDXL.encode_adm``,
``SDXLRefiner.encode_adm``) with ``Timestep(256)`` from
``comfy/ldm/modules/diffusionmodules/openaimodel.py``, which calls ``timestep_embedding`` in
``comfy/ldm/modules/diffusionmodules/util.py``:

* freqs_j = exp(-ln(10000) * j / 128) for j = 0..127 (float32: the float32 constant -ln(10000)
  times j, divided by 128, then exp);
* args = t * freqs (float32), embedding = [cos(args), sin(args)]: cosines first, no flip
  (diffusers' ``get_timestep_embedding`` with ``flip_sin_to_cos=True, downscale_freq_shift=0``).

SDXL:    y = [pooled (1280) | emb(height) | emb(width) | emb(crop_h) | emb(crop_w) |
              emb(target_height) | emb(target_width)]                        -> 2816 wide
Refiner: y = [pooled (1280) | emb(height) | emb(width) | emb(crop_h) | emb(crop_w) |
              emb(aesthetic_score)]                                          -> 2560 wide

Note the order: height before width, crop_h before crop_w. The same size row is repeated for every
row of ``pooled``. In ComfyUI, width/height default to the latent's size * 8 when the conditioning
does not carry them (``encode_model_conds``), target size defaults to width/height, and the
refiner's aesthetic score defaults to 6 (2.5 for the negative prompt).

Guarantee, against the torch ComfyUI runs on the same machine:

* the 128 frequencies of ``Timestep(256)`` (the only table SDXL uses) are **bit-identical**: torch's
  float32 ``exp`` is Intel MKL's vector exp on x86-64, which is not correctly rounded and rounds
  differently on each of MKL's code paths, so the correctly rounded values are corrected by a table
  of last-bit deltas measured for each path (``cpu_capability.mkl_vml_path``; tests compare them
  with the installed torch under every path the machine can run);
* other ``dim`` / ``max_period``, and machines off x86-64: frequencies correctly rounded, i.e. within
  1 ulp of torch's;
* ``sin`` / ``cos`` of the float32 arguments are evaluated in float64 and rounded once, so each
  entry is within 1 ulp of torch's (MKL's are within 1 ulp of the correctly rounded value; 3-7 % of
  the entries of a size embedding differ in the last bit, i.e. by <= 6e-8 for |value| <= 1).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .cpu_capability import MKL_VML_PATHS, mkl_vml_path

POOLED_DIM = 1280
EMBED_DIM = 256
SDXL_ADM_DIM = POOLED_DIM + 6 * EMBED_DIM  # 2816
SDXL_REFINER_ADM_DIM = POOLED_DIM + 5 * EMBED_DIM  # 2560


# Last-bit deltas (torch minus correctly rounded, in ulps) of torch's float32 exp over the Timestep(256)
# exponents -ln(10000) * j / 128, per MKL code path (torch 2.13, MKL 2024.2). One ulp of a frequency is up
# to ~3e-5 in the embedding once t * freq reaches ~1000 rad, so they matter.
_TORCH_EXP_DELTAS_256 = {
    "sse4_2": {12: 1, 106: 1},
    "avx2": {2: 1, 78: -1, 92: -1, 98: 1, 110: 1, 117: 1},
    "avx512": {13: 1, 44: 1, 119: 1},
}
assert set(_TORCH_EXP_DELTAS_256) == set(MKL_VML_PATHS)


def _torch_freqs_256(freqs: np.ndarray, mkl_path: str | None) -> np.ndarray:
    deltas = _TORCH_EXP_DELTAS_256.get(mkl_path)
    if not deltas:
        return freqs
    bits = freqs.view(np.int32).copy()
    bits[list(deltas)] += np.asarray(list(deltas.values()), dtype=np.int32)
    return bits.view(np.float32)


def frequencies(half: int, max_period: float = 10000.0, mkl_path: str | None = "detect") -> np.ndarray:
    """ComfyUI's ``exp(-ln(max_period) * arange(half) / half)`` in float32 (see the module docstring).

    ``mkl_path``: which MKL code path's exp to reproduce (``"sse4_2"``, ``"avx2"``, ``"avx512"``), None
    for the correctly rounded values, ``"detect"`` (default) for this machine's.
    """
    if mkl_path == "detect":
        mkl_path = mkl_vml_path()
    elif mkl_path is not None and mkl_path not in MKL_VML_PATHS:
        raise ValueError(f"mkl_path: received {mkl_path!r}, expected one of {MKL_VML_PATHS}, None or 'detect'")
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    if half == EMBED_DIM // 2 and max_period == 10000.0:
        freqs = _torch_freqs_256(freqs, mkl_path)
    return freqs


def timestep_embedding(timesteps, dim: int = EMBED_DIM, max_period: float = 10000.0) -> np.ndarray:
    """ComfyUI's ``timestep_embedding``: [N] values -> float32 [N, dim] = [cos(t*f), sin(t*f)] (+ a zero
    column when dim is odd)."""
    t = np.asarray(timesteps, dtype=np.float32).reshape(-1)
    freqs = frequencies(dim // 2, max_period)
    args = (t[:, None] * freqs[None, :]).astype(np.float64)
    emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1).astype(np.float32)
    if dim % 2:
        emb = np.concatenate([emb, np.zeros((emb.shape[0], 1), dtype=np.float32)], axis=-1)
    return emb


def _check_pooled(pooled) -> np.ndarray:
    arr = np.asarray(pooled)
    # Real SDXL pools to 1280; smaller test models pool narrower, and y simply gets narrower.
    if arr.ndim != 2 or arr.shape[1] < 1 or arr.shape[0] < 1:
        raise ValueError(f"pooled: received an array of shape {arr.shape}, expected [N, P] with N >= 1 "
                         f"(the CLIP-G pooled output, P = {POOLED_DIM} for SDXL)")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"pooled: received dtype {arr.dtype}, expected a real floating-point array")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError("pooled: contains NaN or infinite values, expected finite numbers")
    return arr


def _check_size(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: received {value!r}, expected a finite number >= 0")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: received {value!r}, expected a finite number >= 0")
    return value


def _adm(pooled: np.ndarray, values: list[float]) -> np.ndarray:
    # ComfyUI builds each value as torch.Tensor([v]) (float32) and embeds it separately.
    flat = timestep_embedding(np.asarray(values, dtype=np.float32)).reshape(-1)
    return np.concatenate([pooled, np.broadcast_to(flat, (pooled.shape[0], flat.size))], axis=1).astype(np.float32)


def sdxl_adm(pooled, width, height, crop_w=0, crop_h=0, target_width=None, target_height=None) -> np.ndarray:
    """SDXL base ``y`` (ComfyUI ``SDXL.encode_adm``): float32 [N, 2816].

    ``pooled``: [N, 1280]. Sizes are pixels (ComfyUI: CLIPTextEncodeSDXL's inputs, or latent size * 8);
    target size defaults to (width, height).
    """
    pooled = _check_pooled(pooled)
    width, height = _check_size("width", width), _check_size("height", height)
    crop_w, crop_h = _check_size("crop_w", crop_w), _check_size("crop_h", crop_h)
    target_width = width if target_width is None else _check_size("target_width", target_width)
    target_height = height if target_height is None else _check_size("target_height", target_height)
    return _adm(pooled, [height, width, crop_h, crop_w, target_height, target_width])


def sdxl_refiner_adm(pooled, width, height, crop_w=0, crop_h=0, aesthetic_score=None,
                     negative: bool = False) -> np.ndarray:
    """SDXL refiner ``y`` (ComfyUI ``SDXLRefiner.encode_adm``): float32 [N, 2560].

    ``aesthetic_score`` defaults to 6.0, or 2.5 when ``negative`` (ComfyUI's prompt_type "negative").
    """
    pooled = _check_pooled(pooled)
    width, height = _check_size("width", width), _check_size("height", height)
    crop_w, crop_h = _check_size("crop_w", crop_w), _check_size("crop_h", crop_h)
    if aesthetic_score is None:
        aesthetic_score = 2.5 if negative else 6.0
    aesthetic_score = _check_size("aesthetic_score", aesthetic_score)
    return _adm(pooled, [height, width, crop_h, crop_w, aesthetic_score])
