"""ComfyUI 0.3.64's ControlNet nodes and the image nodes a ControlNet graph uses (nodes.py).

* ``ControlNetLoader`` / ``DiffControlNetLoader``: a CONTROL_NET is the network callable the runner's
  ``ctx.load_controlnet(name)`` returns (attributes ``family``, ``kind``; see runtime/control.py for its
  call contract). DiffControlNetLoader refuses one made for another family than its MODEL's.
* ``ControlNetApply`` (nodes.py ControlNetApply, "Apply ControlNet (OLD)"): on one conditioning; each entry
  gets its own application chained onto the entry's previous one, marked ``control_apply_to_uncond`` --
  at sampling time ComfyUI (and the runtime) hands it to the negative entries too.
* ``ControlNetApplyAdvanced`` ("Apply ControlNet"): on positive and negative, with a start/end percent
  window; entries that had the same previous control share one application (so cond and uncond stay
  batchable), as ComfyUI's ``cnets`` dict does. ``vae`` is accepted and unused: ComfyUI needs it only
  for ControlNets with a latent format (SD3 / Flux families), which this runtime does not run.
* ``strength == 0`` returns the conditioning unchanged (both nodes).
* The hint is the IMAGE moved to channels first; at sampling time it is resized to the latent's pixel
  size with ComfyUI's ControlNet resize, ``common_upscale(hint, w, h, "nearest-exact", "center")``.
* ``ImageScale`` / ``ImageScaleBy`` / ``ImageInvert`` ("Upscale Image", "Upscale Image By", "Invert
  Image"), lanczos as ComfyUI does it (comfy/utils.py ``lanczos``: PIL on 8-bit pixels).
"""
from __future__ import annotations

import numpy as np

from ..runtime.control import ControlNet, check_network_family
from .latent_ops import CROP_METHODS, center_crop, common_upscale
from .spec import Input, NodeSpec

MAX_RESOLUTION = 16384
IMAGE_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CONTROL_KINDS = ("controlnet", "t2i_adapter")


def resize_hint(hint: np.ndarray, width: int, height: int) -> np.ndarray:
    """comfy/controlnet.py ControlNet.get_control: ``common_upscale(.., "nearest-exact", "center")``."""
    return common_upscale(hint, width, height, "nearest-exact", "center")


def _load(ctx, name: str):
    loader = getattr(ctx, "load_controlnet", None)
    if loader is None:
        raise ValueError(f"control_net_name: received {name!r}, but this runner has no ControlNet loader "
                         "(ctx.load_controlnet)")
    net = loader(name)
    kind = getattr(net, "kind", "controlnet")
    if not callable(net) or kind not in CONTROL_KINDS:
        raise ValueError(f"control_net_name: {name!r} loaded as {type(net).__name__} (kind {kind!r}), expected a "
                         f"callable ControlNet of kind {' or '.join(CONTROL_KINDS)}")
    return net


def controlnet_loader(ctx, node_id, control_net_name):
    return (_load(ctx, control_net_name),)


def diff_controlnet_loader(ctx, node_id, model, control_net_name):
    net = _load(ctx, control_net_name)
    family = getattr(model, "family", None)
    if family is not None:  # also checked at sampling, for MODELs that do not say
        check_network_family(getattr(net, "family", None), family)
    return (net,)


