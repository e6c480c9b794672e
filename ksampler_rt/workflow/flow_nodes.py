"""The nodes of ComfyUI's SD3 / SD3.5 and FLUX.1 graphs, with ComfyUI 0.3.64's names, inputs and behaviour.

* ``UNETLoader`` (nodes.py, "Load Diffusion Model"), ``DualCLIPLoader`` (type flux / sd3),
  ``TripleCLIPLoader`` (comfy_extras/nodes_sd3.py), ``VAELoader`` ("Load VAE"): separate components from
  the registry's ``diffusion_models/``, ``text_encoders/`` and ``vae/`` folders, loaded through
  ``ctx.load_component(folder, names, options)``;
* ``CLIPTextEncodeFlux``, ``FluxGuidance`` (comfy_extras/nodes_flux.py), ``CLIPTextEncodeSD3``,
  ``EmptySD3LatentImage`` (nodes_sd3.py);
* ``ModelSamplingSD3`` / ``ModelSamplingFlux`` (comfy_extras/nodes_model_advanced.py): a copy of the MODEL
  with the family's flow model sampling at another shift (ComfyUI's ``add_object_patch("model_sampling")``).
"""
from __future__ import annotations

import copy

import numpy as np

from ..runtime.model_sampling import FAMILIES, ModelSamplingDiscreteFlow, ModelSamplingFlux, flux_shift
from .conditioning_nodes import set_values
from .flow_checkpoint import Component
from .flow_text import encode_flux, encode_sd3
from .spec import Input, NodeSpec

MAX_RESOLUTION = 16384
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
DUAL_CLIP_TYPES = ("sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image")  # ComfyUI's list
RUNNABLE_DUAL_CLIP_TYPES = ("sd3", "flux")


def _load(ctx, folder: str, names: tuple, **options):
    loader = getattr(ctx, "load_component", None)
    if loader is None:
        raise ValueError(f"{folder}: this runner loads checkpoints only (no separate {folder} loader)")
    loaded = loader(folder, names, options)
    return loaded.value if isinstance(loaded, Component) else loaded  # the pipeline keeps the engines


def unet_loader(ctx, node_id, unet_name, weight_dtype):
    # weight_dtype picks torch's storage precision in ComfyUI; an engine's precision is fixed at export
    return (_load(ctx, "diffusion_models", (unet_name,), weight_dtype=weight_dtype),)


def dual_clip_loader(ctx, node_id, clip_name1, clip_name2, type, device="default"):  # noqa: A002 -- ComfyUI's name
    if type not in RUNNABLE_DUAL_CLIP_TYPES:
        raise ValueError(f"type: received {type!r}, expected one of {RUNNABLE_DUAL_CLIP_TYPES} (SDXL's text "
                         "encoders come with its checkpoint)")
    return (_load(ctx, "text_encoders", (clip_name1, clip_name2), type=type),)


def triple_clip_loader(ctx, node_id, clip_name1, clip_name2, clip_name3):
    return (_load(ctx, "text_encoders", (clip_name1, clip_name2, clip_name3), type="sd3"),)


def vae_loader(ctx, node_id, vae_name):
    return (_load(ctx, "vae", (vae_name,)),)


def clip_text_encode_flux(ctx, node_id, clip, clip_l, t5xxl, guidance):
    return (encode_flux(clip, clip_l, t5xxl, guidance),)


def clip_text_encode_sd3(ctx, node_id, clip, clip_l, clip_g, t5xxl, empty_padding):
    return (encode_sd3(clip, clip_l, clip_g, t5xxl, empty_padding),)


def flux_guidance(ctx, node_id, conditioning, guidance):
    return (set_values(conditioning, {"guidance": guidance}),)


