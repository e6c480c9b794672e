"""Deterministic, random-weight tiny Stable Diffusion checkpoints, built offline.

``make_tiny_model(out_dir, family)`` writes a diffusers folder (``model_index.json``, ``unet/``,
``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``; SDXL adds ``text_encoder_2/`` and
``tokenizer_2/``) that ``StableDiffusionPipeline.from_pretrained`` /
``StableDiffusionXLPipeline.from_pretrained`` load with ``HF_HUB_OFFLINE=1``, exactly like a user's
converted checkpoint folder. Nothing is downloaded: every config is spelled out here and the CLIP
BPE tokenizer is learned from a small built-in English corpus.

Same family + same seed -> byte-identical files (configs are written by diffusers/transformers
with sorted keys and no timestamps; every tensor is drawn from its own ``torch.Generator`` whose
seed is derived from (seed, component, parameter name), so it depends neither on module
construction order nor on the global RNG).

Initialisation (documented because the fixtures feed numerical tests):

* matrices / conv kernels: N(0, 1/fan_in) ("LeCun normal"), so every linear map roughly keeps unit
  variance; biases N(0, 0.02^2); norm layers weight 1, bias 0; embeddings N(0, 1/dim).
* the UNet's ``conv_out`` gets an extra gain (``_UNET_OUT_GAIN``) so that for a unit-normal latent
  the UNet output std is ~1 (measured 0.97-1.0 for all three families; the output moves by
  ~0.1 std between t=1 and t=999 and by ~0.3 std between two random contexts), like a trained
  epsilon / v predictor; the VAE decoder ``conv_out`` gets a gain that keeps decoded pixels mostly
  in [-1, 1].

Tiny dimensions (see ``TINY_DIMS``; also written to ``<dir>/tiny_fixture.json``):

============  =======  ========  ==================  =================================
family        context  pooled    ADM ``y`` width     latent
============  =======  ========  ==================  =================================
sd15          32       --        --                  4 ch, image/8, scale 0.18215
sd2-v         48       --        --                  4 ch, image/8, scale 0.18215
sdxl          96       64        1600 = 64 + 6*256     4 ch, image/8, scale 0.13025
============  =======  ========  ==================  =================================

SDXL: context = concat(clip_l penultimate 32, clip_g penultimate 64); ``y`` = concat(pooled
clip_g projection 64, 6 size/crop scalars each embedded to ``addition_time_embed_dim`` = 256 as
in the real model, so ComfyUI's ``y`` layout (1280 + 6*256 = 2816) applies with a narrower pooled part).

Tokenizer: CLIP's vocabulary layout (256 byte-chars, their ``</w>`` variants, the learned merges,
then ``<|startoftext|>``, ``<|endoftext|>``), so ``"!"`` is id 0 and the specials are the two last
ids. Padding follows ComfyUI: SD1.x and SDXL's clip_l pad with ``<|endoftext|>``
(``pad_with_end=True``); SD2's clip_h and SDXL's clip_g pad with id 0 = ``"!"``
(``pad_with_end=False``), which is also what the diffusers SD2/SDXL ``tokenizer_2`` configs say.
With ``N_MERGES`` = 400 the vocabulary has 914 ids: BOS = 912, EOS = 913 (real CLIP: 49406 /
49407). ComfyUI hard-codes 49406/49407 in ``SDClipModel(special_tokens=...)``; code that must
also run the tiny fixtures should take the ids from the tokenizer (or ``tiny_fixture.json``).

Text encoders (3 layers, 77 positions, 4 heads): clip_l hidden 32, quick_gelu (SD1.x, SDXL
``text_encoder``); clip_h hidden 48, gelu (SD2); clip_g hidden 64, gelu, projection 64
(``CLIPTextModelWithProjection``, SDXL ``text_encoder_2``). UNet: block_out_channels (32, 64),
1 layer per block, time embedding 128, 32x32 latent sample size. VAE: block_out_channels
(8, 16, 32, 32), 8 groups, mid-block attention, 256 px sample size.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

TINY_FAMILIES = ("sd15", "sd2-v", "sdxl")

#: Bumped whenever the recipe changes, so cached fixtures from an older recipe are not reused.
TINY_RECIPE_VERSION = 2

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
N_MERGES = 400

_UNET_OUT_GAIN = 1.6
_VAE_OUT_GAIN = 0.5

TINY_DIMS = {
    "sd15": {"context_dim": 32, "pooled_dim": None, "adm_in_channels": None,
             "latent_channels": 4, "vae_scale_factor": 8, "scaling_factor": 0.18215,
             "prediction_type": "epsilon", "unet_sample_size": 32},
    "sd2-v": {"context_dim": 48, "pooled_dim": None, "adm_in_channels": None,
              "latent_channels": 4, "vae_scale_factor": 8, "scaling_factor": 0.18215,
              "prediction_type": "v_prediction", "unet_sample_size": 32},
    "sdxl": {"context_dim": 96, "pooled_dim": 64, "adm_in_channels": 1600,
             "addition_time_embed_dim": 256,
             "latent_channels": 4, "vae_scale_factor": 8, "scaling_factor": 0.13025,
             "prediction_type": "epsilon", "unet_sample_size": 32},
}

# A small English corpus the BPE merges are learned from. Any text still tokenizes (the byte
# alphabet is complete); this only decides which common words get multi-character tokens.
_CORPUS = """
a photo of a cat sitting on a red chair in the garden, highly detailed, sharp focus.
a painting of a beautiful woman with long hair, portrait, oil on canvas, trending on artstation.
an astronaut riding a horse on the moon, digital art, concept art, cinematic lighting.
a red apple on a wooden table, still life, studio light, photograph, 4k, 8k, high quality.
a landscape with mountains and a river at sunset, clouds in the sky, green trees and flowers.
the city at night with neon lights and rain on the street, cyberpunk, masterpiece, best quality.
a dog and a cat playing in the snow, winter forest, soft light, depth of field, bokeh.
an old man reading a book by the window, warm colors, realistic, intricate, elegant.
a castle on a hill near the sea, fantasy, dramatic sky, volumetric light, octane render.
a bowl of fruit with oranges, bananas, grapes and lemons, black background, macro shot.
ugly, blurry, low quality, worst quality, bad anatomy, watermark, text, signature, deformed.
this is the house that jack built; these are the people who live there and their children.
what would you like to see? make it bright, simple, clean, colorful, and very small.
"""


#: The flow families (SD3.5, FLUX.1 dev / schnell), built by :mod:`.tiny_flow`.
TINY_FLOW_FAMILIES = ("sd3", "flux", "flux-schnell")


def _check_family(family: str) -> str:
    if family not in TINY_FAMILIES + TINY_FLOW_FAMILIES:
        raise ValueError(f"family: received {family!r}, expected one of {TINY_FAMILIES + TINY_FLOW_FAMILIES}")
    return family


# --------------------------------------------------------------------------------------------
# tokenizer


def _byte_map() -> dict[int, str]:
    """byte value -> its printable unicode stand-in (GPT-2/CLIP byte-level scheme)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
                 + list(range(ord("\xae"), ord("\xff") + 1)))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _byte_chars() -> list[str]:
    """The 256 byte stand-in characters in CLIP's vocabulary order (printable bytes first)."""
    return list(_byte_map().values())


