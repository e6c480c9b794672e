"""ControlNet / T2I-Adapter sources: layout detection, loading, family detection, and test-file writers.

Layouts recognised (the key tests follow ComfyUI 0.3.64 ``comfy/controlnet.py`` ``load_controlnet_state_dict``
and ``load_t2i_adapter``):

* a diffusers folder whose ``config.json`` ``_class_name`` is ``ControlNetModel`` or ``T2IAdapter``;
* ``ldm``: the original ControlNet (``cldm``) single file, e.g. ``control_v11p_sd15_canny.safetensors``:
  ``input_blocks.*``, ``middle_block.*``, ``zero_convs.N.0.*``, ``middle_block_out.0.*``,
  ``input_hint_block.*``, optionally all under ``control_model.``;
* ``diffusers_file``: a ControlNet single file in diffusers keys (most SDXL ControlNets):
  ``controlnet_cond_embedding.conv_in.weight`` ...;
* T2I-Adapter single files: diffusers keys (``adapter.body.0.resnets.0.block1.weight`` ...) or the original
  TencentARC keys ComfyUI loads (``conv_in.weight``, ``body.N.block1.weight``, ``body.N.in_conv.weight``).

The single files carry no config: the structure is read from the tensor shapes. What the weights cannot show --
the attention head count -- follows the family's convention (SD1.x: 8 heads; SD2.x / SDXL: 64 channels per
head, as ComfyUI's ``model_detection``) unless ``config`` names a diffusers folder / config.json describing it
(a ControlNet folder, or a checkpoint folder whose ``unet/config.json`` is used).
"""
from __future__ import annotations

import json
import os
import re

from .errors import ExportError
from .tiny import TINY_DIMS

CONTROLNET, T2I_ADAPTER = "controlnet", "t2i_adapter"
LDM_PREFIX = "control_model."
#: cross-attention width -> UNet family; the real models, then the tiny test fixtures (:mod:`.tiny`).
CONTEXT_FAMILY = {768: "sd15", 1024: "sd2", 2048: "sdxl",
                  TINY_DIMS["sd15"]["context_dim"]: "sd15", TINY_DIMS["sd2-v"]["context_dim"]: "sd2",
                  TINY_DIMS["sdxl"]["context_dim"]: "sdxl"}


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _layout_of_keys(keys) -> tuple[str, str] | None:
    keys = set(keys)
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return CONTROLNET, "diffusers_file"
    if LDM_PREFIX + "zero_convs.0.0.weight" in keys or "zero_convs.0.0.weight" in keys:
        return CONTROLNET, "ldm"
    if "adapter.body.0.resnets.0.block1.weight" in keys:
        return T2I_ADAPTER, "diffusers_file"
    if "conv_in.weight" in keys and "body.0.block1.weight" in keys:
        return T2I_ADAPTER, "original"
    if "body.0.in_conv.weight" in keys:
        raise ExportError("T2I-Adapter layout: received a 'light' adapter (body.0.in_conv), expected a full "
                          "adapter (conv_in + body.N.block1): light adapters are not supported")
    if "lora_controlnet" in keys:
        raise ExportError("ControlNet layout: received a Control-LoRA, expected a full ControlNet or T2I-Adapter")
    return None


def control_layout(path: str) -> tuple[str, str] | None:
    """(kind, layout) when ``path`` is a ControlNet / T2I-Adapter, else None (another kind of checkpoint)."""
    if os.path.isdir(path):
        cfg = os.path.join(path, "config.json")
        if os.path.isfile(cfg) and not os.path.isfile(os.path.join(path, "model_index.json")):
            cls = _read_json(cfg).get("_class_name")
            if cls == "ControlNetModel":
                return CONTROLNET, "diffusers"
            if cls == "T2IAdapter":
                return T2I_ADAPTER, "diffusers"
        return None
    if os.path.isfile(path) and path.endswith(".safetensors"):
        from .single_file import read_safetensors_header
        return _layout_of_keys(read_safetensors_header(path))
    return None


# ------------------------------------------------------------------------------------------ ControlNet

