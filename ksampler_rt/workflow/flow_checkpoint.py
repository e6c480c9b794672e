"""SD3 / SD3.5 and FLUX.1 exports on engines: CheckpointLoaderSimple on a whole export, and UNETLoader /
DualCLIPLoader / TripleCLIPLoader / VAELoader on separately exported components (``ksampler-rt register``
puts them in the registry's ``diffusion_models/``, ``text_encoders/`` and ``vae/`` folders).

MODEL is a :class:`ksampler_rt.runtime.Model` of the export's family around the transformer engine, CLIP a
:class:`~ksampler_rt.workflow.flow_text.FlowClip` over the text-encoder engines (:mod:`.flow_towers`), VAE a
:class:`~ksampler_rt.workflow.checkpoint.Vae` over the 16-channel decoder / encoder engines. What ComfyUI
decides from the files (``comfy/supported_models.py``: SD3, Flux, FluxSchnell) the export's manifest says:
``family`` (FLUX.1 dev has ``guidance_in``, schnell not), the latent channels and the sampling settings.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..runtime import Model
from .flow_text import FlowClip
from .flow_towers import T5_MIN_LENGTH, TOWER_NAMES, ClipTextTower, T5TextTower, T5Tokenizer
from .lora import EngineForward
from .text_encoding import ClipTower
from .tokenizer import ClipTokenizer

FLOW_FAMILIES = ("sd3", "flux", "flux-schnell")
_CLIP_TYPE = {"sd3": "sd3", "flux": "flux", "flux-schnell": "flux"}
# ComfyUI's layer choices: SD3 reads layer -2 raw from both CLIP towers; FLUX.1 only clip_l's pooled output
_CLIP_LAYER = {"sd3": -2, "flux": None}


def _manifest(export_dir: Path) -> dict:
    return json.loads((Path(export_dir) / "manifest.json").read_text())


def _text_tower(export_dir: Path, entry: dict, engine, clip_type: str):
    name = entry["name"]
    if not entry.get("tokenizer"):
        raise FileNotFoundError(f"{export_dir}: text encoder {name!r} has no tokenizer folder; re-export with the "
                                "checkpoint's tokenizer files or --tokenizer (see docs/export.md)")
    folder = Path(export_dir) / entry["tokenizer"]
    if entry.get("kind") == "t5":
        tokenizer = T5Tokenizer(folder, min_length=T5_MIN_LENGTH[clip_type],
                                end_token=int(entry.get("eos_token_id", 1)), pad_token=int(entry.get("pad_token_id", 0)))
        return T5TextTower(tokenizer, EngineForward(engine), width=int(entry["hidden_size"]))
    pad_with_end = entry.get("pad_token_id") in (None, entry.get("eos_token_id"))
    tokenizer = ClipTokenizer(folder, max_length=int(entry.get("max_length", 77)), pad_with_end=pad_with_end)
    tower = ClipTower(name=name, tokenizer=tokenizer, forward=EngineForward(engine),
                      num_layers=int(entry["num_layers"]), default_layer=_CLIP_LAYER[clip_type],
                      layer_norm_hidden_state=False, all_hidden_states=bool(entry.get("all_hidden_states")))
    return ClipTextTower(TOWER_NAMES[name], tower, width=int(entry["hidden_size"]),
                         pooled_width=int(entry.get("pooled_dim") or entry["hidden_size"]))


def text_towers(export_dir: Path, manifest: dict, engines, clip_type: str) -> dict:
    """FlowClip's towers ("l", "g", "t5xxl") for the text encoders of one export."""
    return {TOWER_NAMES[e["name"]]: _text_tower(export_dir, e, getattr(engines, e["name"]), clip_type)
            for e in manifest.get("text_encoders", []) if e["name"] in TOWER_NAMES}


def flow_model(engines, family: str) -> Model:
    if engines.transformer is None:
        raise ValueError(f"{engines.manifest.export_dir}: received an export without a transformer, expected the "
                         f"diffusion model of {family}")
    model = Model(engines.unet_callable(), family)
    model.engines = engines  # the pipeline's batching gate reads the engine's shape limits
    return model