def _learn_merges(corpus: str, n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on CLIP-style words (lowercase, letters / single digits / punctuation runs),
    each word ending in ``</w>``. Ties are broken by the smallest pair, so it is deterministic."""
    bmap = _byte_map()
    words = re.findall(r"[^\W\d_]+|\d|[^\s\w]+|_+", corpus.lower())
    freq: Counter = Counter()
    for w in words:
        chars = [bmap[b] for b in w.encode("utf-8")]
        chars[-1] = chars[-1] + "</w>"
        freq[tuple(chars)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for word, n in freq.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        new_freq: Counter = Counter()
        for word, n in freq.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_freq[tuple(out)] += n
        freq = new_freq
    return merges


def build_tiny_vocab(n_merges: int = N_MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-layout vocabulary and merges: byte chars, byte chars + ``</w>``, merges, BOS, EOS."""
    vocab, merges = _tiny_vocab(n_merges)
    return dict(vocab), list(merges)


@functools.lru_cache(maxsize=4)
def _tiny_vocab(n_merges: int) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    merges = tuple(_learn_merges(_CORPUS, n_merges))
    tokens = _byte_chars()
    tokens = tokens + [t + "</w>" for t in tokens]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:  # BPE can reach the same string twice; keep ids unique
            tokens.append(a + b)
            seen.add(a + b)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_clip_tokenizer(out_dir: str | os.PathLike, pad_with_end: bool = True) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json (CLIP format).

    ``pad_with_end=True``: pad with ``<|endoftext|>`` (SD1.x, SDXL clip_l); ``False``: pad with
    ``"!"`` = id 0 (SD2 clip_h, SDXL clip_g), matching ComfyUI's ``SDTokenizer(pad_with_end=...)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_tiny_vocab()
    pad = EOS_TOKEN if pad_with_end else "!"
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=False) + "\n",
                                    encoding="utf-8")
    # CLIP's merges.txt starts with a version line that every reader skips.
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": _special(BOS_TOKEN), "eos_token": _special(EOS_TOKEN),
               "pad_token": pad, "unk_token": _special(EOS_TOKEN)}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n",
                                                 encoding="utf-8")
    config = {
        "add_prefix_space": False,
        "bos_token": _special(BOS_TOKEN),
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
        "eos_token": _special(EOS_TOKEN),
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "pad_token": pad,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _special(EOS_TOKEN),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                               encoding="utf-8")
    return out


