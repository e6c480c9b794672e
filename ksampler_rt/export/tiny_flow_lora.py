"""Deterministic tiny LoRAs for the tiny SD3.5 / FLUX.1 models (:mod:`.tiny_flow`), in three key layouts.

One LoRA (rank 4 on every Linear of the transformer -- and SD3's patch-embedding conv -- and on the q/k/v/out
projections and MLPs of CLIP-L / CLIP-G) written as:

* ``diffusers``: diffusers / PEFT keys (``transformer.<module>.lora_A.weight`` / ``lora_B``, ``text_encoder.``,
  ``text_encoder_2.``), no alpha (scale 1) -- what ``load_lora_weights`` reads;
* ``kohya``: sd-scripts keys on Black Forest Labs' / Stability's modules (``lora_unet_double_blocks_0_img_attn_qkv``,
  ``lora_unet_single_blocks_0_linear1``, ``lora_unet_joint_blocks_0_x_block_attn_qkv``; ``lora_te1_`` CLIP-L,
  ``lora_te2_`` CLIP-G) with ``lora_down`` / ``lora_up`` / ``alpha``;
* ``comfyui``: ComfyUI's own keys (``diffusion_model.<BFL / MMDiT module>``, FLUX's second single block as
  ``linear1_qkv`` plus the diffusers key of its ``proj_mlp``; ``text_encoders.clip_l.transformer.…``).

The BFL / MMDiT layers are fused: ``img_attn.qkv`` = to_q | to_k | to_v on the output rows, a single block's
``linear1`` = to_q | to_k | to_v | proj_mlp. The separate layers' LoRAs (A_i, B_i) are written for a fused layer as
down = the A_i stacked, up = the B_i block-diagonal, so up @ down is exactly the B_i @ A_i stacked: every layout
holds the same low-rank update. The final layer's adaLN rows (and SD3's last, context-only block's) are written in
BFL's (shift, scale) order, diffusers' being (scale, shift). kohya / ComfyUI files carry alpha = rank / 2 with up
doubled (the same product, exactly). The maps are ComfyUI 0.3.64 comfy/utils.py ``flux_to_diffusers`` /
``mmdit_to_diffusers`` read from the diffusers side. Same family + seed + layout -> byte-identical file.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

TINY_FLOW_LORA_LAYOUTS = ("diffusers", "kohya", "comfyui")
TINY_FLOW_LORA_RANK = 4

# diffusers module inside a block -> (BFL / MMDiT module, its row block in the fused layer)
_FLUX_DOUBLE = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
                "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
                "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_out.0": ("img_attn.proj", 0),
                "attn.to_add_out": ("txt_attn.proj", 0), "norm1.linear": ("img_mod.lin", 0),
                "norm1_context.linear": ("txt_mod.lin", 0), "ff.net.0.proj": ("img_mlp.0", 0),
                "ff.net.2": ("img_mlp.2", 0), "ff_context.net.0.proj": ("txt_mlp.0", 0),
                "ff_context.net.2": ("txt_mlp.2", 0)}
_FLUX_SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
                "proj_mlp": ("linear1", 3), "proj_out": ("linear2", 0), "norm.linear": ("modulation.lin", 0)}
_FLUX_BASIC = {"x_embedder": "img_in", "context_embedder": "txt_in",
               "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
               "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
               "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
               "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
               "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
               "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
_MMDIT_BLOCK = {"attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1),
                "attn.to_v": ("x_block.attn.qkv", 2), "attn.add_q_proj": ("context_block.attn.qkv", 0),
                "attn.add_k_proj": ("context_block.attn.qkv", 1), "attn.add_v_proj": ("context_block.attn.qkv", 2),
                "attn.to_out.0": ("x_block.attn.proj", 0), "attn.to_add_out": ("context_block.attn.proj", 0),
                "norm1.linear": ("x_block.adaLN_modulation.1", 0),
                "norm1_context.linear": ("context_block.adaLN_modulation.1", 0),
                "ff.net.0.proj": ("x_block.mlp.fc1", 0), "ff.net.2": ("x_block.mlp.fc2", 0),
                "ff_context.net.0.proj": ("context_block.mlp.fc1", 0),
                "ff_context.net.2": ("context_block.mlp.fc2", 0)}
_MMDIT_BASIC = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
                "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
                "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
                "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
                "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
                "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
_CLIP_LAYERS = re.compile(r"(q|k|v|out)_proj$|fc1$|fc2$")
_DIFFUSERS_PREFIX = {"transformer": "transformer", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}


def _layer_shapes(family: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """{component: {module: weight shape}} of the tiny models' LoRA layers (built on the meta device: shapes only)."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .tiny_flow import _clip, _transformer

    ids = {"vocab_size": 1000, "bos": 0, "eos": 1, "bang": 2}  # the embeddings get no LoRA
    with torch.device("meta"):
        # as build_flow_into: SD3's CLIP-L has a (identity) projection, FLUX's none; the module names differ
        clip_l = (CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel)(_clip("l", ids))
        comps = {"transformer": _transformer(family), "clip_l": clip_l}
        if family == "sd3":
            comps["clip_g"] = CLIPTextModelWithProjection(_clip("g", ids))
    out = {}
    for comp, module in comps.items():
        kinds = (torch.nn.Linear, torch.nn.Conv2d) if comp == "transformer" else (torch.nn.Linear,)
        out[comp] = {n: tuple(m.weight.shape) for n, m in module.named_modules()
                     if isinstance(m, kinds) and (comp == "transformer" or _CLIP_LAYERS.search(n))}
    return out


