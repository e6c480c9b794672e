"""CheckpointLoaderSimple on engines: an export directory -> (MODEL, CLIP, VAE).

MODEL is a :class:`ksampler_rt.runtime.Model` around the UNet engine (``model.lora`` lets
``LoraLoader`` derive LoRA models from it, see :mod:`.lora`), CLIP a
:class:`~ksampler_rt.workflow.text_encoding.Clip` over the text-encoder engines with ComfyUI's
per-family layer choices, VAE a :class:`Vae` over the decoder / encoder engines.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from ..runtime import Model
from .control_engines import ControlledUNet
from .flow_checkpoint import FLOW_FAMILIES, load_flow_checkpoint, load_flow_component
from .lora import EngineForward, attach
from .text_encoding import Clip, ClipTower
from .tokenizer import ClipTokenizer

# ComfyUI's text-encoder settings per family (comfy/sd1_clip.py, sd2_clip.py, sdxl_clip.py):
# (default layer, final layer norm on intermediate layers, layer offset onto the exported model).
# diffusers' SD2 text encoder already drops OpenCLIP-H's last layer, hence the +1 offset.
_TOWER_OPTIONS = {
    "sd15": {"clip": (None, True, 0)},
    "sd2": {"clip": (-2, True, 1)},
    "sd2-v": {"clip": (-2, True, 1)},
    "sdxl": {"clip": (-2, False, 0), "clip2": (-2, False, 0)},
    "sdxl-refiner": {"clip2": (-2, False, 0)},
}


class Vae:
    """VAEDecode / VAEEncode as ComfyUI (comfy/sd.py VAE, nodes.VAEEncode) on engines."""

    def __init__(self, decoder, encoder, downscale: int = 8):
        self.decoder, self.encoder, self.downscale = decoder, encoder, int(downscale)

    def decode(self, samples: np.ndarray) -> np.ndarray:
        """LATENT samples (unscaled) [B,C,h,w] -> IMAGE [B,8h,8w,3] in [0, 1]."""
        image = self.decoder(latent=np.ascontiguousarray(samples, dtype=np.float32))["image"]
        return np.clip((image + 1.0) / 2.0, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """IMAGE [B,H,W,3] in [0, 1] -> latent mean [B,C,H/8,W/8], centre-cropped to a multiple of 8 first."""
        d = self.downscale
        pixels = np.asarray(pixels, dtype=np.float32)
        h, w = (pixels.shape[1] // d) * d, (pixels.shape[2] // d) * d
        if (h, w) != pixels.shape[1:3]:
            oy, ox = (pixels.shape[1] % d) // 2, (pixels.shape[2] % d) // 2
            pixels = pixels[:, oy:oy + h, ox:ox + w, :]
        image = np.ascontiguousarray((pixels * 2.0 - 1.0).transpose(0, 3, 1, 2))
        return self.encoder(image=image)["latent"].astype(np.float32)


class Checkpoint(NamedTuple):
    model: Model
    clip: Clip
    vae: Vae
    engines: object
    manifest: dict

    def release(self) -> None:
        control = getattr(self.model, "control_unet", None)
        if control is not None:
            control.release()  # the residual-taking UNet engine, when a ControlNet loaded it
        lora = getattr(self.model, "lora", None)
        if lora is not None:
            lora.target.context.release()  # the LoRA engines (ONNX Runtime sessions) of this checkpoint
        self.engines.release()


def _tower(export_dir: Path, family: str, entry: dict, engine) -> ClipTower:
    name = entry["name"]
    default, layer_norm, offset = _TOWER_OPTIONS[family][name]
    if not entry.get("tokenizer"):
        raise FileNotFoundError(f"{export_dir}: text encoder {name!r} has no tokenizer folder; re-export with the "
                                "checkpoint's tokenizer files (see docs/export.md)")
    pad_with_end = entry.get("pad_token_id") in (None, entry.get("eos_token_id"))
    tokenizer = ClipTokenizer(export_dir / entry["tokenizer"], max_length=int(entry.get("max_length", 77)),
                              pad_with_end=pad_with_end)

    return ClipTower(name=name, tokenizer=tokenizer, forward=EngineForward(engine),
                     num_layers=int(entry["num_layers"]) + offset, default_layer=default,
                     layer_norm_hidden_state=layer_norm, layer_offset=offset,
                     all_hidden_states=bool(entry.get("all_hidden_states")))


def load_checkpoint(export_dir: str | Path, backend: str = "auto", *, log: Callable[[str], None] | None = print,
                    registry=None, **engine_options) -> Checkpoint:
    """Load (building on first use where the backend allows) the engines of an export directory."""
    from ..engines import load_engines

    export_dir = Path(export_dir)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    family = manifest["family"]
    if family in FLOW_FAMILIES:
        return load_flow_checkpoint(export_dir, backend, log=log, **engine_options)
    if family not in _TOWER_OPTIONS or manifest.get("kind", "checkpoint") != "checkpoint":
        raise ValueError(f"{export_dir}: received a {manifest.get('kind', 'checkpoint')} of family {family!r}, "
                         f"expected a checkpoint of one of {tuple(_TOWER_OPTIONS) + FLOW_FAMILIES}")
    plain = [m for m in manifest["models"] if m != "unet_control"]  # built when a ControlNet first needs it
    engines = load_engines(export_dir, backend=backend, log=log, models=plain, **engine_options)

    def load_control():
        return load_engines(export_dir, backend=backend, log=log, models=["unet_control"], **engine_options)

    unet = ControlledUNet(engines.unet_callable(), load_control if "unet_control" in manifest["models"] else None,
                          export_dir, manifest)
    model = Model(unet, family, zsnr=bool(manifest.get("schedule", {}).get("zsnr", False)))
    model.control_unet = unet
    towers = tuple(_tower(export_dir, family, entry, getattr(engines, entry["name"]))
                   for entry in manifest["text_encoders"])
    clip = Clip(towers, family)
    attach(model, towers, engines, manifest, export_dir, family)  # LoraLoader support
    vae = Vae(engines.vae_decoder, engines.vae_encoder, manifest.get("latent_downscale", 8))
    return Checkpoint(model, clip, vae, engines, manifest)


def load_component(registry, folder: str, names: tuple, options: dict, *, backend: str = "auto",
                   log: Callable[[str], None] | None = print, **engine_options):
    """UNETLoader / DualCLIPLoader / TripleCLIPLoader / VAELoader on the registry's component folders (see
    :func:`~ksampler_rt.workflow.flow_checkpoint.load_flow_component`)."""
    return load_flow_component(registry, folder, names, options, backend=backend, log=log, **engine_options)
