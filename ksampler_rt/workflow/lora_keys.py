"""LoRA keys -> the export's parameters: which initializer (and which row blocks of it) each module patches,
and the family a foreign LoRA is made for. SD / SDXL keys are mapped here, the flow families' transformer keys
by :mod:`.flow_lora`."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .flow_lora import FLOW_FAMILIES, FlowKeyMap, Part, flow_family_hint
from .lora_files import LoraError, LoraFile, LoraModule

_FAMILY_LABEL = {"sd15": "SD1.x", "sd1": "SD1.x", "sd2": "SD2.x", "sd2-v": "SD2.x", "sdxl": "SDXL",
                 "sdxl-refiner": "SDXL refiner", "sd3": "SD3", "flux": "FLUX.1", "flux-schnell": "FLUX.1"}
SD_MODELS = ("unet", "clip", "clip2")
FLOW_MODELS = ("transformer", "clip_l", "clip_g")
# width of the cross-attention context (attn2.to_k input) -> family; the tiny fixtures' widths included
_CONTEXT_FAMILY = {768: "sd15", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner",
                   32: "sd15", 48: "sd2", 96: "sdxl"}
# text-encoder hidden width (q_proj input) -> family (SD1.x clip_l vs SD2.x clip_h; tiny 32 / 48)
_TE_FAMILY = {768: "sd15", 1024: "sd2", 32: "sd15", 48: "sd2"}

_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


# ------------------------------------------------------------------------------------ key mapping

def _indicated_family(lf: LoraFile) -> tuple[str | None, str]:
    """(family, why) from a LoRA's keys and shapes, or (None, "")."""
    fam, why = flow_family_hint(lf.modules)
    if fam:
        return fam, why
    stems = list(lf.modules)
    if any(s.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for s in stems):
        return "sdxl", "it has SDXL's two text-encoder key sets (lora_te1_ / lora_te2_)"
    for s, m in lf.modules.items():
        if "attn2" in s and "to_k" in s and m.down is not None and m.down.ndim >= 2:
            width = int(m.down.shape[1])
            fam = _CONTEXT_FAMILY.get(width)
            if fam:
                return fam, f"its cross-attention keys take a {width}-wide text context ({s})"
    for s, m in lf.modules.items():
        if ("lora_te_" in s or s.startswith("text_encoder.")) and "q_proj" in s and m.down is not None:
            width = int(m.down.shape[1])
            fam = _TE_FAMILY.get(width)
            if fam:
                return fam, f"its text-encoder keys are {width} wide ({s})"
    if any(s.startswith("lora_unet_input_blocks_") for s in stems):
        return "sdxl", "its UNet keys use the LDM layout kohya writes for SDXL (lora_unet_input_blocks_...)"
    return None, ""


def _same_family(a: str | None, b: str | None) -> bool:
    return _FAMILY_LABEL.get(a or "", a) == _FAMILY_LABEL.get(b or "", b)


def _is_denoiser_key(stem: str) -> bool:
    """A key of the UNet / transformer (not a text encoder's), in any layout read here."""
    return not re.match(r"(base_model\.model\.)?(lora_te\d?_|text_encoder|text_encoders\.|lora_prior_te_)", stem)