def tokenizer_ids(vocab: dict[str, int] | None = None) -> dict[str, int]:
    vocab = vocab if vocab is not None else build_tiny_vocab()[0]
    return {"bos": vocab[BOS_TOKEN], "eos": vocab[EOS_TOKEN], "bang": vocab["!"],
            "vocab_size": len(vocab)}


# --------------------------------------------------------------------------------------------
# weights


def _derived_seed(seed: int, component: str, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{component}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _init_weights(model, seed: int, component: str, out_gain: dict[str, float] | None = None) -> None:
    import torch

    out_gain = out_gain or {}
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if isinstance(module, norm_types):
                    p.fill_(1.0 if p_name == "weight" else 0.0)
                    continue
                g = torch.Generator().manual_seed(_derived_seed(seed, component, full))
                x = torch.randn(p.shape, generator=g, dtype=torch.float32)
                if isinstance(module, torch.nn.Embedding):
                    std = p.shape[-1] ** -0.5
                elif p.ndim >= 2:
                    std = p[0].numel() ** -0.5
                else:
                    std = 0.02
                std *= out_gain.get(mod_name, 1.0)
                p.copy_(x * std)


def _clip_config(family: str, which: str, ids: dict[str, int]):
    from transformers import CLIPTextConfig

    base = dict(vocab_size=ids["vocab_size"], max_position_embeddings=MAX_LENGTH,
                num_hidden_layers=3, num_attention_heads=4, bos_token_id=ids["bos"],
                eos_token_id=ids["eos"], layer_norm_eps=1e-5, attention_dropout=0.0,
                initializer_range=0.02, initializer_factor=1.0)
    if which == "l":  # CLIP ViT-L/14 text tower (SD1.x, SDXL text_encoder)
        return CLIPTextConfig(hidden_size=32, intermediate_size=128, projection_dim=32,
                              hidden_act="quick_gelu", pad_token_id=ids["eos"], **base)
    if which == "h":  # OpenCLIP ViT-H (SD2)
        return CLIPTextConfig(hidden_size=48, intermediate_size=192, projection_dim=48,
                              hidden_act="gelu", pad_token_id=ids["bang"], **base)
    if which == "g":  # OpenCLIP ViT-bigG (SDXL text_encoder_2, with projection)
        return CLIPTextConfig(hidden_size=64, intermediate_size=256, projection_dim=64,
                              hidden_act="gelu", pad_token_id=ids["bang"], **base)
    raise AssertionError(which)


def _unet(family: str):
    from diffusers import UNet2DConditionModel

    common = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64), norm_num_groups=32, center_input_sample=False,
                  flip_sin_to_cos=True, freq_shift=0, act_fn="silu")
    if family == "sd15":
        return UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_DIMS[family]["context_dim"], attention_head_dim=2, **common)
    if family == "sd2-v":
        return UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_DIMS[family]["context_dim"], attention_head_dim=(2, 4),
            use_linear_projection=True,
            upcast_attention=True, **common)
    if family == "sdxl":
        dims = TINY_DIMS["sdxl"]
        return UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=dims["context_dim"], attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2), use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=dims["addition_time_embed_dim"],
            projection_class_embeddings_input_dim=dims["adm_in_channels"], **common)
    raise AssertionError(family)


