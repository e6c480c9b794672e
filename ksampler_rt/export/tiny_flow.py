"""Deterministic tiny random-weight SD3.5 / FLUX.1 models in diffusers layout, built offline.

``make_tiny_flow_model(out_dir, family)`` (reached through :func:`ksampler_rt.export.tiny.make_tiny_model`)
writes what ``StableDiffusion3Pipeline.from_pretrained`` / ``FluxPipeline.from_pretrained`` load with
``HF_HUB_OFFLINE=1``:

========================  ================================================================================
family                    folders
========================  ================================================================================
``sd3`` (SD3.5 layout)    transformer (SD3Transformer2DModel, qk rms-norm as SD3.5), text_encoder (CLIP-L),
                          text_encoder_2 (CLIP-G), text_encoder_3 (T5), tokenizer, tokenizer_2, tokenizer_3,
                          vae (16 ch, scale 1.5305, shift 0.0609), scheduler (flow match, shift 3)
``flux`` / ``flux-schnell``  transformer (FluxTransformer2DModel; dev: guidance embedding), text_encoder
                          (CLIP-L), text_encoder_2 (T5), tokenizer, tokenizer_2, vae (16 ch, scale 0.3611,
                          shift 0.1159), scheduler (dev: dynamic shifting; schnell: shift 1)
========================  ================================================================================

Same family + seed -> byte-identical files: the weights are drawn as in :mod:`.tiny` (one
``torch.Generator`` per parameter, seeded from (seed, component, name)); norm weights are 1, biases 0.

Tiny widths (``TINY_FLOW_DIMS``; also in ``<dir>/tiny_fixture.json``): CLIP-L hidden 64, CLIP-G hidden 128,
T5 ``d_model`` 256 (the context width: it plays T5-XXL's 4096), so SD3's context is
CLIP-L 64 || CLIP-G 128 = 192, zero-padded to 256, then || T5 on the token axis (ComfyUI
comfy/text_encoders/sd3_clip.py), and SD3's pooled vector is 64 + 128 = 192 (real: 2048); FLUX's pooled vector
is CLIP-L's 64 (real: 768). Head sizes follow the real models' (CLIP and T5: 64 per head; FLUX's RoPE axes
split the head as (d/8, 7d/16, 7d/16), real (16, 56, 56) of 128, tiny (4, 14, 14) of 32; the VAE has 32
groups per norm), so the single-file loader (:mod:`.flow_single_file`) infers the tiny configs from the
weights with the same rules as the real ones. CLIP-L's ``text_projection`` is the identity, as in the real SD3 checkpoints,
so ComfyUI's un-projected clip_l pooled output (``return_projected_pooled=False``) and diffusers'
``text_embeds`` agree.

T5 tokenizer: a SentencePiece-style Unigram model built with the ``tokenizers`` library from the same small
corpus as the CLIP tokenizer (T5's special ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), written as
``tokenizer.json`` the way ComfyUI's ``comfy/text_encoders/t5_tokenizer`` keeps it.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import Counter
from pathlib import Path

TINY_FLOW_FAMILIES = ("sd3", "flux", "flux-schnell")

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_MAX_LENGTH = {"sd3": 256, "flux": 512, "flux-schnell": 256}

TINY_FLOW_DIMS = {
    "sd3": {"clip_l_dim": 64, "clip_g_dim": 128, "t5_dim": 256, "context_dim": 256, "pooled_dim": 192,
            "latent_channels": 16, "vae_scale_factor": 8, "scaling_factor": 1.5305, "shift_factor": 0.0609,
            "patch_size": 2, "t5_max_length": 256},
    "flux": {"clip_l_dim": 64, "t5_dim": 256, "context_dim": 256, "pooled_dim": 64, "latent_channels": 16,
             "vae_scale_factor": 8, "scaling_factor": 0.3611, "shift_factor": 0.1159, "patch_size": 2,
             "guidance": True, "t5_max_length": 512},
    "flux-schnell": {"clip_l_dim": 64, "t5_dim": 256, "context_dim": 256, "pooled_dim": 64,
                     "latent_channels": 16, "vae_scale_factor": 8, "scaling_factor": 0.3611,
                     "shift_factor": 0.1159, "patch_size": 2, "guidance": False, "t5_max_length": 256},
}


# --------------------------------------------------------------------------------------------
# T5 tokenizer


def _t5_pieces() -> list[tuple[str, float]]:
    """Unigram pieces with log-probability scores: the specials, then ``▁word`` for every corpus word
    and every single character (so any ASCII text tokenizes without ``<unk>``), in a fixed order."""
    from .tiny import _CORPUS

    words = re.findall(r"[^\W\d_]+|\d|[^\s\w]", _CORPUS.lower())
    counts = Counter("\u2581" + w for w in words)
    chars = Counter(c for w in words for c in w)
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()[]{}<>/\\@#$%^&*_+=|~`":
        chars[c] += 0
    total = sum(counts.values()) + sum(chars.values()) + len(chars) + 1
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("\u2581", math.log(1 / total))]
    for piece, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        pieces.append((piece, math.log((n + 1) / total)))
    # single characters are unlikely pieces, so whole words win the Viterbi search whenever they exist
    for c, n in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0])):
        pieces.append((c, math.log((n + 1) / total) - 10.0))
    return pieces


def write_t5_tokenizer(out_dir: str | os.PathLike, max_length: int = 512) -> Path:
    """tokenizer.json (Unigram, Metaspace pre-tokenizer, ``$A </s>`` post-processor, as T5's) plus
    tokenizer_config.json and special_tokens_map.json for ``T5TokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.Unigram(_t5_pieces(), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single=f"$A {T5_EOS}", pair=f"$A {T5_EOS} $B {T5_EOS}",
                                                       special_tokens=[(T5_EOS, 1)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.save(str(out / "tokenizer.json"), pretty=True)
    special = {"eos_token": T5_EOS, "pad_token": T5_PAD, "unk_token": T5_UNK}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n",
                                                 encoding="utf-8")
    config = dict(special, model_max_length=max_length, tokenizer_class="T5Tokenizer",
                  clean_up_tokenization_spaces=False, extra_ids=0, additional_special_tokens=[])
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                               encoding="utf-8")
    return out


def t5_vocab_size() -> int:
    return len(_t5_pieces())


# --------------------------------------------------------------------------------------------
# networks


def _init(model, seed: int, component: str, out_gain: dict[str, float] | None = None) -> None:
    """:func:`.tiny._init_weights`, then every normalisation layer's own weight 1 / bias 0 (RMSNorm and
    T5's layer norm are no ``nn.LayerNorm``, which ``_init_weights`` would draw at random)."""
    import torch

    from .tiny import _init_weights

    _init_weights(model, seed, component, out_gain)
    with torch.no_grad():
        for module in model.modules():
            if "Norm" not in type(module).__name__:
                continue
            for p_name, p in module.named_parameters(recurse=False):
                p.fill_(1.0 if p_name == "weight" else 0.0)


def _clip(which: str, ids: dict[str, int]):
    from transformers import CLIPTextConfig

    from .tiny import MAX_LENGTH

    base = dict(vocab_size=ids["vocab_size"], max_position_embeddings=MAX_LENGTH, num_hidden_layers=3,
                bos_token_id=ids["bos"], eos_token_id=ids["eos"], layer_norm_eps=1e-5,
                attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0)
    if which == "l":
        return CLIPTextConfig(hidden_size=64, intermediate_size=256, projection_dim=64, num_attention_heads=1,
                              hidden_act="quick_gelu", pad_token_id=ids["eos"], **base)
    return CLIPTextConfig(hidden_size=128, intermediate_size=512, projection_dim=128, num_attention_heads=2,
                          hidden_act="gelu", pad_token_id=ids["bang"], **base)


def _t5():
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=t5_vocab_size(), d_model=256, d_kv=64, d_ff=512, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
                   layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                   use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                   tie_word_embeddings=False)
    return T5EncoderModel(cfg)


