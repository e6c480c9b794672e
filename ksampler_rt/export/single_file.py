"""Single-file checkpoints (original Stability/LDM key layout): family detection and conversion.

Conversion uses diffusers' single-file machinery (``from_single_file`` / its ``single_file_utils``
converters) with a LOCAL diffusers-format config folder: by default the one shipped for the detected
family in ``ksampler_rt/export/configs/<family>``; ``config_dir`` overrides it (a diffusers folder whose
configs describe the checkpoint, e.g. for non-standard sizes). Nothing is fetched from a hub.
"""
from __future__ import annotations

import os

from .errors import ExportError
from .families import SUPPORTED_FAMILIES, config_dir as packaged_config_dir, unsupported_family_message

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_SD1_PREFIX = "cond_stage_model.transformer."
OPENCLIP_SD2_PREFIX = "cond_stage_model.model."
CLIP_L_SDXL_PREFIX = "conditioner.embedders.0.transformer."
OPENCLIP_G_SDXL_PREFIX = "conditioner.embedders.1.model."
OPENCLIP_G_REFINER_PREFIX = "conditioner.embedders.0.model."

EXPECTED_KEYS_HINT = (
    f"expected Stable Diffusion keys: '{UNET_PREFIX}input_blocks.0.0.weight' (UNet), "
    f"'{VAE_PREFIX}decoder.conv_in.weight' (VAE) and a text encoder under '{CLIP_L_SD1_PREFIX}' (SD1.x), "
    f"'{OPENCLIP_SD2_PREFIX}' (SD2.x), '{CLIP_L_SDXL_PREFIX}' + '{OPENCLIP_G_SDXL_PREFIX}' (SDXL) or "
    f"'{OPENCLIP_G_REFINER_PREFIX}' (SDXL refiner)"
)

_OTHER_FAMILIES = {  # key fragment -> what it is (for a helpful "unsupported" message)
    "joint_blocks.": "SD3", "double_blocks.": "Flux", "single_blocks.": "Flux",
    "stage_c": "Stable Cascade", "transformer_blocks.0.attn.to_q": "a DiT model",
}


def _has_prefix(keys, prefix):
    return any(k.startswith(prefix) for k in keys)


def read_safetensors_header(path: str) -> dict:
    """{key: (dtype, shape)} from a safetensors header, without loading tensors."""
    import json
    import struct
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ExportError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > 100_000_000:
                raise ExportError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: not a safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return {k: (v.get("dtype"), tuple(v.get("shape", ()))) for k, v in header.items()}


def detect_family(keys_shapes: dict, family: str = "auto", prediction: str | None = None) -> tuple[str, str]:
    """Return (family, prediction 'eps'|'v') from checkpoint keys (and shapes)."""
    keys = list(keys_shapes)
    if not _has_prefix(keys, UNET_PREFIX):
        for frag, what in _OTHER_FAMILIES.items():
            if any(frag in k for k in keys):
                raise ExportError(unsupported_family_message(what, "checkpoint family") + f"; {EXPECTED_KEYS_HINT}")
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        raise ExportError(f"not a Stable Diffusion checkpoint (found e.g. {sample}); {EXPECTED_KEYS_HINT}")
    conv_in = keys_shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in[1]) == 4 and conv_in[1][1] != 4:
        raise ExportError(f"UNet input channels: received {conv_in[1][1]}, expected 4 (inpainting / "
                          f"instruct-pix2pix / depth models are not supported); "
                          + unsupported_family_message("inpainting", "checkpoint family"))
    if not _has_prefix(keys, VAE_PREFIX):
        raise ExportError(f"checkpoint has no VAE weights ('{VAE_PREFIX}...'); pass a full checkpoint "
                          f"(UNet-only files are not supported); {EXPECTED_KEYS_HINT}")
    has_adm = (UNET_PREFIX + "label_emb.0.0.weight") in keys_shapes
    if _has_prefix(keys, OPENCLIP_G_SDXL_PREFIX) and _has_prefix(keys, CLIP_L_SDXL_PREFIX) and has_adm:
        detected = "sdxl"
    elif _has_prefix(keys, OPENCLIP_G_REFINER_PREFIX) and has_adm:
        detected = "sdxl-refiner"
    elif _has_prefix(keys, OPENCLIP_SD2_PREFIX) and not has_adm:
        detected = "sd2"
    elif _has_prefix(keys, CLIP_L_SD1_PREFIX) and not has_adm:
        detected = "sd15"
    else:
        raise ExportError("could not tell the model family from the checkpoint's text-encoder keys; "
                          + unsupported_family_message("unknown", "checkpoint family") + f"; {EXPECTED_KEYS_HINT}")

    if family not in ("auto", None):
        if family not in SUPPORTED_FAMILIES:
            raise ExportError(unsupported_family_message(family))
        base = "sd2" if family in ("sd2", "sd2-v") else family
        if base != detected:
            raise ExportError(f"--family: received {family}, expected {detected}: the checkpoint does not match "
                              f"{family}, it looks like {detected}")
        if family == "sd2-v":
            if prediction == "eps":
                raise ExportError("--prediction: received eps with --family sd2-v, expected v (or no --prediction)")
            return "sd2-v", "v"
        if family == "sd2" and prediction == "v":
            return "sd2-v", "v"
        return family, prediction or "eps"

    if detected == "sd2":
        if prediction is None and "v_pred" in keys_shapes:  # ComfyUI writes this marker for v models
            prediction = "v"
        if prediction is None:
            raise ExportError("SD2.x checkpoint: the prediction type (eps or v) cannot be told from the weights; "
                              "pass --prediction v (SD 2.x 768-v models) or --prediction eps (512 base models), "
                              "or --family sd2-v / --family sd2")
        return ("sd2-v" if prediction == "v" else "sd2"), prediction
    if prediction == "v":  # e.g. v-pred SD1.5/SDXL fine-tunes: allowed, recorded
        return detected, "v"
    return detected, "eps"


