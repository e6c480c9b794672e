"""Torch wrappers that give the SD3.5 / FLUX.1 networks the inputs ksampler-rt's runtime hands its
unet callable (ComfyUI 0.3.64's conventions, comfy/model_base.py SD3 / Flux), float32 in and out.

* SD3 (comfy/ldm/modules/diffusionmodules/mmdit.py): ``timestep`` = sigma * 1000, the scale diffusers'
  ``SD3Transformer2DModel`` takes (``StableDiffusion3Pipeline`` passes the scheduler's 0..1000 timesteps).
* FLUX (comfy/ldm/flux/model.py): ``timestep`` = sigma and ``guidance`` = the FluxGuidance value; ComfyUI
  embeds both with ``time_factor=1000``. diffusers' ``FluxTransformer2DModel`` multiplies both by 1000 itself
  (``FluxPipeline`` passes ``timestep / 1000`` = sigma), so they go through unchanged. The latent
  [N,16,H,W] is packed into 2x2 patches ([N, H/2*W/2, 64], channel-major inside a patch, as ComfyUI's
  ``rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)")`` and diffusers' ``_pack_latents``), the position
  ids (0, row, column) / text ids (zeros) are built here from H, W and T, and the output is unpacked.
  H and W must be even (ComfyUI pads odd sizes; the runtime's latents are image / 8 of images that are
  multiples of 16).
"""
from __future__ import annotations

import torch
from torch import nn


class SD3TransformerWrapper(nn.Module):
    """transformer(x [N,16,H,W], timestep [N] = sigma*1000, context [N,T,D], y [N,P]) -> velocity [N,16,H,W]."""

    def __init__(self, transformer, dtype=torch.float32):
        super().__init__()
        self.transformer = transformer
        self.dtype = dtype
        decompose_rms_norms(transformer)  # SD3.5's qk rms-norm, where diffusers uses torch's

    def forward(self, x, timestep, context, y):
        out = self.transformer(hidden_states=x.to(self.dtype), encoder_hidden_states=context.to(self.dtype),
                               pooled_projections=y.to(self.dtype), timestep=timestep, return_dict=False)[0]
        return out.float()


def _flux_rope_fp32(pos_embed):
    """Make diffusers' ``FluxPosEmbed`` compute in float32 (it uses float64 off MPS, which ONNX Runtime's
    CPU kernels and TensorRT do not all take); the angles are small integers times < 1 frequencies, so
    float32 loses nothing that matters at the validation tolerance."""
    import types

    def forward(self, ids):
        n_axes = ids.shape[-1]
        cos_out, sin_out = [], []
        pos = ids.float()
        for i in range(n_axes):
            dim = self.axes_dim[i]
            freqs = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            angles = pos[:, i:i + 1] * freqs[None, :]
            # repeat_interleave(2, dim=1) written as stack + flatten: the exporter bakes the traced token
            # count into repeat_interleave's graph
            cos_out.append(torch.stack([angles.cos()] * 2, dim=-1).flatten(1))
            sin_out.append(torch.stack([angles.sin()] * 2, dim=-1).flatten(1))
        return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)

    pos_embed.forward = types.MethodType(forward, pos_embed)


def decompose_rms_norms(module: nn.Module) -> None:
    """Give every ``torch.nn.RMSNorm`` a forward of primitive ops: the TorchScript exporter has no symbolic
    for ``aten::rms_norm`` at opset 17 (ONNX's RMSNormalization needs opset 23). Same maths, in float32:
    ``x * rsqrt(mean(x^2) + eps) * weight`` (eps None = the dtype's machine epsilon, as torch does)."""
    import types

    def forward(self, x):
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)

    for m in module.modules():
        if isinstance(m, nn.RMSNorm):
            m.forward = types.MethodType(forward, m)


def _heads(t, head_dim: int):
    """[B,S,H*D] -> [B,S,H,D] with B and S read from ``t`` (``unflatten(-1, (-1, D))``, which diffusers uses,
    exports with the traced batch and token count baked in)."""
    return t.reshape(t.shape[0], t.shape[1], -1, head_dim)


