"""Torch wrappers that give each exported graph ComfyUI-shaped inputs/outputs (float32 I/O)."""
from __future__ import annotations

import types

import torch
from torch import nn


def _aug_embed_from_y(self, emb, encoder_hidden_states, added_cond_kwargs):
    # ComfyUI's y = cat(pooled, timestep_embedding(time ids)) is exactly diffusers' `add_embeds`
    # (get_aug_embed "text_time": cat(text_embeds, add_time_proj(time_ids))), so feed it straight
    # into the add_embedding MLP and skip diffusers' own time-id embedding.
    return self.add_embedding(added_cond_kwargs["y"].to(emb.dtype))


def use_classic_attention(module: nn.Module, upcast: bool) -> None:
    """Plain matmul-softmax-matmul attention (exports to primitive ONNX ops); optional fp32 scores/softmax."""
    from diffusers.models.attention_processor import Attention, AttnProcessor
    for m in module.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor())
            if upcast:
                m.upcast_attention = True
                m.upcast_softmax = True


class UNetWrapper(nn.Module):
    """unet(sample, timestep, encoder_hidden_states[, y]) -> out, float32 in and out."""

    def __init__(self, unet, dtype=torch.float32):
        super().__init__()
        self.unet = unet
        self.dtype = dtype
        self.has_y = unet.config.get("addition_embed_type") == "text_time"
        if self.has_y:
            unet.get_aug_embed = types.MethodType(_aug_embed_from_y, unet)

    def forward(self, sample, timestep, encoder_hidden_states, y=None):
        kw = {"added_cond_kwargs": {"y": y.to(self.dtype)}} if self.has_y else {}
        out = self.unet(sample.to(self.dtype), timestep, encoder_hidden_states.to(self.dtype),
                        return_dict=False, **kw)[0]
        return out.float()


class ClipWrapper(nn.Module):
    """input_ids [B,77] -> last_hidden_state, penultimate_hidden_state, penultimate_hidden_state_norm,
    pooled_output, hidden_states [B,L,77,D] (every layer's raw output), hidden_states_norm (each after the
    final layer norm) -- the last two serve any CLIPSetLastLayer value exactly."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.projected = hasattr(model, "text_projection")
        text = getattr(model, "text_model", model)
        self.final_layer_norm = text.final_layer_norm

    def forward(self, input_ids):
        o = self.model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        penult = o.hidden_states[-2]
        pooled = o.text_embeds if self.projected else o.pooler_output
        layers = torch.stack(o.hidden_states[1:], dim=1)  # hidden_states[0] is the embedding output
        return (o.last_hidden_state.float(), penult.float(), self.final_layer_norm(penult).float(), pooled.float(),
                layers.float(), self.final_layer_norm(layers).float())


class VaeDecoderWrapper(nn.Module):
    """latent [B,C,h,w] (unscaled, i.e. already divided by latent_scale) -> image [B,3,8h,8w] in [-1,1]."""

    def __init__(self, vae, dtype=torch.float32):
        super().__init__()
        self.vae = vae
        self.dtype = dtype

    def forward(self, latent):
        return self.vae.decode(latent.to(self.dtype), return_dict=False)[0].float()


class VaeEncoderWrapper(nn.Module):
    """image [B,3,H,W] in [-1,1] -> latent distribution mean [B,C,H/8,W/8] (unscaled)."""

    def __init__(self, vae, dtype=torch.float32):
        super().__init__()
        self.vae = vae
        self.dtype = dtype

    def forward(self, image):
        h = self.vae.encoder(image.to(self.dtype))
        if self.vae.quant_conv is not None:
            h = self.vae.quant_conv(h)
        mean, _ = torch.chunk(h, 2, dim=1)
        return mean.float()


def control_residual_layout(unet_config) -> dict:
    """Where a ControlNet's residuals and a T2I-Adapter's features enter the UNet, as (channels, downscale vs
    the latent) lists: ``down`` = diffusers ``down_block_res_samples`` (conv_in, each resnet / attention
    layer, each downsampler), ``mid`` = after the mid block, ``adapter`` = one per down block (diffusers
    ``down_intrablock_additional_residuals``: inside a cross-attention block before its downsampler, after a
    plain block including its downsampler), ``adapter_mid`` = after the mid block (a 4th SDXL adapter feature)."""
    chans = list(unet_config["block_out_channels"])
    types = list(unet_config["down_block_types"])
    n, L = len(chans), int(unet_config["layers_per_block"])
    down = [(chans[0], 1)]
    adapter = []
    for i, (c, t) in enumerate(zip(chans, types)):
        down += [(c, 2 ** i)] * L
        last = i == n - 1
        if not last:
            down.append((c, 2 ** (i + 1)))
        adapter.append((c, 2 ** i if ("CrossAttn" in t or last) else 2 ** (i + 1)))
    mid = (chans[-1], 2 ** (n - 1))
    return {"down": down, "mid": mid, "adapter": adapter, "adapter_mid": mid}


class UNetControlWrapper(UNetWrapper):
    """unet(sample, timestep, encoder_hidden_states[, y], down_0..down_{N-1}, mid, adapter_0..adapter_{K-1},
    adapter_mid) -> out: the UNet with ControlNet residuals added as diffusers' ``down_block_additional_residuals``
    / ``mid_block_additional_residual`` and T2I-Adapter features as ``down_intrablock_additional_residuals`` (the
    last one after the mid block). All zeros gives exactly the plain UNet. Same parameter names as
    :class:`UNetWrapper` (``unet.*``), so LoRA maps onto both graphs alike."""

    def __init__(self, unet, dtype=torch.float32):
        super().__init__(unet, dtype)
        layout = control_residual_layout(unet.config)
        self.n_down, self.n_adapter = len(layout["down"]), len(layout["adapter"])

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        if self.has_y:
            y, extra = extra[0], extra[1:]
            kw = {"added_cond_kwargs": {"y": y.to(self.dtype)}}
        else:
            kw = {}
        d = self.dtype
        down = [r.to(d) for r in extra[:self.n_down]]
        mid = extra[self.n_down].to(d)
        adapter = [a.to(d) for a in extra[self.n_down + 1:self.n_down + 2 + self.n_adapter]]
        out = self.unet(sample.to(d), timestep, encoder_hidden_states.to(d), return_dict=False,
                        down_block_additional_residuals=down, mid_block_additional_residual=mid,
                        down_intrablock_additional_residuals=adapter, **kw)[0]
        return out.float()