def _ldm_to_diffusers(sd: dict) -> dict:
    """cldm keys -> diffusers keys with diffusers' own converter (plus the SDXL ``label_emb``, which it skips)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    if "difference" in sd:
        raise ExportError("ControlNet weights: received a 'difference' ControlNet (weights relative to a base "
                          "model, ComfyUI's DiffControlNetLoader), expected full ControlNet weights")
    if any(k.startswith(LDM_PREFIX) for k in sd):  # a whole cldm checkpoint keeps the UNet/VAE/CLIP beside it
        sd = {k[len(LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(LDM_PREFIX)}
    idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")})
    ops = [i for i in idx if f"input_blocks.{i}.0.op.weight" in sd]
    layers = (ops[0] - 1) if ops else (len(idx) - 1)
    out = convert_controlnet_checkpoint(sd, {"layers_per_block": layers})
    for a, b in (("linear_1", "0"), ("linear_2", "2")):
        for p in ("weight", "bias"):
            if f"label_emb.0.{b}.{p}" in sd:
                out[f"add_embedding.{a}.{p}"] = sd[f"label_emb.0.{b}.{p}"]
    return {k: v for k, v in out.items() if v is not None}


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def infer_controlnet_config(sd: dict) -> dict:
    """A diffusers ``ControlNetModel`` config from diffusers-keyed weights (heads not included)."""
    keys = list(sd)
    n = _count(keys, r"down_blocks\.(\d+)\.")
    if not n or "conv_in.weight" not in sd:
        raise ExportError(f"ControlNet weights: received keys such as {sorted(keys)[:3]}, expected diffusers "
                          f"ControlNet keys (conv_in, down_blocks.N, controlnet_down_blocks.N)")
    chans, types, tlayers = [], [], []
    layers = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    for i in range(n):
        chans.append(int(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]))
        attn = any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys)
        types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        tlayers.append(_count(keys, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") or 1)
    to_k = next((sd[k] for k in keys if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((sd[k] for k in keys if k.endswith("attentions.0.proj_in.weight")), None)
    nb = _count(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    cond_out = [int(sd["controlnet_cond_embedding.conv_in.weight"].shape[0])]
    cond_out += [int(sd[f"controlnet_cond_embedding.blocks.{j}.weight"].shape[0]) for j in range(1, nb, 2)]
    cfg = {"in_channels": int(sd["conv_in.weight"].shape[1]), "block_out_channels": chans,
           "down_block_types": types, "layers_per_block": layers,
           "transformer_layers_per_block": tlayers if len(set(tlayers)) > 1 else tlayers[0],
           "cross_attention_dim": int(to_k.shape[1]) if to_k is not None else 1280,
           "use_linear_projection": bool(proj_in is not None and proj_in.ndim == 2),
           "conditioning_embedding_out_channels": cond_out,
           "conditioning_channels": int(sd["controlnet_cond_embedding.conv_in.weight"].shape[1]),
           "mid_block_type": "UNetMidBlock2DCrossAttn" if any(k.startswith("mid_block.attentions.") for k in keys)
           else "UNetMidBlock2D",
           "norm_num_groups": 32}
    if "add_embedding.linear_1.weight" in sd:
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=int(sd["add_embedding.linear_1.weight"].shape[1]))
    return cfg


def _heads(cfg: dict, family: str) -> dict:
    """SD1.x: 8 heads everywhere; SD2.x / SDXL: 64 channels per head (ComfyUI ``model_detection``)."""
    if family == "sd15":
        return {"attention_head_dim": 8}
    return {"attention_head_dim": [max(1, c // 64) for c in cfg["block_out_channels"]]}


def _config_override(config: str | None, kind: str) -> dict | None:
    """The config a ``--config`` folder / file gives: a ControlNet / T2I-Adapter config.json, or a checkpoint
    folder's unet/config.json (ControlNets mirror their UNet)."""
    if not config:
        return None
    for cand in (config, os.path.join(config, "config.json"), os.path.join(config, "unet", "config.json")):
        if os.path.isfile(cand):
            return _read_json(cand)
    raise ExportError(f"--config: received {config}, expected a config.json, a diffusers {kind} folder or a "
                      f"checkpoint folder with unet/config.json")