def _transformer(family: str):
    if family == "sd3":
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                                     attention_head_dim=8, num_attention_heads=4, joint_attention_dim=256,
                                     caption_projection_dim=32, pooled_projection_dim=192, out_channels=16,
                                     pos_embed_max_size=48, qk_norm="rms_norm")
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=64, out_channels=None, num_layers=1,
                                  num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
                                  joint_attention_dim=256, pooled_projection_dim=64,
                                  guidance_embeds=(family == "flux"), axes_dims_rope=(4, 14, 14))


def _vae(family: str):
    from diffusers import AutoencoderKL

    dims = TINY_FLOW_DIMS[family]
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, sample_size=256,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32, act_fn="silu",
                         scaling_factor=dims["scaling_factor"], shift_factor=dims["shift_factor"],
                         force_upcast=False, use_quant_conv=False, use_post_quant_conv=False)


def _scheduler(family: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    if family == "flux":  # black-forest-labs/FLUX.1-dev scheduler_config.json
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                               base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                               max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def build_flow_into(out: Path, family: str, seed: int) -> None:
    """Write the tiny ``family`` model into the (empty) folder ``out``."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5TokenizerFast

    from .tiny import (_VAE_OUT_GAIN, TINY_RECIPE_VERSION, build_tiny_vocab, tokenizer_ids,
                       write_clip_tokenizer)

    vocab, _ = build_tiny_vocab()
    ids = tokenizer_ids(vocab)
    tok_dir = out / "_tok_build"
    write_clip_tokenizer(tok_dir / "l", pad_with_end=True)
    write_clip_tokenizer(tok_dir / "bang", pad_with_end=False)
    write_t5_tokenizer(tok_dir / "t5", T5_MAX_LENGTH[family])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _transformer(family)
        _init(transformer, seed, "transformer")
        vae = _vae(family)
        _init(vae, seed, "vae", {"decoder.conv_out": _VAE_OUT_GAIN})
        t5 = _t5()
        _init(t5, seed, "t5")
        if family == "sd3":
            clip_l = CLIPTextModelWithProjection(_clip("l", ids))
            _init(clip_l, seed, "text_encoder")
            with torch.no_grad():  # identity, as in the SD3 checkpoints (see the module docstring)
                clip_l.text_projection.weight.copy_(torch.eye(64))
            clip_g = CLIPTextModelWithProjection(_clip("g", ids))
            _init(clip_g, seed, "text_encoder_2")
        else:
            clip_l = CLIPTextModel(_clip("l", ids))
            _init(clip_l, seed, "text_encoder")
    mods = [transformer, vae, t5, clip_l] + ([clip_g] if family == "sd3" else [])
    for m in mods:
        m.eval()
    tok_l = CLIPTokenizer.from_pretrained(tok_dir / "l")
    tok_t5 = T5TokenizerFast.from_pretrained(tok_dir / "t5")
    if family == "sd3":
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=_scheduler(family), vae=vae,
                                        text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g,
                                        tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir / "bang"),
                                        text_encoder_3=t5, tokenizer_3=tok_t5)
        tokenizers = {"tokenizer": ("clip", True), "tokenizer_2": ("clip", False), "tokenizer_3": ("t5", None)}
    else:
        from diffusers import FluxPipeline

        pipe = FluxPipeline(scheduler=_scheduler(family), vae=vae, text_encoder=clip_l, tokenizer=tok_l,
                            text_encoder_2=t5, tokenizer_2=tok_t5, transformer=transformer)
        tokenizers = {"tokenizer": ("clip", True), "tokenizer_2": ("t5", None)}
    from transformers.utils import logging as tf_logging

    bar = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        if bar:
            tf_logging.enable_progress_bar()
    shutil.rmtree(tok_dir)
    # our own tokenizer file sets (what transformers re-serialises is version dependent)
    for sub, (kind, pad_with_end) in tokenizers.items():
        shutil.rmtree(out / sub)
        if kind == "clip":
            write_clip_tokenizer(out / sub, pad_with_end=pad_with_end)
        else:
            write_t5_tokenizer(out / sub, T5_MAX_LENGTH[family])
    info = {"family": family, "seed": seed, "recipe_version": TINY_RECIPE_VERSION,
            "vocab_size": ids["vocab_size"], "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
            "t5_vocab_size": t5_vocab_size(), **TINY_FLOW_DIMS[family]}
    (out / "tiny_fixture.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_tiny_flow_lora(out_file: str | os.PathLike, family: str, layout: str = "kohya", seed: int = 0) -> Path:
    """A deterministic tiny LoRA for the tiny ``family`` model in the ``layout`` "kohya", "comfyui" or "diffusers"
    (see :mod:`.tiny_flow_lora`)."""
    from .tiny_flow_lora import make_tiny_flow_lora as make

    return make(out_file, family, layout, seed)