def tiny_flow_lora_pairs(family: str, seed: int = 0) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{component: {diffusers module: (lora_A [r, in(, kh, kw)], lora_B [out, r(, 1, 1)])}}, scale 1: A ~ N(0,
    1/fan_in), B ~ N(0, 1/(4 r)), drawn per module from (seed, module)."""
    from .tiny import _derived_seed

    r = TINY_FLOW_LORA_RANK
    out: dict[str, dict] = {}
    for comp, layers in _layer_shapes(family).items():
        out[comp] = {}
        for name, shape in sorted(layers.items()):
            g = np.random.default_rng(_derived_seed(int(seed), f"flow-lora/{family}/{comp}", name))
            a_shape, b_shape = (r,) + shape[1:], (shape[0], r) + (1,) * (len(shape) - 2)
            a = (g.standard_normal(a_shape) / np.sqrt(np.prod(a_shape[1:]))).astype(np.float32)
            b = (0.5 * g.standard_normal(b_shape) / np.sqrt(r)).astype(np.float32)
            out[comp][name] = (a, b)
    return out


def fuse_pairs(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(down, up) of a row-stacked layer from its parts' (A_i, B_i): down = A_i stacked, up = block-diagonal."""
    down = np.concatenate([a for a, _ in pairs])
    up = np.zeros((sum(b.shape[0] for _, b in pairs), down.shape[0]), np.float32)
    row = col = 0
    for _, b in pairs:
        up[row:row + b.shape[0], col:col + b.shape[1]] = b.reshape(b.shape[0], -1)
        row, col = row + b.shape[0], col + b.shape[1]
    return down, up