def family_of_controlnet(cfg: dict, family: str | None) -> str:
    """The UNet family a ControlNet config fits; ``family`` (``--family``) must agree with it."""
    ctx = cfg.get("cross_attention_dim")
    xl = cfg.get("addition_embed_type") == "text_time"
    detected = CONTEXT_FAMILY.get(int(ctx)) if isinstance(ctx, int) else None
    if detected is not None and (detected == "sdxl") != xl:
        detected = None
    wanted = None if family in (None, "auto") else ("sd2" if family.startswith("sd2") else family)
    if wanted is not None and wanted not in ("sd15", "sd2", "sdxl"):
        raise ExportError(f"--family: received {family!r}, expected sd15, sd2 or sdxl for a ControlNet")
    if detected is None and wanted is None:
        raise ExportError(f"ControlNet family: received cross_attention_dim={ctx}, addition_embed_type="
                          f"{cfg.get('addition_embed_type')!r}, expected 768 (sd15), 1024 (sd2) or 2048 with "
                          f"'text_time' (sdxl); pass --family if it fits another UNet of one of these families")
    if wanted is not None and detected is not None and wanted != detected:
        raise ExportError(f"--family: received {family}, expected {detected}: the ControlNet (cross_attention_dim "
                          f"{ctx}) fits {detected} UNets")
    if wanted is not None and (wanted == "sdxl") != xl:
        raise ExportError(f"--family: received {family}, expected {'sdxl' if xl else 'sd15 or sd2'}: the "
                          f"ControlNet {'has' if xl else 'has no'} SDXL 'text_time' (y) embedding")
    return detected or wanted


def load_controlnet(path: str, layout: str, config: str | None, family: str | None):
    """(ControlNetModel fp32 eval, family, weight files)."""
    import torch
    from diffusers import ControlNetModel

    if layout == "diffusers":
        cn = ControlNetModel.from_pretrained(path, local_files_only=True)
        files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith((".safetensors", ".bin"))]
        return cn.to(torch.float32).eval(), family_of_controlnet(dict(cn.config), family), files
    from safetensors.torch import load_file

    sd = load_file(path)
    if layout == "ldm":
        sd = _ldm_to_diffusers(sd)
    cfg = infer_controlnet_config(sd)
    given = _config_override(config, "ControlNet")
    if given is not None:  # structure from the weights, the rest (heads, norms...) from the given config
        structural = set(cfg) - {"addition_time_embed_dim", "norm_num_groups"}
        cfg.update({k: v for k, v in given.items() if not k.startswith("_") and k not in structural})
    fam = family_of_controlnet(cfg, family)
    if given is None:
        cfg.update(_heads(cfg, fam))
    cn = ControlNetModel.from_config(cfg)
    missing, unexpected = cn.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise ExportError(f"ControlNet weights in {path}: received a {layout} file that leaves {len(missing)} "
                          f"parameters unset (e.g. {missing[:3]}) and {len(unexpected)} unused (e.g. "
                          f"{unexpected[:3]}), expected every weight to fit the inferred structure")
    return cn.eval(), fam, [path]


# ------------------------------------------------------------------------------------------ T2I-Adapter