def _vae(family: str):
    from diffusers import AutoencoderKL

    n_levels = 4  # 3 downsamplings: latent = image / 8, as in real SD
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=256,
        down_block_types=("DownEncoderBlock2D",) * n_levels,
        up_block_types=("UpDecoderBlock2D",) * n_levels,
        block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
        act_fn="silu", scaling_factor=TINY_DIMS[family]["scaling_factor"],
        force_upcast=(family == "sdxl"))


def _scheduler(family: str):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", steps_offset=1)
    if family == "sd15":
        return PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False,
                             prediction_type="epsilon", **common)
    return EulerDiscreteScheduler(prediction_type=TINY_DIMS[family]["prediction_type"],
                                  timestep_spacing="leading", interpolation_type="linear",
                                  use_karras_sigmas=False, **common)


def _build_into(out: Path, family: str, seed: int) -> None:
    if family in TINY_FLOW_FAMILIES:
        from .tiny_flow import build_flow_into

        build_flow_into(out, family, seed)
        return
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, _ = build_tiny_vocab()
    ids = tokenizer_ids(vocab)
    tok_dir = out / "_tok_build"
    write_clip_tokenizer(tok_dir / "l", pad_with_end=True)
    write_clip_tokenizer(tok_dir / "bang", pad_with_end=False)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # construction-time init is overwritten, but keep it quiet
        unet = _unet(family)
        _init_weights(unet, seed, "unet", {"conv_out": _UNET_OUT_GAIN})
        vae = _vae(family)
        _init_weights(vae, seed, "vae", {"decoder.conv_out": _VAE_OUT_GAIN})
        scheduler = _scheduler(family)
        if family == "sdxl":
            te = CLIPTextModel(_clip_config(family, "l", ids))
            _init_weights(te, seed, "text_encoder")
            te2 = CLIPTextModelWithProjection(_clip_config(family, "g", ids))
            _init_weights(te2, seed, "text_encoder_2")
        else:
            te = CLIPTextModel(_clip_config(family, "l" if family == "sd15" else "h", ids))
            _init_weights(te, seed, "text_encoder")

    for m in (unet, vae, te) + ((te2,) if family == "sdxl" else ()):
        m.eval()

    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=te, text_encoder_2=te2,
            tokenizer=CLIPTokenizer.from_pretrained(tok_dir / "l"),
            tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir / "bang"),
            unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
            add_watermarker=False)
        tokenizers = {"tokenizer": True, "tokenizer_2": False}
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=te,
            tokenizer=CLIPTokenizer.from_pretrained(tok_dir / ("l" if family == "sd15" else "bang")),
            unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        tokenizers = {"tokenizer": family == "sd15"}
    from transformers.utils import logging as tf_logging

    bar = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()  # "Writing model shards" bars, one per text encoder
    try:
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        if bar:
            tf_logging.enable_progress_bar()
    shutil.rmtree(tok_dir)
    # Replace whatever transformers wrote for the tokenizers with CLIP's own file set, as in the
    # checkpoints users have (vocab.json + merges.txt, no tokenizer.json).
    for sub, pad_with_end in tokenizers.items():
        shutil.rmtree(out / sub)
        write_clip_tokenizer(out / sub, pad_with_end=pad_with_end)

    info = {"family": family, "seed": seed, "recipe_version": TINY_RECIPE_VERSION,
            "vocab_size": ids["vocab_size"], "bos_token_id": ids["bos"],
            "eos_token_id": ids["eos"],
            "pad_token_id": {sub: (ids["eos"] if pwe else ids["bang"])
                             for sub, pwe in tokenizers.items()},
            **TINY_DIMS[family]}
    (out / "tiny_fixture.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n",
                                           encoding="utf-8")