def load_flow_checkpoint(export_dir, backend: str = "auto", *, log: Callable[[str], None] | None = print,
                         **engine_options):
    """CheckpointLoaderSimple on a whole flow export (a diffusers folder or SD3.5's all-in-one file)."""
    from ..engines import load_engines
    from .checkpoint import Checkpoint, Vae

    export_dir = Path(export_dir)
    manifest = _manifest(export_dir)
    family = manifest["family"]
    missing = [m for m in ("transformer", "vae_decoder") if m not in manifest["models"]]
    if missing or not manifest.get("text_encoders"):
        raise ValueError(f"{export_dir}: received a partial {family} export (models: {', '.join(manifest['models'])}),"
                         f" expected a whole checkpoint for CheckpointLoaderSimple; register its parts under "
                         f"diffusion_models/, text_encoders/ and vae/ and load them with UNETLoader, "
                         f"DualCLIPLoader / TripleCLIPLoader and VAELoader")
    engines = load_engines(export_dir, backend=backend, log=log, **engine_options)
    clip_type = _CLIP_TYPE[family]
    clip = FlowClip(clip_type, text_towers(export_dir, manifest, engines, clip_type))
    vae = Vae(engines.vae_decoder, engines.vae_encoder, manifest.get("latent_downscale", 8))
    model = flow_model(engines, family)
    _attach_lora(model, clip.towers, engines, manifest, export_dir, family)
    return Checkpoint(model, clip, vae, engines, manifest)


def _attach_lora(model, towers: dict, engines, manifest, export_dir, family) -> None:
    """LoraLoader support (:mod:`.lora`): the transformer (``model``; None for a text-encoder export) and the
    CLIP towers (``lora_te1_`` = clip_l, ``lora_te2_`` = clip_g) of one export; T5 takes no LoRA."""
    from . import lora

    clip_towers = tuple(t.tower for t in towers.values() if isinstance(t, ClipTextTower))
    try:
        lora.attach(model, clip_towers, engines, manifest, export_dir, family)
    except lora.LoraError:
        pass  # an export without an initializer map: LoraLoader then says so by name


class Component:
    """A separately loaded MODEL / CLIP / VAE and the engines behind it (released with the pipeline)."""

    def __init__(self, value, engines: list):
        self.value, self.engines = value, engines

    def release(self) -> None:
        states = [getattr(self.value, "lora", None)]
        for tower in getattr(self.value, "towers", {}).values():
            states.append(getattr(getattr(getattr(tower, "tower", None), "forward", None), "lora", None))
        for context in {id(s.target.context): s.target.context for s in states if s is not None}.values():
            context.release()  # the LoRA engines (merged-weight sessions) made for this component
        for e in self.engines:
            e.release()


def load_flow_component(registry, folder: str, names: tuple, options: dict, *, backend: str = "auto",
                        log: Callable[[str], None] | None = print, **engine_options) -> Component:
    """UNETLoader (``diffusion_models``), DualCLIPLoader / TripleCLIPLoader (``text_encoders``: each name an
    export holding one or more text encoders; ``options["type"]`` is the CLIP type) and VAELoader (``vae``)."""
    from ..engines import load_engines
    from .checkpoint import Vae

    paths = [registry.component(folder, name) for name in names]
    manifests = [_manifest(p) for p in paths]
    if folder == "diffusion_models":
        (path,), (manifest,) = paths, manifests
        if manifest.get("family") not in FLOW_FAMILIES or "transformer" not in manifest["models"]:
            raise ValueError(f"unet_name: received {names[0]!r}, an export of {manifest.get('family')} with "
                             f"{', '.join(manifest['models'])}, expected an SD3 / FLUX.1 diffusion model export")
        engines = load_engines(path, backend=backend, log=log, models=["transformer"], **engine_options)
        model = flow_model(engines, manifest["family"])
        _attach_lora(model, {}, engines, manifest, path, manifest["family"])
        return Component(model, [engines])
    if folder == "vae":
        (path,), (manifest,) = paths, manifests
        have = [m for m in ("vae_decoder", "vae_encoder") if m in manifest["models"]]
        if "vae_decoder" not in have:
            raise ValueError(f"vae_name: received {names[0]!r}, an export with {', '.join(manifest['models'])}, "
                             f"expected one with a VAE decoder")
        engines = load_engines(path, backend=backend, log=log, models=have, **engine_options)
        return Component(Vae(engines.vae_decoder, engines.vae_encoder, manifest.get("latent_downscale", 8)),
                         [engines])
    clip_type = options.get("type", "sd3")
    towers, loaded = {}, []
    for name, path, manifest in zip(names, paths, manifests):
        encoders = [e for e in manifest.get("text_encoders", []) if e["name"] in TOWER_NAMES]
        if not encoders:
            raise ValueError(f"clip_name: received {name!r}, an export of {', '.join(manifest['models'])}, "
                             f"expected a text-encoder export (clip_l, clip_g or t5xxl)")
        engines = load_engines(path, backend=backend, log=log, models=[e["name"] for e in encoders], **engine_options)
        loaded.append(engines)
        these = text_towers(path, {"text_encoders": encoders}, engines, clip_type)
        _attach_lora(None, these, engines, manifest, path, manifest.get("family"))
        towers.update(these)
    return Component(FlowClip(clip_type, towers), loaded)
