"""Single-file SD3.5 / FLUX.1 checkpoints: read (for the export) and write (for the tests' round trips).

Accepted layouts (what ComfyUI users keep):

* **SD3 / SD3.5 all-in-one** (``sd3.5_large.safetensors``, ``sd3.5_medium.safetensors``...):
  ``model.diffusion_model.*`` (Stability's MMDiT keys: ``joint_blocks.*``, ``x_embedder``, ``pos_embed``...),
  ``text_encoders.clip_l.transformer.*`` / ``text_encoders.clip_g.transformer.*`` (Hugging Face CLIP keys),
  ``text_encoders.t5xxl.transformer.*`` (Hugging Face T5 encoder keys), ``first_stage_model.*`` (LDM VAE keys).
  A file without the text encoders (``sd3.5_large.safetensors`` without the ``_incl_clips`` ones) exports
  the transformer and VAE; the text encoders then come from ``--clip-l`` / ``--clip-g`` / ``--t5`` files.
* **FLUX.1 split files**: the diffusion model alone in Black Forest Labs' keys (``double_blocks.*``,
  ``single_blocks.*``, ``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in`` (dev only),
  ``final_layer``; optionally under ``model.diffusion_model.``), plus ``clip_l.safetensors`` (HF CLIP keys,
  ``text_model.*``), ``t5xxl_fp16.safetensors`` (HF T5 keys, ``encoder.*`` + ``shared.weight``) and
  ``ae.safetensors`` (LDM VAE keys without prefix).

Reading converts with diffusers' own converters (``diffusers.loaders.single_file_utils``
``convert_sd3_transformer_checkpoint_to_diffusers`` / ``convert_flux_transformer_checkpoint_to_diffusers`` /
``convert_ldm_vae_checkpoint``). The configs are inferred from the weights' shapes, with the real models'
rules for what the shapes do not tell: 64 features per attention head in CLIP and T5, CLIP-L's quick_gelu,
FLUX's RoPE axes (d/8, 7d/16, 7d/16) of the head size d, 32 groups per VAE norm; or they come from ``config``,
a diffusers folder of the same family. Tokenizers come from ``tokenizer`` (a diffusers folder with
``tokenizer*/`` sub-folders) or ``config``.

Writing (diffusers -> these layouts) is written here from the layouts above; the tests read the files back
through diffusers' converters, so the two directions are checked against each other.
"""
from __future__ import annotations

import json
import os

from .errors import ExportError

SD3_PREFIX = "model.diffusion_model."
TE_PREFIX = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
             "t5xxl": "text_encoders.t5xxl.transformer."}
VAE_PREFIX = "first_stage_model."


def _keys(path: str) -> dict:
    from .single_file import read_safetensors_header
    return read_safetensors_header(path)


def single_file_flow_family(path: str) -> str | None:
    """``sd3`` / ``flux`` / ``flux-schnell`` from a .safetensors header's keys, or None (an SD / SDXL file)."""
    keys = _keys(path)
    for p in ("", SD3_PREFIX):
        if f"{p}joint_blocks.0.x_block.attn.qkv.weight" in keys:
            return "sd3"
        if f"{p}double_blocks.0.img_attn.qkv.weight" in keys:
            return "flux" if f"{p}guidance_in.in_layer.weight" in keys else "flux-schnell"
    return None


def _load(path: str, what: str) -> dict:
    import torch
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ExportError(f"{what}: received {path}, expected a .safetensors file: no such file")
    try:
        sd = load_file(path)
    except Exception as exc:  # safetensors raises its own error types
        raise ExportError(f"{what}: cannot read {path} as safetensors ({exc})") from None
    # fp8 / bf16 / fp16 files: everything is exported from fp32 modules
    sd = {k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in sd.items()}
    return unscale_fp8(sd)


