"""The supported ComfyUI nodes: names, inputs and outputs as in ComfyUI 0.3.64 (nodes.py).

Each node is a ``NodeSpec`` whose ``run(ctx, **inputs)`` returns the output tuple (output nodes
return a ``{"ui": ...}`` dict). ``ctx`` is the executor's :class:`ExecutionContext`: it resolves
checkpoints, reports progress, and holds the input/output folders.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..runtime import SAMPLER_NAMES, SCHEDULER_NAMES, ksampler, ksampler_advanced
from ..runtime.continuation import CONTINUATION_MODES
from . import images as imageio
from .latent_ops import CROP_METHODS, UPSCALE_METHODS, common_upscale
from .conditioning_nodes import CONDITIONING_NODE_SPECS
from .controlnet_nodes import controlnet_node_specs
from .flow_nodes import flow_node_specs
from .listed_nodes import listed_node_specs
from .spec import SEED_MAX, Input, NodeSpec

MAX_RESOLUTION = 16384


def _progress(ctx, node_id):
    def callback(step, total, x, denoised):
        ctx.check_interrupt()
        ctx.progress(node_id, step + 1, total, x, denoised)
    return callback


# -- loaders and conditioning ------------------------------------------------------------------
def checkpoint_loader_simple(ctx, node_id, ckpt_name):
    checkpoint = ctx.load_checkpoint(ckpt_name)
    return checkpoint.model, checkpoint.clip, checkpoint.vae


def _lora_loader(lora_path):
    def lora_loader(ctx, node_id, model, clip, lora_name, strength_model, strength_clip):
        from .lora import load_lora

        if lora_path is not None:
            path = lora_path(lora_name)
        else:
            from .registry import ModelRegistry

            path = ModelRegistry().lora(lora_name)
        return load_lora(model, clip, path, strength_model, strength_clip)
    return lora_loader


def _lora_loader_model_only(lora_path):
    load = _lora_loader(lora_path)

    def lora_loader_model_only(ctx, node_id, model, lora_name, strength_model):
        return (load(ctx, node_id, model, None, lora_name, strength_model, 0.0)[0],)
    return lora_loader_model_only


def clip_text_encode(ctx, node_id, text, clip):
    return (clip.encode(text),)


def clip_set_last_layer(ctx, node_id, clip, stop_at_clip_layer):
    return (clip.clip_layer(stop_at_clip_layer),)


# -- latents ------------------------------------------------------------------------------------
def empty_latent_image(ctx, node_id, width, height, batch_size):
    return ({"samples": np.zeros((batch_size, 4, height // 8, width // 8), np.float32)},)


def ksampler_node(ctx, node_id, model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                  latent_image, denoise):
    return (ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                     denoise, callback=_progress(ctx, node_id)),)


def ksampler_advanced_node(ctx, node_id, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler,
                           positive, negative, latent_image, start_at_step, end_at_step,
                           return_with_leftover_noise, continuation="comfyui"):
    return (ksampler_advanced(model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive,
                              negative, latent_image, start_at_step, end_at_step, return_with_leftover_noise,
                              continuation=continuation, callback=_progress(ctx, node_id)),)


def latent_upscale(ctx, node_id, samples, upscale_method, width, height, crop):
    if width == 0 and height == 0:
        return (samples,)
    s = dict(samples)
    h_in, w_in = samples["samples"].shape[-2:]
    if width == 0:
        height = max(64, height)
        width = max(64, round(w_in * height / h_in))
    elif height == 0:
        width = max(64, width)
        height = max(64, round(h_in * width / w_in))
    else:
        width, height = max(64, width), max(64, height)
    s["samples"] = common_upscale(samples["samples"], width // 8, height // 8, upscale_method, crop)
    return (s,)


def repeat_latent_batch(ctx, node_id, samples, amount):
    s = dict(samples)
    s_in = samples["samples"]
    s["samples"] = np.tile(s_in, (amount,) + (1,) * (s_in.ndim - 1))
    if "batch_index" in s:
        offset = max(s["batch_index"]) - min(s["batch_index"]) + 1
        s["batch_index"] = s["batch_index"] + [x + i * offset for i in range(1, amount) for x in s["batch_index"]]
    return (s,)


def latent_from_batch(ctx, node_id, samples, batch_index, length):
    s = dict(samples)
    s_in = samples["samples"]
    batch_index = min(s_in.shape[0] - 1, batch_index)
    length = min(s_in.shape[0] - batch_index, length)
    s["samples"] = s_in[batch_index:batch_index + length].copy()
    if "batch_index" not in samples:
        s["batch_index"] = list(range(batch_index, batch_index + length))
    else:
        s["batch_index"] = samples["batch_index"][batch_index:batch_index + length]
    return (s,)


# -- VAE and images ------------------------------------------------------------------------------
def vae_decode(ctx, node_id, samples, vae):
    return (vae.decode(samples["samples"]),)


def vae_encode(ctx, node_id, pixels, vae):
    return ({"samples": vae.encode(pixels[..., :3])},)


def load_image(ctx, node_id, image):
    return imageio.load_image(ctx.input_path(image), ctx.max_image_pixels)


def save_image(ctx, node_id, images, filename_prefix):
    results = imageio.save_images(images, ctx.output_dir, filename_prefix, prompt=ctx.prompt,
                                  extra_pnginfo=ctx.extra_pnginfo)
    return {"ui": {"images": results}}


def save_image_websocket(ctx, node_id, images):
    """ComfyUI's SaveImageWebsocket (custom_nodes/websocket_image_save.py): each image goes to the client as
    a binary PNG frame (event 1, format 2) after a progress message, and nothing is written to disk."""
    images = np.asarray(images)
    for step, image in enumerate(images):
        ctx.progress(node_id, step, len(images))
        ctx.send_binary(imageio.encode_png_frame(imageio.to_uint8(image)))
    return {"ui": {}}


def preview_image(ctx, node_id, images):
    results = imageio.save_images(images, ctx.temp_dir, "ComfyUI_temp_preview", image_type="temp", compress_level=1)
    return {"ui": {"images": results}}


def _sampler_inputs() -> dict:
    return {
        "cfg": Input("FLOAT", 8.0, 0.0, 100.0, 0.1, 0.01),
        "sampler_name": Input("COMBO", options=SAMPLER_NAMES),
        "scheduler": Input("COMBO", options=SCHEDULER_NAMES),
        "positive": Input("CONDITIONING"),
        "negative": Input("CONDITIONING"),
        "latent_image": Input("LATENT"),
    }


def build_node_specs(checkpoint_names, input_images, lora_names=None, lora_path=None,
                     component_names=None, controlnet_names=None) -> dict[str, NodeSpec]:
    """The node table; ``checkpoint_names`` / ``input_images`` / ``lora_names`` list the COMBO values on
    demand; ``lora_path(name) -> Path`` resolves a ``lora_name`` (default: the default model registry);
    ``component_names(folder)`` lists ``diffusion_models`` / ``text_encoders`` / ``vae`` for the separate
    loaders of the flow families (UNETLoader, DualCLIPLoader, TripleCLIPLoader, VAELoader);
    ``controlnet_names()`` lists the ControlNetLoader / DiffControlNetLoader choices."""
    s = _sampler_inputs()
    specs = [
        NodeSpec("CheckpointLoaderSimple", {"ckpt_name": Input("COMBO", options=checkpoint_names)},
                 ("MODEL", "CLIP", "VAE"), category="loaders", run=checkpoint_loader_simple),
        NodeSpec("LoraLoader", {"model": Input("MODEL"), "clip": Input("CLIP"),
                                "lora_name": Input("COMBO", options=lora_names or (lambda: [])),
                                "strength_model": Input("FLOAT", 1.0, -100.0, 100.0, 0.01),
                                "strength_clip": Input("FLOAT", 1.0, -100.0, 100.0, 0.01)},
                 ("MODEL", "CLIP"), category="loaders", run=_lora_loader(lora_path)),
        NodeSpec("LoraLoaderModelOnly", {"model": Input("MODEL"),
                                         "lora_name": Input("COMBO", options=lora_names or (lambda: [])),
                                         "strength_model": Input("FLOAT", 1.0, -100.0, 100.0, 0.01)},
                 ("MODEL",), category="loaders", run=_lora_loader_model_only(lora_path)),
        NodeSpec("CLIPTextEncode", {"text": Input("STRING", multiline=True), "clip": Input("CLIP")},
                 ("CONDITIONING",), category="conditioning", run=clip_text_encode),
        NodeSpec("CLIPSetLastLayer", {"clip": Input("CLIP"),
                                      "stop_at_clip_layer": Input("INT", -1, -24, -1, 1)},
                 ("CLIP",), category="conditioning", run=clip_set_last_layer),
        NodeSpec("EmptyLatentImage", {"width": Input("INT", 512, 16, MAX_RESOLUTION, 8),
                                      "height": Input("INT", 512, 16, MAX_RESOLUTION, 8),
                                      "batch_size": Input("INT", 1, 1, 4096)},
                 ("LATENT",), category="latent", run=empty_latent_image),
        NodeSpec("KSampler", {"model": Input("MODEL"),
                              "seed": Input("INT", 0, 0, SEED_MAX, control_after_generate=True),
                              "steps": Input("INT", 20, 1, 10000),
                              **s, "denoise": Input("FLOAT", 1.0, 0.0, 1.0, 0.01)},
                 ("LATENT",), category="sampling", run=ksampler_node),
        NodeSpec("KSamplerAdvanced", {"model": Input("MODEL"),
                                      "add_noise": Input("COMBO", options=("enable", "disable")),
                                      "noise_seed": Input("INT", 0, 0, SEED_MAX, control_after_generate=True),
                                      "steps": Input("INT", 20, 1, 10000),
                                      **s,
                                      "start_at_step": Input("INT", 0, 0, 10000),
                                      "end_at_step": Input("INT", 10000, 0, 10000),
                                      "return_with_leftover_noise": Input("COMBO", options=("disable", "enable")),
                                      # ksampler-rt's own: "exact" joins windows bit for bit (ComfyUI ignores it)
                                      "continuation": Input("COMBO", "comfyui", options=CONTINUATION_MODES,
                                                            optional=True)},
                 ("LATENT",), category="sampling", run=ksampler_advanced_node),
        NodeSpec("VAEDecode", {"samples": Input("LATENT"), "vae": Input("VAE")}, ("IMAGE",),
                 category="latent", run=vae_decode),
        NodeSpec("VAEEncode", {"pixels": Input("IMAGE"), "vae": Input("VAE")}, ("LATENT",),
                 category="latent", run=vae_encode),
        NodeSpec("LoadImage", {"image": Input("COMBO", options=input_images)}, ("IMAGE", "MASK"),
                 category="image", run=load_image),
        NodeSpec("SaveImage", {"images": Input("IMAGE"), "filename_prefix": Input("STRING", "ComfyUI")}, (),
                 output_node=True, category="image", run=save_image),
        NodeSpec("PreviewImage", {"images": Input("IMAGE")}, (), output_node=True, category="image",
                 run=preview_image),
        NodeSpec("SaveImageWebsocket", {"images": Input("IMAGE")}, (), output_node=True, category="api/image",
                 python_module="custom_nodes.websocket_image_save", run=save_image_websocket),
        NodeSpec("LatentUpscale", {"samples": Input("LATENT"),
                                   "upscale_method": Input("COMBO", options=UPSCALE_METHODS),
                                   "width": Input("INT", 512, 0, MAX_RESOLUTION, 8),
                                   "height": Input("INT", 512, 0, MAX_RESOLUTION, 8),
                                   "crop": Input("COMBO", options=CROP_METHODS)},
                 ("LATENT",), category="latent", run=latent_upscale),
        NodeSpec("RepeatLatentBatch", {"samples": Input("LATENT"), "amount": Input("INT", 1, 1, 64)},
                 ("LATENT",), category="latent/batch", run=repeat_latent_batch),
        NodeSpec("LatentFromBatch", {"samples": Input("LATENT"), "batch_index": Input("INT", 0, 0, 63),
                                     "length": Input("INT", 1, 1, 64)},
                 ("LATENT",), category="latent/batch", run=latent_from_batch),
    ]
    table = {spec.class_type: spec for spec in specs}
    table.update(CONDITIONING_NODE_SPECS)
    table.update(flow_node_specs(component_names))
    table.update(controlnet_node_specs(controlnet_names))
    for name, spec in listed_node_specs().items():
        table.setdefault(name, spec)
    return {name: replace(spec, display_name=spec.display_name or DISPLAY_NAMES.get(name, ""))
            for name, spec in table.items()}


# ComfyUI 0.3.64's NODE_DISPLAY_NAME_MAPPINGS (nodes.py) for the nodes served here; the frontend shows these.
DISPLAY_NAMES = {
    "KSampler": "KSampler", "KSamplerAdvanced": "KSampler (Advanced)",
    "CheckpointLoaderSimple": "Load Checkpoint", "LoraLoader": "Load LoRA",
    "CLIPTextEncode": "CLIP Text Encode (Prompt)", "CLIPSetLastLayer": "CLIP Set Last Layer",
    "ConditioningCombine": "Conditioning (Combine)",
    "VAEDecode": "VAE Decode", "VAEEncode": "VAE Encode", "EmptyLatentImage": "Empty Latent Image",
    "LatentUpscale": "Upscale Latent", "LatentFromBatch": "Latent From Batch",
    "RepeatLatentBatch": "Repeat Latent Batch",
    "SaveImage": "Save Image", "PreviewImage": "Preview Image", "LoadImage": "Load Image",
}
