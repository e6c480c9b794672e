"""The text conditioning of the flow families, composed from the exported text encoders' outputs (numpy only,
no torch: the workflow's CLIPTextEncode can call it).

ComfyUI 0.3.64, comfy/text_encoders/sd3_clip.py ``SD3ClipModel.encode_token_weights`` and
comfy/text_encoders/flux.py ``FluxClipModel.encode_token_weights``:

* SD3: clip_l and clip_g run on their 77-token chunks and give their *penultimate* layer, raw (no final layer
  norm: ``layer="hidden", layer_idx=-2, layer_norm_hidden_state=False``); they are cut to the shorter token
  count and concatenated on the feature axis (768 + 1280 = 2048), zero-padded on the right to 4096 features
  (T5-XXL's width), then T5's last hidden state is appended on the *token* axis. Pooled vector
  ``y`` = concat(clip_l pooled (un-projected), clip_g pooled (projected)) = 768 + 1280 = 2048. A missing
  encoder is replaced as ComfyUI does: no clip_l -> clip_g padded on the *left* by clip_l's width and zero
  clip_l pooled; no clip_g -> zero clip_g pooled; no T5 -> the padded CLIP part alone.
* FLUX: context = T5's last hidden state; ``y`` = clip_l's pooled output (un-projected).

Widths are taken from the arrays, so the tiny models (CLIP-L 32, CLIP-G 64, T5 128) compose the same way; the
padding target is T5's width when T5 is present, else ``context_dim`` (4096).
"""
from __future__ import annotations

import numpy as np


def _arr(name: str, a, ndim: int) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if a.ndim != ndim:
        raise ValueError(f"{name}: received shape {a.shape}, expected {ndim} dimensions")
    return a


def sd3_conditioning(clip_l_hidden=None, clip_l_pooled=None, clip_g_hidden=None, clip_g_pooled=None,
                     t5_hidden=None, *, context_dim: int = 4096, clip_l_dim: int = 768,
                     clip_g_dim: int = 1280) -> tuple[np.ndarray, np.ndarray]:
    """(context [B, T, D], pooled [B, P]) for SD3 / SD3.5 from the penultimate CLIP hidden states [B,77*k,w],
    the CLIP pooled vectors [B,w] and T5's last hidden state [B,T5,D]; any encoder may be None (see the module
    docstring). ``clip_l_dim`` / ``clip_g_dim``: the widths a missing CLIP's zeros take (real models' defaults)."""
    lg = None
    pooled = None
    if clip_l_hidden is not None or clip_g_hidden is not None:
        if clip_l_hidden is not None:
            lg = _arr("clip_l_hidden", clip_l_hidden, 3)
            l_pooled = _arr("clip_l_pooled", clip_l_pooled, 2)
        else:
            l_pooled = None
        if clip_g_hidden is not None:
            g = _arr("clip_g_hidden", clip_g_hidden, 3)
            g_pooled = _arr("clip_g_pooled", clip_g_pooled, 2)
            if lg is not None:
                cut = min(lg.shape[1], g.shape[1])
                lg = np.concatenate([lg[:, :cut], g[:, :cut]], axis=-1)
            else:
                width = clip_l_dim
                lg = np.concatenate([np.zeros(g.shape[:2] + (width,), np.float32), g], axis=-1)
        else:
            g_pooled = None
        batch = lg.shape[0]
        if l_pooled is None:
            l_pooled = np.zeros((batch, clip_l_dim), np.float32)
        if g_pooled is None:
            g_pooled = np.zeros((batch, clip_g_dim), np.float32)
        pooled = np.concatenate([l_pooled, g_pooled], axis=-1)
    t5 = _arr("t5_hidden", t5_hidden, 3) if t5_hidden is not None else None
    width = t5.shape[-1] if t5 is not None else context_dim
    out = None
    if lg is not None:
        if lg.shape[-1] > width:
            raise ValueError(f"clip_l_hidden + clip_g_hidden: received {lg.shape[-1]} features, expected at most "
                             f"{width} (the T5 / context width)")
        lg = np.pad(lg, ((0, 0), (0, 0), (0, width - lg.shape[-1])))
        out = lg
    if t5 is not None:
        out = np.concatenate([lg, t5], axis=1) if lg is not None else t5
    if out is None:
        out = np.zeros((1, 77, context_dim), np.float32)
    if pooled is None:
        pooled = np.zeros((out.shape[0], clip_l_dim + clip_g_dim), np.float32)
    return np.ascontiguousarray(out), np.ascontiguousarray(pooled)


def flux_conditioning(t5_hidden, clip_l_pooled) -> tuple[np.ndarray, np.ndarray]:
    """(context, pooled) for FLUX.1: T5's last hidden state and clip_l's un-projected pooled output."""
    return (np.ascontiguousarray(_arr("t5_hidden", t5_hidden, 3)),
            np.ascontiguousarray(_arr("clip_l_pooled", clip_l_pooled, 2)))