def _rope(x, cos, sin):
    """diffusers' ``apply_rotary_emb(..., sequence_dim=1)`` (pairs (even, odd) rotated), exportable with any
    token count; x [B,S,H,D], cos / sin [S,D]."""
    b, s, h, d = x.shape
    pairs = x.float().reshape(b, s, h, d // 2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(b, s, h, d)
    return (x.float() * cos[None, :, None, :] + rotated * sin[None, :, None, :]).to(x.dtype)


class FluxExportAttnProcessor:
    """diffusers' ``FluxAttnProcessor`` (0.42) with shape-generic head split and RoPE (see ``_heads``); the
    same maths, plain ``scaled_dot_product_attention``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        hd = attn.head_dim
        query = attn.norm_q(_heads(attn.to_q(hidden_states), hd))
        key = attn.norm_k(_heads(attn.to_k(hidden_states), hd))
        value = _heads(attn.to_v(hidden_states), hd)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            eq = attn.norm_added_q(_heads(attn.add_q_proj(encoder_hidden_states), hd))
            ek = attn.norm_added_k(_heads(attn.add_k_proj(encoder_hidden_states), hd))
            ev = _heads(attn.add_v_proj(encoder_hidden_states), hd)
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            query, key = _rope(query, cos, sin), _rope(key, cos, sin)
        out = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            enc, out = out[:, :n_txt], out[:, n_txt:]
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(enc.contiguous())
        return out


def _fp32_time_embedding(embed) -> None:
    """Embed timestep and guidance from float32 values the wrapper stores on ``embed`` (``_t32``, ``_g32``):
    diffusers' Flux forward casts ``timestep`` to the weights' dtype *before* multiplying by 1000, which in fp16
    moves t by up to 0.5; ComfyUI (comfy/ldm/flux/model.py) builds the sinusoidal embedding in float32 and casts
    after, as this does. In fp32 both are the same numbers."""
    import types

    def forward(self, timestep, *rest):
        orig = type(self).forward  # the class's (no closure: the fp16 wrapper works on a deep copy)
        if len(rest) == 2:  # (guidance, pooled): FLUX.1 dev
            return orig(self, self._t32, self._g32, rest[1])
        return orig(self, self._t32, rest[0])

    embed.forward = types.MethodType(forward, embed)


class FluxTransformerWrapper(nn.Module):
    """transformer(x [N,16,H,W], timestep [N] = sigma, context [N,T,D], y [N,P][, guidance [N]]) ->
    velocity [N,16,H,W]."""

    def __init__(self, transformer, dtype=torch.float32):
        super().__init__()
        self.transformer = transformer
        self.dtype = dtype
        self.has_guidance = bool(transformer.config.guidance_embeds)
        _flux_rope_fp32(transformer.pos_embed)
        decompose_rms_norms(transformer)
        _fp32_time_embedding(transformer.time_text_embed)
        for m in transformer.modules():
            if hasattr(m, "set_processor") and type(m).__name__ == "FluxAttention":
                m.set_processor(FluxExportAttnProcessor())

    def forward(self, x, timestep, context, y, guidance=None):
        b, c, h, w = x.shape
        hp, wp = h // 2, w // 2
        img = x.reshape(b, c, hp, 2, wp, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, hp * wp, c * 4)
        rows = torch.arange(hp, dtype=torch.float32).unsqueeze(1).expand(hp, wp)
        cols = torch.arange(wp, dtype=torch.float32).unsqueeze(0).expand(hp, wp)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(hp * wp, 3)
        txt_ids = torch.zeros(context.shape[1], 3, dtype=torch.float32)
        kw = {"guidance": guidance} if self.has_guidance else {}
        embed = self.transformer.time_text_embed
        embed._t32 = timestep.float() * 1000.0
        embed._g32 = guidance.float() * 1000.0 if self.has_guidance else None
        out = self.transformer(hidden_states=img.to(self.dtype), encoder_hidden_states=context.to(self.dtype),
                               pooled_projections=y.to(self.dtype), timestep=timestep, img_ids=img_ids,
                               txt_ids=txt_ids, return_dict=False, **kw)[0]
        out = out.float().reshape(b, hp, wp, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        return out


class T5Wrapper(nn.Module):
    """input_ids [B,T] -> last_hidden_state [B,T,D] (no attention mask: ComfyUI's default
    ``t5_attention_mask=False`` and diffusers' pipelines both attend over the padding)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, return_dict=True).last_hidden_state.float()
