"""diffusers -> original (LDM / Stability) single-file key layout, for building test checkpoints.

diffusers 0.42 only ships the LDM -> diffusers direction; this is the inverse of
``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` /
``convert_ldm_clip_checkpoint`` / ``convert_open_clip_checkpoint`` for the UNet2DConditionModel,
AutoencoderKL and CLIP text models of SD1.x / SD2.x / SDXL (tests check the round trip is exact).
"""
from __future__ import annotations

import os

_RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unexpected(model: str, key: str, expected: str) -> ValueError:
    return ValueError(f"{model} state dict key: received {key!r}, expected {expected}")


def _sub(rest: str, mapping: dict) -> str:
    head, _, tail = rest.partition(".")
    return f"{mapping.get(head, head)}.{tail}" if tail else mapping.get(head, head)


def unet_to_ldm(sd: dict, config) -> dict:
    L = int(config["layers_per_block"])
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if k.startswith("time_embedding."):
            nk = "time_embed." + {"linear_1": "0", "linear_2": "2"}[p[1]] + "." + p[2]
        elif k.startswith("add_embedding."):
            nk = "label_emb.0." + {"linear_1": "0", "linear_2": "2"}[p[1]] + "." + p[2]
        elif k.startswith("conv_in."):
            nk = "input_blocks.0.0." + p[1]
        elif k.startswith("conv_norm_out."):
            nk = "out.0." + p[1]
        elif k.startswith("conv_out."):
            nk = "out.2." + p[1]
        elif k.startswith("down_blocks."):
            i, kind = int(p[1]), p[2]
            if kind == "resnets":
                nk = f"input_blocks.{1 + i * (L + 1) + int(p[3])}.0." + _sub(".".join(p[4:]), _RESNET_UNET)
            elif kind == "attentions":
                nk = f"input_blocks.{1 + i * (L + 1) + int(p[3])}.1." + ".".join(p[4:])
            elif kind == "downsamplers":
                nk = f"input_blocks.{(i + 1) * (L + 1)}.0.op." + ".".join(p[5:])
            else:
                raise _unexpected("UNet", k, "down_blocks.N.{resnets,attentions,downsamplers}.*")
        elif k.startswith("mid_block."):
            kind, j = p[1], int(p[2])
            if kind == "resnets":
                nk = f"middle_block.{2 * j}." + _sub(".".join(p[3:]), _RESNET_UNET)
            else:
                nk = "middle_block.1." + ".".join(p[3:])
        elif k.startswith("up_blocks."):
            i, kind = int(p[1]), p[2]
            if kind == "resnets":
                nk = f"output_blocks.{i * (L + 1) + int(p[3])}.0." + _sub(".".join(p[4:]), _RESNET_UNET)
            elif kind == "attentions":
                nk = f"output_blocks.{i * (L + 1) + int(p[3])}.1." + ".".join(p[4:])
            elif kind == "upsamplers":
                has_attn = any(x.startswith(f"up_blocks.{i}.attentions.") for x in sd)
                nk = f"output_blocks.{i * (L + 1) + L}.{2 if has_attn else 1}.conv." + ".".join(p[5:])
            else:
                raise _unexpected("UNet", k, "up_blocks.N.{resnets,attentions,upsamplers}.*")
        else:
            raise _unexpected("UNet", k, "a diffusers UNet2DConditionModel parameter")
        out["model.diffusion_model." + nk] = v
    return out


_RESNET_VAE = {"conv_shortcut": "nin_shortcut"}
_ATTN_VAE = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_to_ldm(sd: dict, config) -> dict:
    n = len(config["block_out_channels"])
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        side = p[0]
        if side in ("quant_conv", "post_quant_conv"):
            nk = k
        elif p[1] in ("conv_in", "conv_out"):
            nk = k
        elif p[1] == "conv_norm_out":
            nk = f"{side}.norm_out.{p[2]}"
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                nk = f"{side}.mid.block_{int(p[3]) + 1}." + _sub(".".join(p[4:]), _RESNET_VAE)
            else:  # attentions.0.<name>[.0].param ; linear -> 1x1 conv
                name = p[4]
                nk = f"{side}.mid.attn_1.{_ATTN_VAE[name]}.{p[-1]}"
                if name != "group_norm" and p[-1] == "weight" and v.ndim == 2:
                    v = v[:, :, None, None]
        elif p[1] == "down_blocks":
            i = int(p[2])
            if p[3] == "resnets":
                nk = f"{side}.down.{i}.block.{p[4]}." + _sub(".".join(p[5:]), _RESNET_VAE)
            else:
                nk = f"{side}.down.{i}.downsample.conv.{p[-1]}"
        elif p[1] == "up_blocks":
            i = n - 1 - int(p[2])
            if p[3] == "resnets":
                nk = f"{side}.up.{i}.block.{p[4]}." + _sub(".".join(p[5:]), _RESNET_VAE)
            else:
                nk = f"{side}.up.{i}.upsample.conv.{p[-1]}"
        else:
            raise _unexpected("VAE", k, "a diffusers AutoencoderKL parameter")
        out["first_stage_model." + nk] = v
    return out