class KeyIndex:
    """LoRA key stem -> (model, [Part]) for one export: which parameters (and row blocks) a module patches.

    SD / SDXL exports: models ``unet``, ``clip``, ``clip2``; flow exports: ``transformer`` (keys mapped by
    :class:`.flow_lora.FlowKeyMap`), ``clip_l``, ``clip_g``. T5 LoRA keys are not applied (reported unmatched).
    """

    def __init__(self, manifest: dict):
        self.family = manifest.get("family")
        init_map = manifest.get("initializer_map") or {}
        self.flow = self.family in FLOW_FAMILIES or any(m in init_map for m in FLOW_MODELS)
        known = FLOW_MODELS if self.flow else SD_MODELS
        self.models = [m for m in init_map if m in known]
        if not self.models:
            raise LoraError(f"this export's manifest has no initializer_map for {' / '.join(known)}: re-export it "
                            f"with this ksampler-rt to use LoRAs")
        self.init_map = init_map
        self.dotted: dict[str, dict[str, str]] = {}   # model -> module path -> param name
        self.flat: dict[str, dict[str, str]] = {}     # model -> module path with "_" -> param name
        for model in self.models:
            dotted, flat = {}, {}
            for pname in init_map[model]:
                if not pname.endswith(".weight"):
                    continue
                module = pname[: -len(".weight")]
                if module.startswith("text_model."):
                    module = module[len("text_model."):]
                dotted[module] = pname
                flat[module.replace(".", "_")] = pname
            self.dotted[model], self.flat[model] = dotted, flat
        self.flow_map = FlowKeyMap(self.family, init_map["transformer"]) if "transformer" in self.models else None
        self.ldm_flat = self._ldm_names() if "unet" in self.models else {}

    def _ldm_names(self) -> dict[str, str]:
        """LDM-layout UNet module with "_" -> diffusers param name (what kohya writes for SDXL)."""
        try:
            from ..export.ldm_writer import unet_to_ldm

            names = list(self.init_map["unet"])
            blocks = {int(n.split(".")[3]) for n in names if n.startswith("down_blocks.0.resnets.")}
            ldm = unet_to_ldm({n: None for n in names}, {"layers_per_block": max(blocks) + 1 if blocks else 2})
            out = {}
            for ldm_name, diff_name in zip(ldm, names):
                if ldm_name.endswith(".weight") and diff_name.endswith(".weight"):
                    out[ldm_name[: -len(".weight")].replace(".", "_")] = diff_name
            return out
        except Exception:  # the LDM names are a convenience; diffusers names always work
            return {}

    def _te_model(self, which: str) -> str | None:
        # kohya: lora_te_ / lora_te1_ = the first text encoder, lora_te2_ = the second (SDXL clip_g, SD3
        # clip_g; FLUX's second is T5, whose LoRA keys are not applied), as comfy/lora.py model_lora_keys_clip
        first, second = ("clip_l", "clip_g") if self.flow else ("clip", "clip2")
        model = first if which in ("te", "te1") else second if which == "te2" else None
        return model if model in self.models else None

    def _one(self, model: str | None, pname: str | None) -> tuple[str, list[Part]] | None:
        return (model, [Part(pname)]) if model and pname else None

    def lookup(self, stem: str, shape: Callable[[str, str], tuple]) -> tuple[str, list[Part]] | None:
        for which in ("te1", "te2", "te3", "te"):
            prefix = f"lora_{which}_"
            if stem.startswith(prefix):
                model = self._te_model(which)
                flat = stem[len(prefix):]
                if flat.startswith("text_model_"):
                    flat = flat[len("text_model_"):]
                return self._one(model, self.flat[model].get(flat) if model else None)
        if self.flow:
            return self._lookup_flow(stem, shape)
        if stem.startswith("lora_unet_"):
            flat = stem[len("lora_unet_"):]
            return self._one("unet", self.flat["unet"].get(flat) or self.ldm_flat.get(flat))
        return self._lookup_diffusers(stem)

    def _lookup_flow(self, stem: str, shape) -> tuple[str, list[Part]] | None:
        s = stem[len("base_model.model."):] if stem.startswith("base_model.model.") else stem
        for prefix, model in (("text_encoders.clip_l.transformer.", "clip_l"),
                              ("text_encoders.clip_g.transformer.", "clip_g"),
                              ("text_encoder_2.", "clip_g"), ("text_encoder.", "clip_l")):
            if s.startswith(prefix):
                if model not in self.models:
                    return None
                return self._lookup_diffusers(s[len(prefix):], model)
        if self.flow_map is None:
            return None
        parts = self.flow_map.lookup(stem, lambda p: shape("transformer", p))
        return ("transformer", parts) if parts else None

    def _lookup_diffusers(self, stem: str, model: str | None = None) -> tuple[str, list[Part]] | None:
        s = stem
        if model is None:
            if s.startswith("base_model.model."):
                s = s[len("base_model.model."):]
            for prefix, m in (("unet.", "unet"), ("text_encoder_2.", "clip2"), ("text_encoder.", "clip"),
                              ("lora_unet.", "unet")):
                if s.startswith(prefix):
                    s, model = s[len(prefix):], m
                    break
            else:
                model = "unet"
        if model not in self.models:
            return None
        s = s.replace(".processor.", ".")
        head, _, last = s.rpartition(".")
        if model == "unet" and last == "to_out":  # old diffusers attention processors: to_out_lora = to_out.0
            s += ".0"
        elif model != "unet" and last in _TE_PROJ:  # ... and their text-encoder names: to_q_lora = q_proj
            s = f"{head}.{_TE_PROJ[last]}"
        if s.startswith("text_model."):
            s = s[len("text_model."):]
        return self._one(model, self.dotted[model].get(s))