def _normalize_modes(root: Path) -> None:
    """mkdtemp makes 0700 and transformers writes weights 0600; give the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~umask)


# --------------------------------------------------------------------------------------------
# public API


def make_tiny_model(out_dir: str | os.PathLike, family: str = "sd15", seed: int = 0,
                    force: bool = False) -> Path:
    """Build a tiny random-weight checkpoint folder of ``family`` at ``out_dir`` and return it.

    Refuses a non-empty ``out_dir`` unless ``force``. The folder is built next to ``out_dir`` and
    renamed into place, so a reader never sees a half-written model.
    """
    _check_family(family)
    seed = int(seed)
    out = Path(out_dir).expanduser().absolute()
    if out.exists():
        if not out.is_dir():
            raise NotADirectoryError(f"out: received {out}, which is a file; expected a folder (absent or empty)")
        if any(out.iterdir()) and not force:
            raise FileExistsError(f"out: received {out}, which is not empty; expected an absent or empty folder "
                                  f"(pass force=True / --force to overwrite it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _build_into(tmp, family, seed)
        _normalize_modes(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_tiny_model_dir(family: str, seed: int = 0) -> Path:
    """Cache folder of a tiny fixture: ``$KSAMPLER_RT_CACHE`` (default ``~/.cache/ksampler-rt``)
    ``/tiny/<family>-seed<seed>-r<recipe version>``."""
    _check_family(family)
    root = os.environ.get("KSAMPLER_RT_CACHE") or os.path.join("~", ".cache", "ksampler-rt")
    return Path(root).expanduser() / "tiny" / f"{family}-seed{int(seed)}-r{TINY_RECIPE_VERSION}"


def ensure_tiny_model(family: str, seed: int = 0) -> Path:
    """Return the cached tiny fixture of ``family``, building it on first use (atomically)."""
    target = default_tiny_model_dir(family, seed)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _build_into(tmp, family, int(seed))
        _normalize_modes(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise  # not a lost race with another builder
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------
# tiny LoRA

TINY_LORA_NAME = "tiny-pixel-lora.safetensors"
_TE_HIDDEN = {"l": (32, 128), "h": (48, 192), "g": (64, 256)}  # (hidden, intermediate), see _clip_config


def _tiny_lora_layers(family: str) -> list[tuple[str, tuple, tuple]]:
    """[(kohya key stem, down shape, up shape)] of the tiny LoRA: every attention / feed-forward / proj
    layer and (LoCon) every resnet convolution of the UNet, and every text-encoder attention / MLP layer."""
    import torch

    rank = 4
    layers = []
    with torch.device("meta"):
        unet = _unet(family)
    for name, mod in unet.named_modules():
        if not any(part in name for part in ("attentions.", "resnets.")):
            continue
        if isinstance(mod, torch.nn.Linear):
            layers.append((f"lora_unet_{name.replace('.', '_')}", (rank, mod.in_features), (mod.out_features, rank)))
        elif isinstance(mod, torch.nn.Conv2d) and not name.endswith("conv_shortcut"):
            kh, kw = mod.kernel_size
            layers.append((f"lora_unet_{name.replace('.', '_')}", (rank, mod.in_channels, kh, kw),
                           (mod.out_channels, rank, 1, 1)))
    towers = {"sd15": [("lora_te", "l")], "sd2-v": [("lora_te", "h")],
              "sdxl": [("lora_te1", "l"), ("lora_te2", "g")]}[family]
    for prefix, which in towers:
        hidden, inter = _TE_HIDDEN[which]
        for i in range(3):
            base = f"{prefix}_text_model_encoder_layers_{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                layers.append((f"{base}_self_attn_{proj}", (rank, hidden), (hidden, rank)))
            layers.append((f"{base}_mlp_fc1", (rank, hidden), (inter, rank)))
            layers.append((f"{base}_mlp_fc2", (rank, inter), (hidden, rank)))
    return layers


def _write_safetensors(tensors: dict, path: Path, metadata: dict) -> None:
    """safetensors with sorted keys (the ``safetensors`` writer orders metadata at random)."""
    import struct

    import numpy as np

    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype="<f4")
        data = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def make_tiny_lora(out_file: str | os.PathLike, seed: int = 0, family: str = "sd15") -> Path:
    """Write a deterministic tiny LoRA for the tiny ``family`` model in the kohya key layout
    (``lora_unet_*`` / ``lora_te_*`` (SDXL ``lora_te1_*`` / ``lora_te2_*``), ``.lora_down.weight``,
    ``.lora_up.weight``, ``.alpha``; resnet convolutions as LoCon 3x3 pairs). Rank 4, alpha 2 (scale 0.5);
    down ~ N(0, 1/fan_in), up ~ N(0, 1/rank), so ``scale * up @ down`` moves each weight by about half its
    own spread. Same seed -> byte-identical file. Nothing is downloaded."""
    import numpy as np

    if family not in TINY_FAMILIES:  # no tiny LoRA for the flow families yet
        raise ValueError(f"family: received {family!r}, expected one of {TINY_FAMILIES}")
    out = Path(out_file).expanduser().absolute()
    tensors = {}
    for stem, down_shape, up_shape in _tiny_lora_layers(family):
        fan_in = int(np.prod(down_shape[1:]))
        g = np.random.default_rng(_derived_seed(int(seed), "lora", stem))
        tensors[f"{stem}.lora_down.weight"] = (g.standard_normal(down_shape) * fan_in ** -0.5).astype(np.float32)
        tensors[f"{stem}.lora_up.weight"] = (g.standard_normal(up_shape) * up_shape[1] ** -0.5).astype(np.float32)
        tensors[f"{stem}.alpha"] = np.array(2.0, dtype=np.float32)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
            "ss_base_model_version": {"sd15": "sd_v1", "sd2-v": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family],
            "ksampler_rt_tiny": json.dumps({"family": family, "seed": int(seed),
                                            "recipe_version": TINY_RECIPE_VERSION})}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        _write_safetensors(tensors, tmp, meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def ensure_tiny_lora(family: str = "sd15", seed: int = 0) -> Path:
    """The cached tiny LoRA of ``family`` (next to the cached tiny model), built on first use."""
    target = default_tiny_model_dir(family, seed).parent / f"{family}-seed{int(seed)}-r{TINY_RECIPE_VERSION}-lora" \
        / TINY_LORA_NAME
    if not target.is_file():
        make_tiny_lora(target, seed, family)
    return target


def write_single_file_checkpoint(diffusers_dir, out_file):
    """Not available: diffusers 0.42.1 ships only the original -> diffusers direction
    (``diffusers.loaders.single_file_utils``); the reverse lives in an unpackaged script."""
    raise NotImplementedError(
        "write_single_file_checkpoint: diffusers 0.42.1 has no diffusers -> original (LDM) "
        "conversion to reuse")
