"""ComfyUI's SDXL ``y`` (adm) vector, in numpy. The exported SDXL UNet takes this ``y`` directly.

ComfyUI ``model_base.SDXL.encode_adm``: ``y = cat(pooled_clip_g, emb(height), emb(width), emb(crop_h),
emb(crop_w), emb(target_height), emb(target_width))`` with ``emb = Timestep(256)`` i.e. the sinusoidal
``timestep_embedding`` ([cos, sin], max_period 10000). The refiner uses ``emb(height), emb(width), emb(crop_h),
emb(crop_w), emb(aesthetic_score)`` (6.0 positive / 2.5 negative by default).
"""
from __future__ import annotations

import math

import numpy as np


def timestep_embedding(values, dim: int = 256, max_period: float = 10000.0) -> np.ndarray:
    """ComfyUI/LDM ``timestep_embedding``: [N] -> [N, dim], cos first then sin, float32."""
    t = np.asarray(values, dtype=np.float32).reshape(-1)
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half).astype(np.float32)
    args = t[:, None] * freqs[None]
    emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    if dim % 2:
        emb = np.concatenate([emb, np.zeros_like(emb[:, :1])], axis=-1)
    return emb.astype(np.float32)


def sdxl_adm(pooled, width: int, height: int, crop_w: int = 0, crop_h: int = 0,
             target_width: int | None = None, target_height: int | None = None,
             embed_dim: int = 256) -> np.ndarray:
    """SDXL base ``y``: pooled [B, P] -> [B, P + 6*embed_dim]."""
    pooled = np.asarray(pooled, dtype=np.float32)
    target_width = width if target_width is None else target_width
    target_height = height if target_height is None else target_height
    ids = [height, width, crop_h, crop_w, target_height, target_width]
    flat = timestep_embedding(ids, embed_dim).reshape(1, -1)
    return np.concatenate([pooled, np.repeat(flat, pooled.shape[0], axis=0)], axis=1)


def sdxl_refiner_adm(pooled, width: int, height: int, crop_w: int = 0, crop_h: int = 0,
                     aesthetic_score: float = 6.0, embed_dim: int = 256) -> np.ndarray:
    """SDXL refiner ``y``: pooled [B, P] -> [B, P + 5*embed_dim]."""
    pooled = np.asarray(pooled, dtype=np.float32)
    flat = timestep_embedding([height, width, crop_h, crop_w, aesthetic_score], embed_dim).reshape(1, -1)
    return np.concatenate([pooled, np.repeat(flat, pooled.shape[0], axis=0)], axis=1)
