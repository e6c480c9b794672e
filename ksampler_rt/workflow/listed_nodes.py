"""ComfyUI's standard loader nodes that ksampler-rt lists but cannot run.

ComfyUI's frontend (comfyui-frontend-package 1.27, ``modelToNodeStore.registerDefaults``) looks up
VAELoader, ControlNetLoader, UNETLoader, UpscaleModelLoader, StyleModelLoader, GLIGENLoader,
ImageOnlyCheckpointLoader, ... by name when it starts and breaks the model widgets when one is absent.
They are listed here with ComfyUI 0.3.64's inputs, outputs, categories and display names, with empty
model choices: this product runs exported engine checkpoints (and the flow families' separate
components: UNETLoader, DualCLIPLoader, VAELoader in :mod:`.flow_nodes`; ControlNetLoader in
:mod:`.controlnet_nodes`) only, so a prompt using one fails
validation with ``NodeSpec.unsupported`` as the reason instead of at run time.
"""
from __future__ import annotations

from .spec import Input, NodeSpec


def _empty() -> list[str]:
    return []


def _combo() -> Input:
    return Input("COMBO", options=_empty)


_WHY = ("ksampler-rt runs exported engine checkpoints only (CheckpointLoaderSimple, LoraLoader); "
        "it has no {what} to load")

_LISTED = (
    # class, inputs, outputs, category, display name, python module, what it would load
    ("CheckpointLoader", {"config_name": _combo(), "ckpt_name": _combo()}, ("MODEL", "CLIP", "VAE"),
     "advanced/loaders", "Load Checkpoint With Config (DEPRECATED)", "nodes", "checkpoint config"),
    ("ImageOnlyCheckpointLoader", {"ckpt_name": _combo()}, ("MODEL", "CLIP_VISION", "VAE"),
     "loaders/video_models", "Image Only Checkpoint Loader (img2vid model)", "comfy_extras.nodes_video_model",
     "image-only (img2vid) checkpoint"),
    ("CLIPLoader", {"clip_name": _combo(), "type": Input("COMBO", options=(
        "stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
        "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image")),
        "device": Input("COMBO", options=("default", "cpu"), optional=True)},
     ("CLIP",), "advanced/loaders", "Load CLIP", "nodes", "separate text encoder"),
    ("CLIPVisionLoader", {"clip_name": _combo()}, ("CLIP_VISION",), "loaders", "Load CLIP Vision", "nodes",
     "CLIP vision model"),
    ("StyleModelLoader", {"style_model_name": _combo()}, ("STYLE_MODEL",), "loaders", "Load Style Model", "nodes",
     "style model"),
    ("GLIGENLoader", {"gligen_name": _combo()}, ("GLIGEN",), "loaders", "GLIGENLoader", "nodes", "GLIGEN model"),
    ("UpscaleModelLoader", {"model_name": _combo()}, ("UPSCALE_MODEL",), "loaders", "Load Upscale Model",
     "comfy_extras.nodes_upscale_model", "upscale model"),
)


def listed_node_specs() -> dict[str, NodeSpec]:
    """The listed-only loaders by class name (``unsupported`` set on each)."""
    return {name: NodeSpec(name, inputs, outputs, category=category, display_name=display,
                           python_module=module, unsupported=_WHY.format(what=what),
                           deprecated=name == "CheckpointLoader")
            for name, inputs, outputs, category, display, module, what in _LISTED}