def _load_state_dict(path: str) -> dict:
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types
        raise ExportError(f"{path}: cannot read safetensors file: {exc}") from None


def _clip_from_ldm(cls, sd: dict, cfg_root: str, subfolder: str, prefix: str, open_clip: bool, dtype):
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    config = cls.config_class.from_pretrained(cfg_root, subfolder=subfolder, local_files_only=True)
    model = cls(config)
    if open_clip:
        converted = convert_open_clip_checkpoint(model, sd, prefix=prefix)
    else:
        converted = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(prefix)}, prefix)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    result = model.load_state_dict(converted, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing:
        raise ExportError(f"text encoder ({prefix}...) is missing weights for {missing[:5]} "
                          f"(config {cfg_root}/{subfolder} does not match the checkpoint)")
    return model.to(dtype or torch.float32).eval()


def load_single_file(path: str, family: str = "auto", prediction: str | None = None,
                     config: str | None = None):
    """Convert an LDM-layout checkpoint into diffusers modules.

    Returns (family, prediction, modules) with modules = {"unet", "vae", "text_encoder"?, "text_encoder_2"?}.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    header = read_safetensors_header(path)
    family, prediction = detect_family(header, family, prediction)
    cfg_root = config or packaged_config_dir(family)
    if not os.path.isdir(cfg_root):
        raise ExportError(f"--config: received {cfg_root}, expected an existing diffusers-format folder: no such "
                          f"folder")
    sd = _load_state_dict(path)
    modules = {}
    try:
        modules["unet"] = UNet2DConditionModel.from_single_file(
            sd, config=cfg_root, subfolder="unet", local_files_only=True).to(torch.float32).eval()
        modules["vae"] = AutoencoderKL.from_single_file(
            sd, config=cfg_root, subfolder="vae", local_files_only=True).to(torch.float32).eval()
    except (RuntimeError, KeyError, IndexError) as exc:
        raise ExportError(f"converting {path} as {family} failed ({type(exc).__name__}: {str(exc)[:300]}); "
                          f"the checkpoint does not match the {family} config in {cfg_root}") from None
    if family in ("sd15",):
        modules["text_encoder"] = _clip_from_ldm(CLIPTextModel, sd, cfg_root, "text_encoder", CLIP_L_SD1_PREFIX, False, None)
    elif family in ("sd2", "sd2-v"):
        modules["text_encoder"] = _clip_from_ldm(CLIPTextModel, sd, cfg_root, "text_encoder", OPENCLIP_SD2_PREFIX, True, None)
    elif family == "sdxl":
        modules["text_encoder"] = _clip_from_ldm(CLIPTextModel, sd, cfg_root, "text_encoder", CLIP_L_SDXL_PREFIX, False, None)
        modules["text_encoder_2"] = _clip_from_ldm(CLIPTextModelWithProjection, sd, cfg_root, "text_encoder_2",
                                                   OPENCLIP_G_SDXL_PREFIX, True, None)
    elif family == "sdxl-refiner":
        modules["text_encoder_2"] = _clip_from_ldm(CLIPTextModelWithProjection, sd, cfg_root, "text_encoder_2",
                                                   OPENCLIP_G_REFINER_PREFIX, True, None)
    del sd
    return family, prediction, modules, cfg_root


def load_vae_file(path: str, family: str):
    """--vae: a diffusers VAE folder (config.json + weights) or a single-file VAE (.safetensors, LDM keys)."""
    import torch
    from diffusers import AutoencoderKL

    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ExportError(f"--vae {path}: folder has no config.json")
        return AutoencoderKL.from_pretrained(path, local_files_only=True).to(torch.float32).eval()
    if not os.path.isfile(path):
        raise ExportError(f"--vae {path}: no such file or folder")
    header = read_safetensors_header(path)
    if not any(k.startswith(("encoder.", "decoder.", VAE_PREFIX)) for k in header):
        raise ExportError(f"--vae {path}: not a VAE (expected 'decoder.conv_in.weight' or "
                          f"'{VAE_PREFIX}decoder.conv_in.weight')")
    sd = _load_state_dict(path)
    return AutoencoderKL.from_single_file(sd, config=packaged_config_dir(family), subfolder="vae",
                                          local_files_only=True).to(torch.float32).eval()