def empty_sd3_latent_image(ctx, node_id, width, height, batch_size):
    return ({"samples": np.zeros((batch_size, 16, height // 8, width // 8), np.float32)},)


FLOW_MODEL_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.is_flow)


def with_sampling(model, model_sampling, node: str):
    """A copy of ``model`` with another flow model sampling (ComfyUI's ``add_object_patch("model_sampling")``;
    the network and everything else shared). ComfyUI patches any MODEL; here any flow-family MODEL (on an SD
    MODEL it would switch an eps / v network to the CONST prediction, which this runtime refuses by name)."""
    family = getattr(getattr(model, "family", None), "name", None)
    if family not in FLOW_MODEL_FAMILIES:
        raise ValueError(f"model: received a {family or type(model).__name__} model, expected a model of a flow "
                         f"family ({', '.join(FLOW_MODEL_FAMILIES)}) for {node}")
    patched = copy.copy(model)
    patched.model_sampling = model_sampling
    return patched


def model_sampling_sd3(ctx, node_id, model, shift):
    """comfy_extras/nodes_model_advanced.py ModelSamplingSD3: ModelSamplingDiscreteFlow(shift, multiplier=1000)
    + CONST, whatever the model's own sampling was (on FLUX.1 too, as in ComfyUI)."""
    return (with_sampling(model, ModelSamplingDiscreteFlow(shift=_positive(shift), multiplier=1000.0),
                          "ModelSamplingSD3"),)


def model_sampling_flux(ctx, node_id, model, max_shift, base_shift, width, height):
    """ModelSamplingFlux: ModelSamplingFlux(the shift computed from the size) + CONST, on any flow model."""
    shift = flux_shift(width, height, max_shift, base_shift)
    return (with_sampling(model, ModelSamplingFlux(shift=_positive(shift)), "ModelSamplingFlux"),)


def _positive(shift) -> float:
    if not float(shift) > 0:
        raise ValueError(f"shift: received {shift!r}, expected a number > 0")
    return float(shift)


def _names(component_names, folder):
    return lambda: list(component_names(folder)) if component_names else []


def flow_node_specs(component_names=None) -> dict[str, NodeSpec]:
    """The flow-family nodes; ``component_names(folder)`` lists a registry folder's entries for the COMBOs."""
    unets, encoders, vaes = (_names(component_names, f) for f in ("diffusion_models", "text_encoders", "vae"))
    text = Input("STRING", multiline=True)
    guidance = Input("FLOAT", 3.5, 0.0, 100.0, 0.1)
    extras_sd3, extras_flux = "comfy_extras.nodes_sd3", "comfy_extras.nodes_flux"
    specs = (
        NodeSpec("UNETLoader", {"unet_name": Input("COMBO", options=unets),
                                "weight_dtype": Input("COMBO", options=WEIGHT_DTYPES)},
                 ("MODEL",), category="advanced/loaders", display_name="Load Diffusion Model", run=unet_loader),
        NodeSpec("DualCLIPLoader", {"clip_name1": Input("COMBO", options=encoders),
                                    "clip_name2": Input("COMBO", options=encoders),
                                    "type": Input("COMBO", options=DUAL_CLIP_TYPES),
                                    "device": Input("COMBO", options=("default", "cpu"), optional=True)},
                 ("CLIP",), category="advanced/loaders",
                 description="[Recipes]\n\nsdxl: clip-l, clip-g\nsd3: clip-l, clip-g / clip-l, t5 / clip-g, t5\n"
                             "flux: clip-l, t5\nhidream: at least one of t5 or llama, recommended t5 and llama\n"
                             "hunyuan_image: qwen2.5vl 7b and byt5 small",
                 run=dual_clip_loader),
        NodeSpec("TripleCLIPLoader", {"clip_name1": Input("COMBO", options=encoders),
                                      "clip_name2": Input("COMBO", options=encoders),
                                      "clip_name3": Input("COMBO", options=encoders)},
                 ("CLIP",), category="advanced/loaders", description="[Recipes]\n\nsd3: clip-l, clip-g, t5",
                 python_module=extras_sd3, run=triple_clip_loader),
        NodeSpec("VAELoader", {"vae_name": Input("COMBO", options=vaes)}, ("VAE",), category="loaders",
                 display_name="Load VAE", run=vae_loader),
        NodeSpec("CLIPTextEncodeFlux", {"clip": Input("CLIP"), "clip_l": text, "t5xxl": text, "guidance": guidance},
                 ("CONDITIONING",), category="advanced/conditioning/flux", python_module=extras_flux,
                 run=clip_text_encode_flux),
        NodeSpec("FluxGuidance", {"conditioning": Input("CONDITIONING"), "guidance": guidance},
                 ("CONDITIONING",), category="advanced/conditioning/flux", python_module=extras_flux,
                 run=flux_guidance),
        NodeSpec("CLIPTextEncodeSD3", {"clip": Input("CLIP"), "clip_l": text, "clip_g": text, "t5xxl": text,
                                       "empty_padding": Input("COMBO", options=("none", "empty_prompt"))},
                 ("CONDITIONING",), category="advanced/conditioning", python_module=extras_sd3,
                 run=clip_text_encode_sd3),
        NodeSpec("EmptySD3LatentImage", {"width": Input("INT", 1024, 16, MAX_RESOLUTION, 16),
                                         "height": Input("INT", 1024, 16, MAX_RESOLUTION, 16),
                                         "batch_size": Input("INT", 1, 1, 4096)},
                 ("LATENT",), category="latent/sd3", python_module=extras_sd3, run=empty_sd3_latent_image),
        NodeSpec("ModelSamplingSD3", {"model": Input("MODEL"), "shift": Input("FLOAT", 3.0, 0.0, 100.0, 0.01)},
                 ("MODEL",), category="advanced/model", python_module="comfy_extras.nodes_model_advanced",
                 run=model_sampling_sd3),
        NodeSpec("ModelSamplingFlux", {"model": Input("MODEL"),
                                       "max_shift": Input("FLOAT", 1.15, 0.0, 100.0, 0.01),
                                       "base_shift": Input("FLOAT", 0.5, 0.0, 100.0, 0.01),
                                       "width": Input("INT", 1024, 16, MAX_RESOLUTION, 8),
                                       "height": Input("INT", 1024, 16, MAX_RESOLUTION, 8)},
                 ("MODEL",), category="advanced/model", python_module="comfy_extras.nodes_model_advanced",
                 run=model_sampling_flux),
    )
    return {spec.class_type: spec for spec in specs}