def bfl_modules(family: str, mods: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The transformer's pairs keyed by BFL / MMDiT module: {module: (down, up)}, fused layers stacked, the final
    layer's (and SD3's last context block's) adaLN rows in (shift, scale) order."""
    groups: dict[str, dict[int, tuple]] = {}
    last = max(int(m.group(1)) for n in mods if (m := re.match(r"transformer_blocks\.(\d+)\.", n)))
    for name, (a, b) in mods.items():
        if name == "norm_out.linear" or (family == "sd3" and name == f"transformer_blocks.{last}.norm1_context.linear"):
            h = b.shape[0] // 2
            b = np.concatenate([b[h:], b[:h]])
        m = re.match(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.*)$", name)
        if m is None:
            bfl, idx = (_MMDIT_BASIC if family == "sd3" else _FLUX_BASIC)[name], 0
        elif m.group(1) == "single_transformer_blocks":
            src, idx = _FLUX_SINGLE[m.group(3)]
            bfl = f"single_blocks.{m.group(2)}.{src}"
        else:
            table, head = (_MMDIT_BLOCK, "joint_blocks") if family == "sd3" else (_FLUX_DOUBLE, "double_blocks")
            src, idx = table[m.group(3)]
            bfl = f"{head}.{m.group(2)}.{src}"
        groups.setdefault(bfl, {})[idx] = (a, b)
    out = {}
    for bfl, parts in groups.items():
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(f"mods: received only row blocks {sorted(parts)} of {bfl}, expected all of them")
        pairs = [parts[i] for i in sorted(parts)]
        out[bfl] = pairs[0] if len(pairs) == 1 else fuse_pairs(pairs)
    return out


def _put(tensors: dict, stem: str, down, up, roles=("lora_down", "lora_up")) -> None:
    tensors[f"{stem}.{roles[0]}.weight"] = down
    tensors[f"{stem}.{roles[1]}.weight"] = up * 2  # with alpha = rank / 2: the same product
    tensors[f"{stem}.alpha"] = np.array(down.shape[0] / 2, np.float32)


def _te_module(name: str) -> str:
    return "text_model." + (name[len("text_model."):] if name.startswith("text_model.") else name)


def flow_lora_tensors(pairs: dict, family: str, layout: str) -> dict[str, np.ndarray]:
    """The state dict of ``pairs`` (:func:`tiny_flow_lora_pairs`' form) in ``layout``."""
    if layout not in TINY_FLOW_LORA_LAYOUTS:
        raise ValueError(f"layout: received {layout!r}, expected one of {TINY_FLOW_LORA_LAYOUTS}")
    tensors: dict[str, np.ndarray] = {}
    if layout == "diffusers":
        for comp, mods in pairs.items():
            for name, (a, b) in mods.items():
                tensors[f"{_DIFFUSERS_PREFIX[comp]}.{name}.lora_A.weight"] = a
                tensors[f"{_DIFFUSERS_PREFIX[comp]}.{name}.lora_B.weight"] = b
        return tensors
    mine = pairs["transformer"]
    mods = bfl_modules(family, mine)
    if layout == "kohya":
        for bfl, (down, up) in mods.items():
            _put(tensors, "lora_unet_" + bfl.replace(".", "_"), down, up)
        for comp, prefix in (("clip_l", "lora_te1_"), ("clip_g", "lora_te2_")):
            for name, (a, b) in pairs.get(comp, {}).items():
                _put(tensors, prefix + _te_module(name).replace(".", "_"), a, b)
        return tensors
    if "single_blocks.1.linear1" in mods:  # ComfyUI's linear1_qkv, and proj_mlp by its diffusers name
        del mods["single_blocks.1.linear1"]
        mods["single_blocks.1.linear1_qkv"] = fuse_pairs([mine[f"single_transformer_blocks.1.attn.to_{x}"]
                                                          for x in "qkv"])
        a, b = mine["single_transformer_blocks.1.proj_mlp"]
        _put(tensors, "transformer.single_transformer_blocks.1.proj_mlp", a, b, ("lora_A", "lora_B"))
    for bfl, (down, up) in mods.items():
        _put(tensors, "diffusion_model." + bfl, down, up, ("lora_A", "lora_B"))
    for comp in ("clip_l", "clip_g"):
        for name, (a, b) in pairs.get(comp, {}).items():
            _put(tensors, f"text_encoders.{comp}.transformer.{_te_module(name)}", a, b)
    return tensors


def write_flow_lora(tensors: dict, out_file: str | os.PathLike, metadata: dict | None = None) -> Path:
    """``tensors`` as a float32 safetensors file with sorted keys, written atomically."""
    from .tiny import _write_safetensors

    out = Path(out_file).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        _write_safetensors(tensors, tmp, dict(metadata or {}))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def make_tiny_flow_lora(out_file: str | os.PathLike, family: str, layout: str = "kohya", seed: int = 0) -> Path:
    """Write the tiny ``family`` LoRA of ``seed`` in ``layout`` (see the module docstring)."""
    from .tiny import TINY_RECIPE_VERSION
    from .tiny_flow import TINY_FLOW_FAMILIES

    if family not in TINY_FLOW_FAMILIES:
        raise ValueError(f"family: received {family!r}, expected one of {TINY_FLOW_FAMILIES}")
    tensors = flow_lora_tensors(tiny_flow_lora_pairs(family, seed), family, layout)
    meta = {"ksampler_rt_tiny": json.dumps({"family": family, "seed": int(seed), "layout": layout,
                                            "recipe_version": TINY_RECIPE_VERSION})}
    return write_flow_lora(tensors, out_file, meta)
