"""Model families the exporter supports and their constants (torch-free)."""
from __future__ import annotations

import os

SUPPORTED_FAMILIES = ("sd15", "sd2", "sd2-v", "sdxl", "sdxl-refiner")
#: SD3 / SD3.5 and FLUX.1 dev / schnell: exported by :mod:`.flow_export` (transformer, T5, CLIP-L/G, 16-ch VAE).
FLOW_FAMILIES = ("sd3", "flux", "flux-schnell")
FAMILY_CHOICES = ("auto",) + SUPPORTED_FAMILIES + FLOW_FAMILIES

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

# Text encoders per family: (manifest name, diffusers subfolder, tokenizer subfolder, onnx file).
TEXT_ENCODERS = {
    "sd15": [("clip", "text_encoder", "tokenizer")],
    "sd2": [("clip", "text_encoder", "tokenizer")],
    "sd2-v": [("clip", "text_encoder", "tokenizer")],
    "sdxl": [("clip", "text_encoder", "tokenizer"), ("clip2", "text_encoder_2", "tokenizer_2")],
    "sdxl-refiner": [("clip2", "text_encoder_2", "tokenizer_2")],
}

# ComfyUI's pad_with_end per text encoder: SD1.x CLIP-L and SDXL clip_l pad with <|endoftext|>; SD2.x clip_h and
# SDXL clip_g pad with id 0 ("!"). Used when the export writes the tokenizer configs itself (single-file sources).
PAD_WITH_END = {"sd15": {"clip": True}, "sd2": {"clip": False}, "sd2-v": {"clip": False},
                "sdxl": {"clip": True, "clip2": False}, "sdxl-refiner": {"clip2": False}}

# Which ONNX text-encoder output ComfyUI uses as cross-attention context by default.
#   SD1.x: CLIP-L last layer after final_layer_norm.
#   SD2.x: OpenCLIP-H penultimate layer + final_layer_norm == the diffusers 23-layer model's last_hidden_state.
#   SDXL:  CLIP-L and OpenCLIP-bigG penultimate layer, raw (no final norm), concatenated on the feature axis.
CONTEXT_OUTPUT = {
    "sd15": {"clip": "last_hidden_state"},
    "sd2": {"clip": "last_hidden_state"},
    "sd2-v": {"clip": "last_hidden_state"},
    "sdxl": {"clip": "penultimate_hidden_state", "clip2": "penultimate_hidden_state"},
    "sdxl-refiner": {"clip2": "penultimate_hidden_state"},
}


def family_prediction(family: str) -> str:
    return "v" if family == "sd2-v" else "eps"


def is_sdxl(family: str) -> bool:
    return family in ("sdxl", "sdxl-refiner")


def config_dir(family: str) -> str:
    return os.path.join(CONFIGS_DIR, family)


def unsupported_family_message(what: str, name: str = "--family") -> str:
    """'NAME: received WHAT, expected one of <the supported families>' (``name``: the option, or what was
    detected, e.g. 'checkpoint family')."""
    return f"{name}: received {what!r}, expected one of {', '.join(SUPPORTED_FAMILIES + FLOW_FAMILIES)}"