def _hint(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 4:
        raise ValueError(f"image: received an array of shape {image.shape}, expected an IMAGE [B, H, W, C]")
    return np.moveaxis(image, -1, 1)  # image.movedim(-1, 1)


def controlnet_apply(ctx, node_id, conditioning, control_net, image, strength):
    if strength == 0:
        return (conditioning,)
    hint = _hint(image)
    out = []
    for context, options in conditioning:
        control = ControlNet(control_net, hint, strength, previous=options.get("control"), resize=resize_hint)
        out.append([context, {**options, "control": control, "control_apply_to_uncond": True}])
    return (out,)


def controlnet_apply_advanced(ctx, node_id, positive, negative, control_net, image, strength, start_percent,
                              end_percent, vae=None):
    if strength == 0:
        return (positive, negative)
    hint = _hint(image)
    made: dict = {}  # previous control -> its new application (identity keys, as ComfyUI's cnets dict)
    out = []
    for conditioning in (positive, negative):
        entries = []
        for context, options in conditioning:
            previous = options.get("control")
            if previous not in made:
                made[previous] = ControlNet(control_net, hint, strength, start_percent, end_percent,
                                            previous=previous, resize=resize_hint)
            entries.append([context, {**options, "control": made[previous], "control_apply_to_uncond": False}])
        out.append(entries)
    return tuple(out)


# -- images -------------------------------------------------------------------------------------------
def _lanczos(samples: np.ndarray, width: int, height: int) -> np.ndarray:
    """comfy/utils.py lanczos: each image to 8-bit, PIL's LANCZOS resize, back to float / 255."""
    from PIL import Image

    out = []
    for image in samples:
        pixels = np.clip(np.float32(255.0) * np.moveaxis(image, 0, -1), 0, 255).astype(np.uint8)
        squeeze = pixels.shape[-1] == 1
        resized = Image.fromarray(pixels[..., 0] if squeeze else pixels).resize(
            (width, height), resample=Image.Resampling.LANCZOS)
        array = np.asarray(resized).astype(np.float32) / np.float32(255.0)
        out.append(np.moveaxis(array[..., None] if squeeze else array, -1, 0))
    return np.stack(out)


def upscale_image(image: np.ndarray, width: int, height: int, method: str, crop: str) -> np.ndarray:
    """IMAGE [B,H,W,C] resized as comfy.utils.common_upscale on ``image.movedim(-1, 1)``."""
    if method not in IMAGE_UPSCALE_METHODS:
        raise ValueError(f"upscale_method: received {method!r}, expected one of {IMAGE_UPSCALE_METHODS}")
    samples = np.moveaxis(np.asarray(image, dtype=np.float32), -1, 1)
    if method == "lanczos":
        if crop not in CROP_METHODS:
            raise ValueError(f"crop: received {crop!r}, expected one of {CROP_METHODS}")
        cropped = center_crop(samples, width, height) if crop == "center" else samples
        out = _lanczos(cropped, width, height)
    else:
        out = common_upscale(samples, width, height, method, crop)
    return np.ascontiguousarray(np.moveaxis(out, 1, -1))


def image_scale(ctx, node_id, image, upscale_method, width, height, crop):
    if width == 0 and height == 0:
        return (image,)
    h, w = np.shape(image)[1:3]
    if width == 0:
        width = max(1, round(w * height / h))
    elif height == 0:
        height = max(1, round(h * width / w))
    return (upscale_image(image, width, height, upscale_method, crop),)


def image_scale_by(ctx, node_id, image, upscale_method, scale_by):
    h, w = np.shape(image)[1:3]
    return (upscale_image(image, round(w * scale_by), round(h * scale_by), upscale_method, "disabled"),)


def image_invert(ctx, node_id, image):
    return (np.float32(1.0) - np.asarray(image, dtype=np.float32),)


def controlnet_node_specs(controlnet_names=None) -> dict[str, NodeSpec]:
    """The ControlNet and image nodes; ``controlnet_names()`` lists the ``control_net_name`` choices."""
    names = Input("COMBO", options=controlnet_names or (lambda: []))
    strength = Input("FLOAT", 1.0, 0.0, 10.0, 0.01)
    methods = Input("COMBO", options=IMAGE_UPSCALE_METHODS)
    specs = (
        NodeSpec("ControlNetLoader", {"control_net_name": names}, ("CONTROL_NET",), category="loaders",
                 display_name="Load ControlNet Model", run=controlnet_loader),
        NodeSpec("DiffControlNetLoader", {"model": Input("MODEL"), "control_net_name": names}, ("CONTROL_NET",),
                 category="loaders", display_name="Load ControlNet Model (diff)", run=diff_controlnet_loader),
        NodeSpec("ControlNetApply", {"conditioning": Input("CONDITIONING"), "control_net": Input("CONTROL_NET"),
                                     "image": Input("IMAGE"), "strength": strength},
                 ("CONDITIONING",), category="conditioning/controlnet", display_name="Apply ControlNet (OLD)",
                 deprecated=True, run=controlnet_apply),
        NodeSpec("ControlNetApplyAdvanced", {"positive": Input("CONDITIONING"), "negative": Input("CONDITIONING"),
                                             "control_net": Input("CONTROL_NET"), "image": Input("IMAGE"),
                                             "strength": strength,
                                             "start_percent": Input("FLOAT", 0.0, 0.0, 1.0, 0.001),
                                             "end_percent": Input("FLOAT", 1.0, 0.0, 1.0, 0.001),
                                             "vae": Input("VAE", optional=True)},
                 ("CONDITIONING", "CONDITIONING"), output_names=("positive", "negative"),
                 category="conditioning/controlnet", display_name="Apply ControlNet", run=controlnet_apply_advanced),
        NodeSpec("ImageScale", {"image": Input("IMAGE"), "upscale_method": methods,
                                "width": Input("INT", 512, 0, MAX_RESOLUTION, 1),
                                "height": Input("INT", 512, 0, MAX_RESOLUTION, 1),
                                "crop": Input("COMBO", options=CROP_METHODS)},
                 ("IMAGE",), category="image/upscaling", display_name="Upscale Image", run=image_scale),
        NodeSpec("ImageScaleBy", {"image": Input("IMAGE"), "upscale_method": methods,
                                  "scale_by": Input("FLOAT", 1.0, 0.01, 8.0, 0.01)},
                 ("IMAGE",), category="image/upscaling", display_name="Upscale Image By", run=image_scale_by),
        NodeSpec("ImageInvert", {"image": Input("IMAGE")}, ("IMAGE",), category="image",
                 display_name="Invert Image", run=image_invert),
    )
    return {spec.class_type: spec for spec in specs}