def unscale_fp8(sd: dict) -> dict:
    """ComfyUI's "scaled fp8" files (``t5xxl_fp8_e4m3fn_scaled.safetensors``, ``*_fp8_scaled`` diffusion
    models): a ``scaled_fp8`` marker tensor, and next to each fp8 ``X.weight`` a float32 ``X.scale_weight``
    (and ``X.scale_input``, an activation scale for fp8 matrix multiplication). The weight a layer computes with
    is ``weight * scale_weight`` (comfy/ops.py ``scaled_fp8_ops``: ``convert_weight`` / the manual-cast linear);
    the other two are dropped. A state dict without the marker is returned as it is."""
    if not any(k == "scaled_fp8" or k.endswith(".scaled_fp8") for k in sd):
        return sd
    out = {}
    for key, value in sd.items():
        if key == "scaled_fp8" or key.endswith((".scaled_fp8", ".scale_input", ".scale_weight")):
            continue
        scale = sd.get(key[: -len("weight")] + "scale_weight") if key.endswith(".weight") else None
        out[key] = value if scale is None else value * scale.to(value.dtype)
    return out


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _count(sd: dict, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


# ------------------------------------------------------------------------------------------- configs

def _inferred(what: str, infer, sd: dict, path: str):
    """``infer(sd)``, with a missing key reported as the file not being a ``what``."""
    try:
        return infer(sd)
    except (KeyError, IndexError) as exc:
        raise ExportError(f"{what} from {path}: received weights without {exc}, expected a {what} in the "
                          f"documented layout (docs/export.md)") from None


def _sd3_config(sd: dict) -> dict:
    """SD3Transformer2DModel config from Stability's keys (``model.diffusion_model.`` stripped)."""
    import math
    inner, cin, p, _ = sd["x_embedder.proj.weight"].shape
    n_pos = sd["pos_embed"].shape[1]
    head = sd["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0] if "joint_blocks.0.x_block.attn.ln_q.weight" \
        in sd else 64
    return {"sample_size": 128, "patch_size": int(p), "in_channels": int(cin),
            "num_layers": _count(sd, "joint_blocks."), "attention_head_dim": int(head),
            "num_attention_heads": int(inner // head), "joint_attention_dim": int(sd["context_embedder.weight"].shape[1]),
            "caption_projection_dim": int(sd["context_embedder.weight"].shape[0]),
            "pooled_projection_dim": int(sd["y_embedder.mlp.0.weight"].shape[1]),
            "out_channels": int(sd["final_layer.linear.weight"].shape[0] // (p * p)),
            "pos_embed_max_size": int(math.isqrt(n_pos)),
            "dual_attention_layers": tuple(i for i in range(_count(sd, "joint_blocks."))
                                           if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd),
            "qk_norm": "rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in sd else None}


def _flux_config(sd: dict) -> dict:
    inner, cin = sd["img_in.weight"].shape
    head = int(sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0])
    return {"patch_size": 1, "in_channels": int(cin), "out_channels": None,
            "num_layers": _count(sd, "double_blocks."), "num_single_layers": _count(sd, "single_blocks."),
            "attention_head_dim": head, "num_attention_heads": int(inner // head),
            "joint_attention_dim": int(sd["txt_in.weight"].shape[1]),
            "pooled_projection_dim": int(sd["vector_in.in_layer.weight"].shape[1]),
            "guidance_embeds": "guidance_in.in_layer.weight" in sd,
            "axes_dims_rope": (head // 8, 7 * head // 16, 7 * head // 16)}


def _clip_config(sd: dict, which: str):
    """CLIPTextConfig from HF CLIP keys (``text_model.`` kept). 64 features per head; quick_gelu for CLIP-L
    (OpenAI), gelu for CLIP-G (OpenCLIP bigG); eos_token_id 2 = pool at the highest token id (CLIP's EOS
    is its last id), as the real configs say."""
    from transformers import CLIPTextConfig
    vocab, hidden = sd["text_model.embeddings.token_embedding.weight"].shape
    proj = sd.get("text_projection.weight")
    return CLIPTextConfig(vocab_size=int(vocab), hidden_size=int(hidden),
                          intermediate_size=int(sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
                          num_hidden_layers=_count(sd, "text_model.encoder.layers."),
                          num_attention_heads=max(1, int(hidden) // 64),
                          max_position_embeddings=int(sd["text_model.embeddings.position_embedding.weight"].shape[0]),
                          hidden_act="quick_gelu" if which == "clip_l" else "gelu",
                          projection_dim=int(proj.shape[0]) if proj is not None else int(hidden),
                          layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _t5_config(sd: dict):
    from transformers import T5Config
    vocab, d = sd["shared.weight"].shape
    inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    wi = sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"]
    return T5Config(vocab_size=int(vocab), d_model=int(d), d_kv=64, num_heads=int(inner) // 64, d_ff=int(wi.shape[0]),
                    num_layers=_count(sd, "encoder.block."),
                    relative_attention_num_buckets=int(
                        sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[0]),
                    relative_attention_max_distance=128, feed_forward_proj="gated-gelu" if gated else "relu",
                    layer_norm_epsilon=1e-6, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
                    pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)


def _vae_config(sd: dict, family: str) -> dict:
    """AutoencoderKL config from LDM VAE keys (no prefix): 32 groups per norm (SD3's and FLUX's)."""
    n = _count(sd, "encoder.down.")
    chans = [int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(n)]
    scale, shift = (1.5305, 0.0609) if family == "sd3" else (0.3611, 0.1159)
    return {"in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
            "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": chans, "layers_per_block": _count(sd, "encoder.down.0.block."),
            "act_fn": "silu", "latent_channels": int(sd["decoder.conv_in.weight"].shape[1]), "norm_num_groups": 32,
            "sample_size": 1024, "scaling_factor": scale, "shift_factor": shift, "force_upcast": True,
            "use_quant_conv": "quant_conv.weight" in sd, "use_post_quant_conv": "post_quant_conv.weight" in sd,
            "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd}


# ------------------------------------------------------------------------------------------- loading

def _config_from(config: str | None, sub: str) -> dict | None:
    if config is None:
        return None
    path = os.path.join(config, sub, "config.json")
    if not os.path.isfile(path):
        raise ExportError(f"--config: received {config}, expected a diffusers folder with {sub}/config.json")
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def _load_strict(model, sd: dict, what: str, path: str):
    import torch
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ExportError(f"{what} from {path}: received weights that do not fit the model (missing "
                          f"{missing[:4]}, unexpected {list(result.unexpected_keys)[:4]}); expected a complete "
                          f"{what} in the documented layout (docs/export.md)")
    return model.to(torch.float32).eval()


def load_transformer(sd: dict, family: str, path: str, config: str | None = None):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import (convert_flux_transformer_checkpoint_to_diffusers,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)

    sd = _strip(sd, SD3_PREFIX) if any(k.startswith(SD3_PREFIX) for k in sd) else dict(sd)
    if family == "sd3":
        cfg = _config_from(config, "transformer") or _inferred("transformer", _sd3_config, sd, path)
        model = SD3Transformer2DModel(**cfg)
        converted = convert_sd3_transformer_checkpoint_to_diffusers(sd)
    else:
        cfg = _config_from(config, "transformer") or _inferred("transformer", _flux_config, sd, path)
        model = FluxTransformer2DModel(**cfg)
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        # diffusers' converter hard-codes FLUX.1's width (inner_dim 3072, mlp_ratio 4); other widths (the
        # tiny models) take bfl_to_diffusers, which the tests check against diffusers' converter at 3072
        converted = (convert_flux_transformer_checkpoint_to_diffusers(dict(sd)) if inner == 3072
                     else bfl_to_diffusers(sd))
    return _load_strict(model, converted, "transformer", path)


def load_clip(sd: dict, which: str, path: str, config: str | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # the files keep the classic ``text_model.`` prefix; some transformers 5 classes flattened it away
    sd = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}
    sub = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}[which]
    cfg = CLIPTextConfig(**_config_from(config, sub)) if config else _inferred(
        which, lambda x: _clip_config(x, which), sd, path)
    if which == "clip_l":  # ComfyUI's clip_l pooled output is the un-projected one (see flow_export)
        sd = {k: v for k, v in sd.items() if not k.startswith("text_projection")}
        model = CLIPTextModel(cfg)
    else:
        model = CLIPTextModelWithProjection(cfg)
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    return _load_strict(model, sd, which, path)


def load_t5(sd: dict, path: str, config: str | None = None, sub: str = "text_encoder_2"):
    from transformers import T5Config, T5EncoderModel

    sd = {k: v for k, v in sd.items() if not k.startswith("decoder.") and k != "lm_head.weight"}
    if "encoder.embed_tokens.weight" not in sd and "shared.weight" in sd:
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    cfg = T5Config(**_config_from(config, sub)) if config else _inferred("t5xxl", _t5_config, sd, path)
    return _load_strict(T5EncoderModel(cfg), sd, "t5xxl", path)


def load_vae(sd: dict, family: str, path: str, config: str | None = None):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = _strip(sd, VAE_PREFIX) if any(k.startswith(VAE_PREFIX) for k in sd) else dict(sd)
    cfg = _config_from(config, "vae") or _inferred("vae", lambda x: _vae_config(x, family), sd, path)
    converted = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in sd.items()}, cfg)
    return _load_strict(AutoencoderKL(**cfg), converted, "vae", path)


def load_flow_single_file(path: str, family: str, *, clip_l: str | None = None, clip_g: str | None = None,
                          t5: str | None = None, vae: str | None = None, config: str | None = None,
                          tokenizer: str | None = None):
    """A :class:`.flow_export.FlowSource` from ``path`` (SD3.5 all-in-one or a FLUX transformer file) plus
    the separate text encoder / VAE files; the networks none of them holds are left out of the export."""
    from .flow_export import FLOW_TEXT_ENCODERS, FlowSource

    sd = _load(path, "checkpoint")
    modules, files = {"transformer": load_transformer(sd, family, path, config)}, [path]
    extra = {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5}
    for name, sub, _tok, _kind in FLOW_TEXT_ENCODERS[family]:
        src = None
        if extra[name]:
            src, part = extra[name], _load(extra[name], f"--{name.replace('t5xxl', 't5').replace('_', '-')}")
            files.append(extra[name])
        elif any(k.startswith(TE_PREFIX[name]) for k in sd):
            src, part = path, _strip(sd, TE_PREFIX[name])
        if src is None:
            continue
        if name == "t5xxl":
            modules[name] = load_t5(part, src, config, sub)
        else:
            modules[name] = load_clip(part, name, src, config)
    if vae:
        modules["vae"] = load_vae(_load(vae, "--vae"), family, vae, config)
        files.append(vae)
    elif any(k.startswith((VAE_PREFIX + "decoder.", "decoder.")) for k in sd):
        modules["vae"] = load_vae(sd, family, path, config)
    del sd
    tok_root = tokenizer or config
    tok_dirs = {}
    if tok_root:
        # a diffusers folder (tokenizer*/ sub-folders), or one tokenizer folder: CLIP's vocab.json + merges.txt
        # for the CLIPs, T5's tokenizer.json for T5
        for name, _sub, tok, kind in FLOW_TEXT_ENCODERS[family]:
            if name not in modules:
                continue
            if os.path.isdir(os.path.join(tok_root, tok)):
                tok_dirs[name] = os.path.join(tok_root, tok)
            elif os.path.isfile(os.path.join(tok_root, "vocab.json" if kind == "clip" else "tokenizer.json")):
                tok_dirs[name] = tok_root
    rewrite = False
    if not tok_root:
        tok_dirs = _comfyui_tokenizers(path, [n for n in modules if n in extra])
        rewrite = bool(tok_dirs)
        tok_root = os.path.dirname(next(iter(tok_dirs.values()))) if tok_dirs else None
    vcfg = modules["vae"].config if "vae" in modules else None
    scale, shift = (1.5305, 0.0609) if family == "sd3" else (0.3611, 0.1159)
    return FlowSource(path, "single_file", family, modules,
                      float(vcfg.scaling_factor) if vcfg else scale,
                      float(vcfg.shift_factor or 0.0) if vcfg else shift, tok_dirs, files,
                      tokenizer_source=(f"ComfyUI installation ({tok_root})" if rewrite else
                                        f"{'--tokenizer' if tokenizer else '--config'} {tok_root}" if tok_root
                                        else ""),
                      tokenizer_rewrite=rewrite)


def _comfyui_tokenizers(checkpoint: str, names: list[str]) -> dict:
    """The ComfyUI tree's tokenizers for a checkpoint below a ComfyUI folder: ``comfy/sd1_tokenizer`` (CLIP's
    BPE files, every CLIP tower) and ``comfy/text_encoders/t5_tokenizer`` (T5's tokenizer.json)."""
    from .clip_tokenizer import find_comfyui_tokenizer

    out = {}
    clip = find_comfyui_tokenizer(checkpoint)
    if clip:
        t5 = os.path.join(os.path.dirname(clip), "text_encoders", "t5_tokenizer")
        for name in names:
            if name.startswith("clip"):
                out[name] = clip
            elif os.path.isfile(os.path.join(t5, "tokenizer.json")):
                out[name] = t5
    return out


# ------------------------------------------------------------------------------------------- writing

def _qkv(sd, prefix, names):
    import torch
    return {s: torch.cat([sd[f"{prefix}{n}.{s}"] for n in names], 0) for s in ("weight", "bias")}


def _swap_halves(t):
    import torch
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], 0)


def flux_to_bfl(sd: dict) -> dict:
    """diffusers FluxTransformer2DModel state dict -> Black Forest Labs' keys."""
    out = {}

    def lin(dst, src):
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"]
    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    for dst, src in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                     ("guidance_in", "guidance_embedder")):
        if f"time_text_embed.{src}.linear_1.weight" in sd:
            lin(f"{dst}.in_layer", f"time_text_embed.{src}.linear_1")
            lin(f"{dst}.out_layer", f"time_text_embed.{src}.linear_2")
    for i in range(_count(sd, "transformer_blocks.")):
        s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        lin(d + "img_mod.lin", s + "norm1.linear")
        lin(d + "txt_mod.lin", s + "norm1_context.linear")
        for k, v in _qkv(sd, s + "attn.", ("to_q", "to_k", "to_v")).items():
            out[f"{d}img_attn.qkv.{k}"] = v
        for k, v in _qkv(sd, s + "attn.", ("add_q_proj", "add_k_proj", "add_v_proj")).items():
            out[f"{d}txt_attn.qkv.{k}"] = v
        out[d + "img_attn.norm.query_norm.scale"] = sd[s + "attn.norm_q.weight"]
        out[d + "img_attn.norm.key_norm.scale"] = sd[s + "attn.norm_k.weight"]
        out[d + "txt_attn.norm.query_norm.scale"] = sd[s + "attn.norm_added_q.weight"]
        out[d + "txt_attn.norm.key_norm.scale"] = sd[s + "attn.norm_added_k.weight"]
        lin(d + "img_attn.proj", s + "attn.to_out.0")
        lin(d + "txt_attn.proj", s + "attn.to_add_out")
        lin(d + "img_mlp.0", s + "ff.net.0.proj")
        lin(d + "img_mlp.2", s + "ff.net.2")
        lin(d + "txt_mlp.0", s + "ff_context.net.0.proj")
        lin(d + "txt_mlp.2", s + "ff_context.net.2")
    for i in range(_count(sd, "single_transformer_blocks.")):
        s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        lin(d + "modulation.lin", s + "norm.linear")
        for k, v in _qkv(sd, s, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")).items():
            out[f"{d}linear1.{k}"] = v
        lin(d + "linear2", s + "proj_out")
        out[d + "norm.query_norm.scale"] = sd[s + "attn.norm_q.weight"]
        out[d + "norm.key_norm.scale"] = sd[s + "attn.norm_k.weight"]
    lin("final_layer.linear", "proj_out")
    # diffusers' AdaLayerNormContinuous holds (scale, shift), the original (shift, scale)
    out["final_layer.adaLN_modulation.1.weight"] = _swap_halves(sd["norm_out.linear.weight"])
    out["final_layer.adaLN_modulation.1.bias"] = _swap_halves(sd["norm_out.linear.bias"])
    return out


def bfl_to_diffusers(sd: dict) -> dict:
    """Black Forest Labs' FLUX keys -> diffusers FluxTransformer2DModel (the inverse of :func:`flux_to_bfl`, for
    any width; ``model.diffusion_model.`` already stripped)."""
    out = {}

    def lin(dst, src):
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"]

    def split(dst_names, src, sizes):
        for suffix in ("weight", "bias"):
            for name, part in zip(dst_names, sd[f"{src}.{suffix}"].split(sizes, dim=0)):
                out[f"{name}.{suffix}"] = part
    lin("x_embedder", "img_in")
    lin("context_embedder", "txt_in")
    for src, dst in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                     ("guidance_in", "guidance_embedder")):
        if f"{src}.in_layer.weight" in sd:
            lin(f"time_text_embed.{dst}.linear_1", f"{src}.in_layer")
            lin(f"time_text_embed.{dst}.linear_2", f"{src}.out_layer")
    inner = sd["img_in.weight"].shape[0]
    for i in range(_count(sd, "double_blocks.")):
        s, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        lin(d + "norm1.linear", s + "img_mod.lin")
        lin(d + "norm1_context.linear", s + "txt_mod.lin")
        split([d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], s + "img_attn.qkv", [inner] * 3)
        split([d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], s + "txt_attn.qkv", [inner] * 3)
        out[d + "attn.norm_q.weight"] = sd[s + "img_attn.norm.query_norm.scale"]
        out[d + "attn.norm_k.weight"] = sd[s + "img_attn.norm.key_norm.scale"]
        out[d + "attn.norm_added_q.weight"] = sd[s + "txt_attn.norm.query_norm.scale"]
        out[d + "attn.norm_added_k.weight"] = sd[s + "txt_attn.norm.key_norm.scale"]
        lin(d + "attn.to_out.0", s + "img_attn.proj")
        lin(d + "attn.to_add_out", s + "txt_attn.proj")
        lin(d + "ff.net.0.proj", s + "img_mlp.0")
        lin(d + "ff.net.2", s + "img_mlp.2")
        lin(d + "ff_context.net.0.proj", s + "txt_mlp.0")
        lin(d + "ff_context.net.2", s + "txt_mlp.2")
    for i in range(_count(sd, "single_blocks.")):
        s, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        lin(d + "norm.linear", s + "modulation.lin")
        mlp = sd[s + "linear1.weight"].shape[0] - 3 * inner
        split([d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"], s + "linear1",
              [inner, inner, inner, mlp])
        lin(d + "proj_out", s + "linear2")
        out[d + "attn.norm_q.weight"] = sd[s + "norm.query_norm.scale"]
        out[d + "attn.norm_k.weight"] = sd[s + "norm.key_norm.scale"]
    lin("proj_out", "final_layer.linear")
    out["norm_out.linear.weight"] = _swap_halves(sd["final_layer.adaLN_modulation.1.weight"])
    out["norm_out.linear.bias"] = _swap_halves(sd["final_layer.adaLN_modulation.1.bias"])
    return out


def sd3_to_mmdit(sd: dict) -> dict:
    """diffusers SD3Transformer2DModel state dict -> Stability's MMDiT keys (without ``model.diffusion_model.``)."""
    out = {}

    def lin(dst, src):
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        if f"{src}.bias" in sd:
            out[f"{dst}.bias"] = sd[f"{src}.bias"]
    out["pos_embed"] = sd["pos_embed.pos_embed"]
    lin("x_embedder.proj", "pos_embed.proj")
    lin("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    lin("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    lin("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    lin("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    lin("context_embedder", "context_embedder")
    n = _count(sd, "transformer_blocks.")
    for i in range(n):
        s, d = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = f"{s}ff_context.net.2.weight" not in sd  # context_pre_only: the last block's context side
        for k, v in _qkv(sd, s + "attn.", ("to_q", "to_k", "to_v")).items():
            out[f"{d}x_block.attn.qkv.{k}"] = v
        for k, v in _qkv(sd, s + "attn.", ("add_q_proj", "add_k_proj", "add_v_proj")).items():
            out[f"{d}context_block.attn.qkv.{k}"] = v
        lin(d + "x_block.attn.proj", s + "attn.to_out.0")
        if f"{s}attn.norm_q.weight" in sd:
            out[d + "x_block.attn.ln_q.weight"] = sd[s + "attn.norm_q.weight"]
            out[d + "x_block.attn.ln_k.weight"] = sd[s + "attn.norm_k.weight"]
            out[d + "context_block.attn.ln_q.weight"] = sd[s + "attn.norm_added_q.weight"]
            out[d + "context_block.attn.ln_k.weight"] = sd[s + "attn.norm_added_k.weight"]
        if f"{s}attn2.to_q.weight" in sd:
            for k, v in _qkv(sd, s + "attn2.", ("to_q", "to_k", "to_v")).items():
                out[f"{d}x_block.attn2.qkv.{k}"] = v
            lin(d + "x_block.attn2.proj", s + "attn2.to_out.0")
            if f"{s}attn2.norm_q.weight" in sd:
                out[d + "x_block.attn2.ln_q.weight"] = sd[s + "attn2.norm_q.weight"]
                out[d + "x_block.attn2.ln_k.weight"] = sd[s + "attn2.norm_k.weight"]
        lin(d + "x_block.adaLN_modulation.1", s + "norm1.linear")
        lin(d + "x_block.mlp.fc1", s + "ff.net.0.proj")
        lin(d + "x_block.mlp.fc2", s + "ff.net.2")
        if last:
            out[d + "context_block.adaLN_modulation.1.weight"] = _swap_halves(sd[s + "norm1_context.linear.weight"])
            out[d + "context_block.adaLN_modulation.1.bias"] = _swap_halves(sd[s + "norm1_context.linear.bias"])
        else:
            lin(d + "context_block.adaLN_modulation.1", s + "norm1_context.linear")
            lin(d + "context_block.attn.proj", s + "attn.to_add_out")
            lin(d + "context_block.mlp.fc1", s + "ff_context.net.0.proj")
            lin(d + "context_block.mlp.fc2", s + "ff_context.net.2")
    lin("final_layer.linear", "proj_out")
    out["final_layer.adaLN_modulation.1.weight"] = _swap_halves(sd["norm_out.linear.weight"])
    out["final_layer.adaLN_modulation.1.bias"] = _swap_halves(sd["norm_out.linear.bias"])
    return out


def _save(tensors: dict, path: str) -> str:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, path)
    return path


def _clip_sd(model) -> dict:
    sd = model.state_dict()
    if not any(k.startswith("text_model.") for k in sd):  # transformers >= 5.6: add the classic prefix
        sd = {("text_model." + k if not k.startswith("text_projection") else k): v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


def write_flow_single_files(diffusers_dir: str, out_dir: str) -> dict:
    """Write the tiny (or any) SD3 / FLUX diffusers folder as the files ComfyUI users have; returns
    {role: path}. SD3: ``sd3.5-all-in-one.safetensors`` (transformer, the three text encoders, VAE). FLUX:
    ``flux1-<dev|schnell>.safetensors`` (BFL keys), ``clip_l.safetensors``, ``t5xxl_fp16.safetensors``
    (fp16, as distributed), ``ae.safetensors``."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    from .flow_export import folder_flow_family
    from .ldm_writer import vae_to_ldm

    family = folder_flow_family(diffusers_dir)
    if family is None:
        raise ExportError(f"diffusers_dir: received {diffusers_dir}, expected an SD3 / FLUX diffusers folder")
    os.makedirs(out_dir, exist_ok=True)
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

    kw = dict(local_files_only=True)
    vae = AutoencoderKL.from_pretrained(diffusers_dir, subfolder="vae", **kw)
    vae_sd = vae_to_ldm(vae.state_dict(), vae.config)  # first_stage_model.* keys
    files = {}
    if family == "sd3":
        tr = SD3Transformer2DModel.from_pretrained(diffusers_dir, subfolder="transformer", **kw)
        sd = {SD3_PREFIX + k: v for k, v in sd3_to_mmdit(tr.state_dict()).items()}
        l = CLIPTextModelWithProjection.from_pretrained(diffusers_dir, subfolder="text_encoder", **kw)
        g = CLIPTextModelWithProjection.from_pretrained(diffusers_dir, subfolder="text_encoder_2", **kw)
        t5 = T5EncoderModel.from_pretrained(diffusers_dir, subfolder="text_encoder_3", **kw)
        sd.update({TE_PREFIX["clip_l"] + k: v for k, v in _clip_sd(l).items()})
        sd.update({TE_PREFIX["clip_g"] + k: v for k, v in _clip_sd(g).items()})
        sd.update({TE_PREFIX["t5xxl"] + k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"})
        sd.update(vae_sd)
        files["checkpoint"] = _save(sd, os.path.join(out_dir, "sd3.5-all-in-one.safetensors"))
        return files
    tr = FluxTransformer2DModel.from_pretrained(diffusers_dir, subfolder="transformer", **kw)
    name = "flux1-dev.safetensors" if family == "flux" else "flux1-schnell.safetensors"
    files["checkpoint"] = _save(flux_to_bfl(tr.state_dict()), os.path.join(out_dir, name))
    l = CLIPTextModel.from_pretrained(diffusers_dir, subfolder="text_encoder", **kw)
    files["clip_l"] = _save(_clip_sd(l), os.path.join(out_dir, "clip_l.safetensors"))
    t5 = T5EncoderModel.from_pretrained(diffusers_dir, subfolder="text_encoder_2", **kw)
    files["t5"] = _save({k: v.to(torch.float16) for k, v in t5.state_dict().items()
                         if k != "encoder.embed_tokens.weight"}, os.path.join(out_dir, "t5xxl_fp16.safetensors"))
    files["vae"] = _save({k[len(VAE_PREFIX):]: v for k, v in vae_sd.items()}, os.path.join(out_dir, "ae.safetensors"))
    return files