def clip_to_ldm(sd: dict, prefix: str) -> dict:
    """HF CLIPTextModel (OpenAI CLIP-L layout kept by LDM) -> ``prefix`` + text_model.*"""
    out = {}
    for k, v in sd.items():
        if k.startswith("text_projection"):
            continue
        k = k if k.startswith("text_model.") else "text_model." + k
        out[prefix + k] = v
    return out


def open_clip_to_ldm(sd: dict, prefix: str, hidden: int) -> dict:
    """HF CLIPTextModel[WithProjection] -> OpenCLIP layout (``prefix`` + transformer.resblocks.* etc.)."""
    import torch
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out, qkv = {}, {}
    for k, v in sd.items():
        if k == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out[prefix + "ln_final." + k.split(".")[-1]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
        elif k.startswith("encoder.layers."):
            p = k.split(".")
            layer, rest = p[2], ".".join(p[3:])
            base = f"{prefix}transformer.resblocks.{layer}."
            if rest.startswith("self_attn.") and p[4] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault((base, p[-1]), {})[p[4]] = v
                continue
            rest = (rest.replace("self_attn.", "attn.").replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                    .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
            out[base + rest] = v
        elif k.endswith("position_ids"):
            continue
        else:
            raise _unexpected("CLIP", k, "a transformers CLIPTextModel parameter")
    for (base, kind), d in qkv.items():
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([d["q_proj"], d["k_proj"], d["v_proj"]], 0)
    if prefix + "text_projection" not in out:  # SD2 checkpoints carry one even though diffusers drops it
        out[prefix + "text_projection"] = torch.eye(hidden)
    return out


def write_single_file_checkpoint(diffusers_dir, out_file, v_pred_marker: bool = False) -> str:
    """Write the diffusers folder ``diffusers_dir`` as one LDM-layout .safetensors file."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    def comp(name):
        d = os.path.join(diffusers_dir, name)
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        sd = {}
        for fn in sorted(os.listdir(d)):
            if fn.endswith(".safetensors"):
                sd.update(load_file(os.path.join(d, fn)))
        return sd, cfg
    with open(os.path.join(diffusers_dir, "model_index.json")) as f:
        mi = json.load(f)
    out = {}
    sd, cfg = comp("unet")
    out.update(unet_to_ldm(sd, cfg))
    sdxl = cfg.get("addition_embed_type") == "text_time"
    sd, cfg = comp("vae")
    out.update(vae_to_ldm(sd, cfg))
    has_te1 = bool(mi.get("text_encoder") and mi["text_encoder"][0])
    if sdxl:
        if has_te1:
            sd, cfg = comp("text_encoder")
            out.update(clip_to_ldm(sd, "conditioner.embedders.0.transformer."))
            sd, cfg = comp("text_encoder_2")
            out.update(open_clip_to_ldm(sd, "conditioner.embedders.1.model.", cfg["hidden_size"]))
        else:
            sd, cfg = comp("text_encoder_2")
            out.update(open_clip_to_ldm(sd, "conditioner.embedders.0.model.", cfg["hidden_size"]))
    else:
        sd, cfg = comp("text_encoder")
        if cfg.get("hidden_act") == "gelu":  # OpenCLIP (SD2)
            out.update(open_clip_to_ldm(sd, "cond_stage_model.model.", cfg["hidden_size"]))
        else:
            out.update(clip_to_ldm(sd, "cond_stage_model.transformer."))
    if v_pred_marker:
        out["v_pred"] = torch.tensor([])
    out = {k: v.contiguous() for k, v in out.items()}
    save_file(out, str(out_file))
    return str(out_file)