def _original_to_diffusers_adapter(sd: dict) -> dict:
    """TencentARC / ComfyUI keys -> diffusers (the inverse of ComfyUI ``load_t2i_adapter``'s replacement,
    two resnet blocks per level as ComfyUI's ``Adapter(nums_rb=2)``)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"body\.(\d+)\.(.*)", k)
        if not m:
            out["adapter." + k] = v
            continue
        idx, rest = int(m.group(1)), m.group(2)
        if rest.startswith("down_opt."):
            raise ExportError("T2I-Adapter weights: received a convolutional down-sampler (body.N.down_opt), "
                              "expected average-pool down-sampling (the diffusers T2IAdapter has no other)")
        level, j = divmod(idx, 2)
        out[f"adapter.body.{level}.in_conv.{rest[8:]}" if rest.startswith("in_conv.")
            else f"adapter.body.{level}.resnets.{j}.{rest}"] = v
    return out


def infer_adapter_config(sd: dict) -> dict:
    cin = int(sd["adapter.conv_in.weight"].shape[1])
    if cin % 256 == 0 and cin // 256 in (1, 3):  # ComfyUI: cin 256 / 768 -> the SDXL adapter (unshuffle 16)
        kind, ds = "full_adapter_xl", 16
    elif cin % 64 == 0 and cin // 64 in (1, 3):
        kind, ds = "full_adapter", 8
    else:
        raise ExportError(f"T2I-Adapter conv_in: received {cin} input channels, expected 64/192 (SD1.x, unshuffle 8)"
                          f" or 256/768 (SDXL, unshuffle 16)")
    keys = list(sd)
    n = _count(keys, r"adapter\.body\.(\d+)\.")
    chans = [int(sd[f"adapter.body.{i}.resnets.0.block2.weight"].shape[0]) for i in range(n)]
    return {"in_channels": cin // ds ** 2, "channels": chans, "downscale_factor": ds, "adapter_type": kind,
            "num_res_blocks": _count(keys, r"adapter\.body\.0\.resnets\.(\d+)\.")}


def load_t2i_adapter(path: str, layout: str, family: str | None):
    """(T2IAdapter fp32 eval, family, weight files). Family: SDXL for the unshuffle-16 adapter, else SD1.x."""
    import torch
    from diffusers import T2IAdapter

    if layout == "diffusers":
        ad = T2IAdapter.from_pretrained(path, local_files_only=True)
        files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith((".safetensors", ".bin"))]
    else:
        from safetensors.torch import load_file
        sd = load_file(path)
        if layout == "original":
            sd = _original_to_diffusers_adapter(sd)
        ad = T2IAdapter.from_config(infer_adapter_config(sd))
        missing, unexpected = ad.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
        if missing or unexpected:
            raise ExportError(f"T2I-Adapter weights in {path}: received a {layout} file that leaves {len(missing)} "
                              f"parameters unset (e.g. {missing[:3]}) and {len(unexpected)} unused (e.g. "
                              f"{unexpected[:3]}), expected every weight to fit the inferred structure")
        files = [path]
    detected = "sdxl" if ad.config.adapter_type == "full_adapter_xl" else "sd15"
    if family not in (None, "auto") and ("sd15" if family.startswith("sd2") else family) != detected:
        raise ExportError(f"--family: received {family}, expected {detected}: the T2I-Adapter "
                          f"({ad.config.adapter_type}) fits {detected} UNets")
    return ad.to(torch.float32).eval(), detected, files


# ------------------------------------------------------------------------------- writers (test fixtures)

def _cn_to_ldm(sd: dict, config: dict) -> dict:
    """diffusers ControlNet keys -> cldm keys (the inverse of diffusers' ``convert_controlnet_checkpoint``)."""
    from .ldm_writer import unet_to_ldm

    shared = {k: v for k, v in sd.items() if not k.startswith("controlnet_")}
    out = {k.removeprefix("model.diffusion_model."): v for k, v in unet_to_ldm(shared, config).items()}
    nb = _count(sd, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "controlnet_down_blocks":
            out[f"zero_convs.{p[1]}.0.{p[2]}"] = v
        elif p[0] == "controlnet_mid_block":
            out[f"middle_block_out.0.{p[1]}"] = v
        elif p[0] == "controlnet_cond_embedding":
            idx = {"conv_in": 0, "conv_out": 2 * (nb + 1)}.get(p[1])
            idx = 2 * (int(p[2]) + 1) if idx is None else idx
            out[f"input_hint_block.{idx}.{p[-1]}"] = v
    return out


def write_control_file(diffusers_dir: str | os.PathLike, out_file: str | os.PathLike, layout: str) -> str:
    """Write the diffusers ControlNet / T2I-Adapter folder ``diffusers_dir`` as one .safetensors file in
    ``layout``: ControlNet ``ldm`` (cldm keys), ``ldm_prefixed`` (under ``control_model.``), ``diffusers_file``;
    T2I-Adapter ``diffusers_file`` or ``original`` (TencentARC keys)."""
    from safetensors.torch import load_file, save_file

    diffusers_dir = str(diffusers_dir)
    cfg = _read_json(os.path.join(diffusers_dir, "config.json"))
    sd = load_file(os.path.join(diffusers_dir, "diffusion_pytorch_model.safetensors"))
    if cfg["_class_name"] == "ControlNetModel" and layout in ("ldm", "ldm_prefixed"):
        sd = _cn_to_ldm(sd, cfg)
        if layout == "ldm_prefixed":
            sd = {LDM_PREFIX + k: v for k, v in sd.items()}
    elif cfg["_class_name"] == "T2IAdapter" and layout == "original":
        conv = {}
        for k, v in sd.items():
            m = re.match(r"adapter\.body\.(\d+)\.(resnets\.(\d+)\.|in_conv\.)(.*)", k)
            if m is None:
                conv[k.removeprefix("adapter.")] = v
            elif m.group(3) is None:
                conv[f"body.{2 * int(m.group(1))}.in_conv.{m.group(4)}"] = v
            else:
                conv[f"body.{2 * int(m.group(1)) + int(m.group(3))}.{m.group(4)}"] = v
        sd = conv
    elif layout != "diffusers_file":
        raise ValueError(f"layout: received {layout!r}, expected ldm, ldm_prefixed or diffusers_file (ControlNet), "
                         f"diffusers_file or original (T2I-Adapter)")
    tmp = f"{out_file}.tmp-{os.getpid()}"
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp)
    os.replace(tmp, out_file)
    return str(out_file)