@dataclass
class LoraPatch:
    """A LoRA file resolved against one export: which initializer (row blocks) each module patches."""

    lora: LoraFile
    targets: dict[str, list[tuple[Part, LoraModule]]]   # model -> [(parameter part, module)]
    unmatched: list[str]                                 # key stems / keys that patch nothing here

    def n_patched(self, model: str | None = None) -> int:
        return sum(len(v) for m, v in self.targets.items() if model is None or m == model)


def _fits(m: LoraModule, parts: list[Part], shapes: list[tuple]) -> bool:
    """up @ down (or its row blocks) fits each part's weight, and row blocks cover all of up's rows."""
    up_rows, rank = int(m.up.shape[0]), int(m.down.shape[0])
    if m.up.reshape(up_rows, -1).shape[1] != rank:
        return False
    cols = int(np.prod(m.delta_shape()[1:]))
    for part, shape in zip(parts, shapes):
        if part.rows is None:
            if up_rows * cols != int(np.prod(shape)):
                return False
        else:
            n = sum(b - a for a, b in part.rows)
            if n != shape[0] or n * cols != int(np.prod(shape)):
                return False
    stops = [b for p in parts if p.rows for _, b in p.rows]
    return not stops or max(stops) == up_rows


def _shape_error(stem: str, m: LoraModule, model: str, parts: list[Part], shapes: list[tuple]) -> str:
    if len(parts) == 1:
        where = f"{model} weight {parts[0].pname!r} of shape {list(shapes[0])}"
    else:
        where = f"{model} weights {', '.join(repr(p.pname) for p in parts)} stacked on their rows (shapes " \
                f"{', '.join(str(list(s)) for s in shapes)})"
    return f"{stem}: lora_up {list(m.up.shape)} @ lora_down {list(m.down.shape)} does not fit {where}"


def resolve_lora(lf: LoraFile, manifest: dict, weight_shape: Callable[[str, str], tuple], *,
                 partial: bool = False) -> LoraPatch:
    """Match ``lf`` to an export; raises LoraError for a foreign family, nothing matching, or bad shapes.

    ``weight_shape(model, pname)`` raises KeyError for a model whose engine is not loaded (counted as
    unmatched)."""
    index = KeyIndex(manifest)
    targets: dict[str, list] = {}
    unmatched = list(lf.unknown_keys)
    mismatches = []
    for stem, m in lf.modules.items():
        try:
            hit = index.lookup(stem, weight_shape)
            shapes = [tuple(weight_shape(hit[0], p.pname)) for p in hit[1]] if hit else []
        except KeyError:
            hit = None
        if hit is None:
            unmatched.append(stem)
            continue
        model, parts = hit
        if not _fits(m, parts, shapes):
            mismatches.append(_shape_error(stem, m, model, parts, shapes))
            continue
        targets.setdefault(model, []).extend((p, m) for p in parts)
    denoiser = "transformer" if index.flow else "unet"
    foreign_denoiser = (denoiser in index.models and not targets.get(denoiser)
                        and any(_is_denoiser_key(s) for s in lf.modules))
    if mismatches or (not targets and not partial) or foreign_denoiser:
        fam, why = _indicated_family(lf)
        if fam and not _same_family(fam, index.family):
            raise LoraError(f"LoRA {lf.name} is made for {_FAMILY_LABEL.get(fam, fam)} ({why}), but this checkpoint "
                            f"is {_FAMILY_LABEL.get(index.family, index.family)}; the base model is unchanged")
    if mismatches:
        more = f" (and {len(mismatches) - 6} more)" if len(mismatches) > 6 else ""
        raise LoraError(f"LoRA {lf.name}: shape mismatch: {'; '.join(mismatches[:6])}{more}; the base model is "
                        f"unchanged")
    if not targets and not partial:
        shown = ", ".join(sorted(unmatched)[:8]) or "(the file has no LoRA keys)"
        layouts = ("kohya lora_unet_double_blocks_/joint_blocks_/lora_te1_, ComfyUI diffusion_model.<BFL module>, "
                   "diffusers/PEFT transformer./text_encoder. with lora_A/lora_B" if index.flow else
                   "kohya lora_unet_/lora_te_, diffusers/PEFT unet./text_encoder. with lora_A/lora_B")
        raise LoraError(f"LoRA {lf.name}: none of its {len(lf.modules)} modules match a weight of this "
                        f"{_FAMILY_LABEL.get(index.family, index.family)} export (e.g. {shown}); supported layouts: "
                        f"{layouts}")
    return LoraPatch(lf, targets, sorted(unmatched))
