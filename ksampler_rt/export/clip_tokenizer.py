"""CLIP tokenizer files for single-file checkpoints (which carry none). Torch-free, never downloads.

Every CLIP tower of SD1.x/SD2.x/SDXL uses the same BPE vocabulary (``vocab.json`` + ``merges.txt``, 49408 ids);
they differ only in the padding token (ComfyUI ``pad_with_end``): SD1.x CLIP-L and SDXL's clip_l pad with
``<|endoftext|>``, SD2.x's clip_h and SDXL's clip_g pad with id 0 (``"!"``). So one folder serves every tower and
the export writes each tower's ``tokenizer_config.json`` / ``special_tokens_map.json`` itself.

Where the files come from, first hit wins (see :func:`find_clip_tokenizer`):

1. ``--tokenizer DIR`` (a folder with ``vocab.json`` and ``merges.txt``);
2. the ComfyUI installation the checkpoint lives in: an ancestor folder of the checkpoint holding
   ``comfy/sd1_tokenizer/`` (``<ComfyUI>/models/checkpoints/x.safetensors`` -> ``<ComfyUI>/comfy/sd1_tokenizer``);
3. the local Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``), files already on disk only.
"""
from __future__ import annotations

import json
import os
import shutil

from .errors import ExportError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD0_TOKEN = "!"  # id 0 in CLIP's vocabulary
TOKENIZER_FILES = ("vocab.json", "merges.txt")

# Hugging Face cache: (repo id, folder inside the repo) holding CLIP's vocab.json + merges.txt.
HF_CANDIDATES = (
    ("openai/clip-vit-large-patch14", ""),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer/"),
    ("runwayml/stable-diffusion-v1-5", "tokenizer/"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer/"),
    ("stabilityai/stable-diffusion-2-1", "tokenizer/"),
    ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", ""),
)

HOW_TO = ("pass --tokenizer DIR (a folder with CLIP's vocab.json and merges.txt, e.g. ComfyUI's "
          "comfy/sd1_tokenizer or a diffusers model's tokenizer/), keep the checkpoint inside a ComfyUI "
          "installation (<ComfyUI>/models/checkpoints/, whose comfy/sd1_tokenizer/ is then used), or have "
          "openai/clip-vit-large-patch14 in the local Hugging Face cache (HF_HUB_CACHE); "
          "--no-tokenizer exports without tokenizer files (the workflow runner cannot encode prompts then)")


def has_tokenizer_files(folder) -> bool:
    return bool(folder) and all(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def check_tokenizer_dir(folder: str, what: str) -> str:
    """A usable CLIP tokenizer folder, or ExportError naming what is wrong."""
    if not os.path.isdir(folder):
        raise ExportError(f"{what}: received {folder}, expected a folder with CLIP's vocab.json and merges.txt: no "
                          f"such folder")
    missing = [f for f in TOKENIZER_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise ExportError(f"{what}: received {folder}, expected a folder with CLIP's vocab.json and merges.txt: "
                          f"missing {', '.join(missing)}")
    vocab = read_vocab(folder, what)
    absent = [t for t in (BOS_TOKEN, EOS_TOKEN, PAD0_TOKEN) if t not in vocab]
    if absent:
        raise ExportError(f"{what}: received {folder}, whose vocab.json has no {absent} token; expected a CLIP "
                          f"tokenizer")
    return os.path.abspath(folder)


def read_vocab(folder: str, what: str = "tokenizer") -> dict:
    try:
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{what} {folder}: cannot read vocab.json ({exc})") from None
    if not isinstance(vocab, dict):
        raise ExportError(f"{what}: received {folder}, whose vocab.json is not a token -> id mapping; expected a "
                          f"CLIP tokenizer")
    return vocab


def find_comfyui_tokenizer(checkpoint: str) -> str | None:
    """``<ComfyUI>/comfy/sd1_tokenizer`` for a checkpoint anywhere below a ComfyUI folder (symlinks followed too)."""
    seen = set()
    for start in (os.path.abspath(checkpoint), os.path.realpath(checkpoint)):
        d = os.path.dirname(start)
        while d not in seen:
            seen.add(d)
            cand = os.path.join(d, "comfy", "sd1_tokenizer")
            if has_tokenizer_files(cand):
                return cand
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent
    return None


def hf_cache_dir() -> str:
    """The hub cache folder, read from the environment at call time (huggingface_hub reads it at import)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return os.path.expanduser(env)
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def find_hf_cache_tokenizer() -> str | None:
    """A CLIP tokenizer folder already in the local Hugging Face cache (no network access of any kind)."""
    cache = hf_cache_dir()
    if not os.path.isdir(cache):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo, sub in HF_CANDIDATES:
        paths = []
        for f in TOKENIZER_FILES:
            p = try_to_load_from_cache(repo, sub + f, cache_dir=cache)
            if not isinstance(p, str) or not os.path.isfile(p):
                break
            paths.append(p)
        else:
            folder = os.path.dirname(paths[0])
            if os.path.dirname(paths[1]) == folder:
                return folder
    return None


def find_clip_tokenizer(checkpoint: str, tokenizer: str | None = None) -> tuple[str, str]:
    """(folder, description of where it came from) or ExportError listing the three ways to provide one."""
    if tokenizer:
        return check_tokenizer_dir(tokenizer, "--tokenizer"), f"--tokenizer {os.path.abspath(tokenizer)}"
    d = find_comfyui_tokenizer(checkpoint)
    if d:
        return check_tokenizer_dir(d, "ComfyUI tokenizer"), f"ComfyUI installation ({d})"
    d = find_hf_cache_tokenizer()
    if d:
        return check_tokenizer_dir(d, "Hugging Face cache tokenizer"), f"Hugging Face cache ({d})"
    raise ExportError(f"{checkpoint}: a single-file checkpoint carries no tokenizer files and none were found "
                      f"locally; {HOW_TO}")


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_clip_tokenizer_dir(src: str, dst: str, pad_with_end: bool, max_length: int = 77) -> None:
    """Copy vocab.json + merges.txt from ``src`` and write the CLIP tokenizer configs for one tower."""
    os.makedirs(dst)
    for f in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    pad = EOS_TOKEN if pad_with_end else PAD0_TOKEN
    special = {"bos_token": _special(BOS_TOKEN), "eos_token": _special(EOS_TOKEN), "pad_token": pad,
               "unk_token": _special(EOS_TOKEN)}
    config = dict(special, add_prefix_space=False, clean_up_tokenization_spaces=False, do_lower_case=True,
                  errors="replace", model_max_length=max_length, tokenizer_class="CLIPTokenizer")
    for name, obj in (("special_tokens_map.json", special), ("tokenizer_config.json", config)):
        with open(os.path.join(dst, name), "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.write("\n")
