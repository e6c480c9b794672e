"""LoRA key maps of the flow families (FLUX.1 dev / schnell, SD3 / SD3.5) onto a flow export's transformer.

The export keeps diffusers' parameter names (``manifest["initializer_map"]["transformer"]``, e.g.
``transformer_blocks.0.attn.to_q.weight``), where attention projections are separate layers. LoRAs are written
in three layouts:

* diffusers / PEFT (``transformer.<diffusers module>.lora_A.weight``; ``base_model.model.`` for some SD3
  trainers; OneTrainer's ``lora_transformer_<module with _>`` and SimpleTuner's ``lycoris_<...>``): one
  LoRA module patches one parameter;
* kohya / sd-scripts (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``;
  SD3: ``lora_unet_joint_blocks_0_x_block_attn_qkv``) and ComfyUI's own (``diffusion_model.<BFL / MMDiT
  module>``, ``diffusion_model.single_blocks.N.linear1_qkv``): the modules are those of Black Forest Labs'
  FLUX / Stability's MMDiT code, whose attention layers are FUSED. ``img_attn.qkv`` is to_q | to_k | to_v
  stacked on the output rows, a single block's ``linear1`` is to_q | to_k | to_v | proj_mlp, so one LoRA
  module patches several parameters, each with a row block of ``up @ down``. The final layer's (and SD3's
  last context block's) ``adaLN_modulation`` emits (shift, scale) where diffusers' ``AdaLayerNormContinuous``
  wants (scale, shift): the two row halves change places.

The maps follow ComfyUI 0.3.64 ``comfy/utils.py`` ``flux_to_diffusers`` / ``mmdit_to_diffusers`` (used in
reverse by ``comfy/lora.py`` ``model_lora_keys_unet``) and diffusers' ``lora_conversion_utils``
``_convert_kohya_flux_lora_to_diffusers`` (its ``swap_scale_shift`` on the final layer); the row block sizes
are read from the export's weight shapes, not from a config (ComfyUI's ``depth * 64`` rule does not hold for
the tiny test models).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

FLOW_FAMILIES = ("sd3", "flux", "flux-schnell")


@dataclass(frozen=True)
class Part:
    """One parameter a LoRA module patches: ``rows`` = the row ranges of ``up @ down`` it takes, concatenated
    in order (None: all of them)."""

    pname: str
    rows: tuple[tuple[int, int], ...] | None = None


# (BFL module inside a block, diffusers modules: one = the whole delta, several = consecutive row blocks)
_FLUX_DOUBLE = (
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("img_attn.proj", ("attn.to_out.0",)), ("txt_attn.proj", ("attn.to_add_out",)),
    ("img_mod.lin", ("norm1.linear",)), ("txt_mod.lin", ("norm1_context.linear",)),
    ("img_mlp.0", ("ff.net.0.proj",)), ("img_mlp.2", ("ff.net.2",)),
    ("txt_mlp.0", ("ff_context.net.0.proj",)), ("txt_mlp.2", ("ff_context.net.2",)),
)
_FLUX_SINGLE = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear1_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),  # ComfyUI's key for linear1's attention rows
    ("linear2", ("proj_out",)), ("modulation.lin", ("norm.linear",)),
)
_FLUX_BASIC = (
    ("img_in", "x_embedder"), ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)
_MMDIT_BLOCK = (
    ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),  # SD3.5 medium (MMDiT-X)
    ("x_block.attn.proj", ("attn.to_out.0",)), ("context_block.attn.proj", ("attn.to_add_out",)),
    ("x_block.attn2.proj", ("attn2.to_out.0",)),
    ("x_block.adaLN_modulation.1", ("norm1.linear",)),
    ("x_block.mlp.fc1", ("ff.net.0.proj",)), ("x_block.mlp.fc2", ("ff.net.2",)),
    ("context_block.mlp.fc1", ("ff_context.net.0.proj",)), ("context_block.mlp.fc2", ("ff_context.net.2",)),
)
_MMDIT_BASIC = (
    ("context_embedder", "context_embedder"), ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)

# LoRA key prefixes in front of transformer module paths (dotted, or with "_" for "." after a flat prefix)
_DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
_FLAT_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")

# input width of a joint block's attn.to_q -> family (real models, then the tiny fixtures)
_DIT_WIDTH = {3072: "flux", 1536: "sd3", 2432: "sd3", 64: "flux", 32: "sd3"}


def _block_indices(modules: Iterable[str], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for s in modules if (m := pat.match(s))})


def _bfl_entries(family: str, modules: set[str]) -> dict[str, tuple[tuple[str, ...], bool]]:
    """{BFL / MMDiT module path: (diffusers module paths, swap halves)} for the blocks the export has."""
    out: dict[str, tuple[tuple[str, ...], bool]] = {}
    if family == "sd3":
        joint = _block_indices(modules, "transformer_blocks")
        for i in joint:
            for src, dst in _MMDIT_BLOCK:
                out[f"joint_blocks.{i}.{src}"] = (tuple(f"transformer_blocks.{i}.{d}" for d in dst), False)
            # the last block's context path is "pre only": AdaLayerNormContinuous, (scale, shift)
            swap = i == joint[-1]
            out[f"joint_blocks.{i}.context_block.adaLN_modulation.1"] = \
                ((f"transformer_blocks.{i}.norm1_context.linear",), swap)
        basic = _MMDIT_BASIC
    else:
        for i in _block_indices(modules, "transformer_blocks"):
            for src, dst in _FLUX_DOUBLE:
                out[f"double_blocks.{i}.{src}"] = (tuple(f"transformer_blocks.{i}.{d}" for d in dst), False)
        for i in _block_indices(modules, "single_transformer_blocks"):
            for src, dst in _FLUX_SINGLE:
                out[f"single_blocks.{i}.{src}"] = (tuple(f"single_transformer_blocks.{i}.{d}" for d in dst), False)
        basic = _FLUX_BASIC
    for src, dst in basic:
        out[src] = ((dst,), False)
    out["final_layer.adaLN_modulation.1"] = (("norm_out.linear",), True)
    return {k: v for k, v in out.items() if all(d in modules for d in v[0])}


class FlowKeyMap:
    """LoRA key stem -> the transformer parameters it patches, for one flow export."""

    def __init__(self, family: str, pnames: Iterable[str]):
        self.family = family
        weights = {p[: -len(".weight")]: p for p in pnames if p.endswith(".weight")}
        # module path -> (param names, swap halves); diffusers paths first, the fused BFL / MMDiT paths next
        self.dotted: dict[str, tuple[tuple[str, ...], bool]] = {m: ((p,), False) for m, p in weights.items()}
        for src, (dst, swap) in _bfl_entries(family, set(weights)).items():
            self.dotted[src] = (tuple(weights[d] for d in dst), swap)
        self.flat = {k.replace(".", "_"): v for k, v in self.dotted.items()}

    def entry(self, stem: str) -> tuple[tuple[str, ...], bool] | None:
        for prefix in _FLAT_PREFIXES:
            if stem.startswith(prefix):
                return self.flat.get(stem[len(prefix):])
        s = stem
        for prefix in _DOTTED_PREFIXES:
            if s.startswith(prefix):
                s = s[len(prefix):]
                break
        return self.dotted.get(s)

    def lookup(self, stem: str, shape: Callable[[str], tuple]) -> list[Part] | None:
        """The parts ``stem`` patches (row blocks sized from the weights' shapes), or None."""
        hit = self.entry(stem)
        if hit is None:
            return None
        pnames, swap = hit
        if swap:
            n = int(shape(pnames[0])[0])
            return [Part(pnames[0], ((n // 2, n), (0, n // 2)))]
        if len(pnames) == 1:
            return [Part(pnames[0])]
        parts, start = [], 0
        for p in pnames:
            n = int(shape(p)[0])
            parts.append(Part(p, ((start, start + n),)))
            start += n
        return parts


def flow_family_hint(modules: dict) -> tuple[str | None, str]:
    """(family, why) when a LoRA's keys are those of FLUX.1 or SD3, else (None, "")."""
    for s in modules:
        if re.search(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]\d", s):
            return "flux", f"its keys address FLUX.1's double / single-stream blocks ({s})"
        if re.search(r"(^|[._])joint_blocks[._]\d", s):
            return "sd3", f"its keys address SD3's MMDiT joint blocks ({s})"
    for s, m in modules.items():
        if re.match(r"(transformer\.|base_model\.model\.|lora_transformer_)?transformer_blocks[._]\d+[._]attn[._]to_q$",
                    s) and m.down is not None and m.down.ndim >= 2:
            fam = _DIT_WIDTH.get(int(m.down.shape[1]))
            if fam:
                return fam, f"its joint-attention keys are {int(m.down.shape[1])} wide ({s})"
    return None, ""
