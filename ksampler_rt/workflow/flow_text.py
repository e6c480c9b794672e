"""The CLIP object of the flow families: SD3 / SD3.5 (clip_l + clip_g + t5xxl) and FLUX.1 (clip_l + t5xxl).

How ComfyUI 0.3.64 assembles the towers' outputs into CONDITIONING, written over any text towers:

* FLUX.1 (``comfy/text_encoders/flux.py`` ``FluxClipModel.encode_token_weights``): the context is T5-XXL's
  hidden states [1, T, 4096], the pooled vector clip_l's [1, 768];
* SD3 (``comfy/text_encoders/sd3_clip.py`` ``SD3ClipModel.encode_token_weights``): clip_l's and clip_g's
  hidden states side by side (768 + 1280, cut to the shorter token count; clip_g alone is padded on the
  left by 768), zero-padded to 4096 wide, then T5-XXL's tokens after them; pooled = clip_l's ++ clip_g's
  [1, 2048], zeros for a missing tower; no tower at all gives zeros [1, 77, 4096];
* ``CLIPTextEncodeSD3`` (``comfy_extras/nodes_sd3.py``): with ``empty_padding="none"`` an empty text drops
  its tower's tokens; clip_l and clip_g are padded with empty-prompt chunks to the same chunk count (so a
  dropped clip_l or clip_g comes back as empty prompts while the other has text);
* ``CLIPTextEncodeFlux`` (``comfy_extras/nodes_flux.py``): clip_l's text to clip_l, t5xxl's to T5, and
  ``guidance`` stored on the conditioning.

A *tower* is anything with ``chunks(text) -> int`` (77-token chunks a CLIP tokenizer makes; 1 for T5, which
is not chunked) and ``encode(text, chunks) -> (hidden [1, T, D], pooled [1, P] or None)``, where ``text`` is
None for "no tokens" (ComfyUI then encodes the tower's empty token sequence) and ``chunks`` pads a CLIP
tower's output with empty-prompt chunks. The engines of the next export issue plug in here; until then the
analytic stand-ins of :mod:`ksampler_rt.serve.testing` do.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Protocol

import numpy as np

F32 = np.float32
FLOW_CLIP_TYPES = ("flux", "sd3")
# the towers each CLIP type takes, in DualCLIPLoader / TripleCLIPLoader order
TOWER_WIDTHS = {"l": 768, "g": 1280, "t5xxl": 4096}


class TextTower(Protocol):
    name: str  # "l", "g" or "t5xxl"

    def chunks(self, text: str) -> int: ...

    def encode(self, text: str | None, chunks: int | None = None, layer: int | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]: ...


@dataclass(frozen=True)
class FlowClip:
    """ComfyUI's CLIP for ``type`` "flux" (towers l, t5xxl) or "sd3" (any of l, g, t5xxl)."""

    type: str
    towers: Mapping[str, TextTower]
    layer_idx: int | None = None  # CLIPSetLastLayer: applies to the CLIP towers (l, g), as in ComfyUI

    def __post_init__(self):
        if self.type not in FLOW_CLIP_TYPES:
            raise ValueError(f"type: received {self.type!r}, expected one of {FLOW_CLIP_TYPES}")
        unknown = sorted(set(self.towers) - set(TOWER_WIDTHS))
        if unknown:
            raise ValueError(f"towers: received {unknown}, expected names among {tuple(TOWER_WIDTHS)}")
        if self.type == "flux" and set(self.towers) != {"l", "t5xxl"}:
            raise ValueError(f"clip_name1 / clip_name2: received the text encoders {sorted(self.towers)}, expected "
                             "clip_l and t5xxl for type 'flux'")

    @property
    def family(self) -> str:
        return self.type

    def clip_layer(self, layer_idx: int) -> "FlowClip":
        return replace(self, layer_idx=layer_idx)

    def encode(self, text: str) -> list:
        """CLIPTextEncode: the same text to every tower."""
        if not isinstance(text, str):
            raise ValueError(f"text: received {type(text).__name__}, expected a string")
        return self.encode_parts({name: text for name in TOWER_WIDTHS})

    def encode_parts(self, texts: Mapping[str, str | None], extra: Mapping | None = None) -> list:
        """CONDITIONING from one text per tower (None: that tower gets no tokens); ``extra`` is added to the
        options (CLIPTextEncodeFlux's guidance)."""
        if self.type == "flux":
            context, _ = self._run("t5xxl", texts.get("t5xxl"))
            _, pooled = self._run("l", texts.get("l"))
        else:
            context, pooled = self._sd3(texts)
        return [[context, {"pooled_output": pooled, **(extra or {})}]]

    def _run(self, name: str, text: str | None, chunks: int | None = None):
        tower = self.towers[name]
        layer = self.layer_idx if name != "t5xxl" else None
        z, pooled = tower.encode(text, chunks, layer)
        return np.asarray(z, F32), None if pooled is None else np.asarray(pooled, F32)

    def _sd3(self, texts: Mapping[str, str | None]):
        l_text, g_text = texts.get("l"), texts.get("g")
        if (l_text is None) != (g_text is None):  # one dropped: CLIPTextEncodeSD3 refills it with empty prompts
            l_text, g_text = l_text or "", g_text or ""
        has_l, has_g = "l" in self.towers, "g" in self.towers
        lg = pooled = None
        if l_text is not None or g_text is not None:
            # CLIPTextEncodeSD3 pads the shorter of clip_l / clip_g with empty-prompt chunks
            n = max([self.towers[k].chunks(t) for k, t in (("l", l_text), ("g", g_text))
                     if t is not None and k in self.towers] or [1])
            l_pooled = np.zeros((1, 768), F32)
            if has_l:
                lg, l_pooled = self._run("l", l_text, n)
            if has_g:
                g_out, g_pooled = self._run("g", g_text, n)
                if lg is not None:
                    cut = min(lg.shape[1], g_out.shape[1])
                    lg = np.concatenate([lg[:, :cut], g_out[:, :cut]], axis=-1)
                else:
                    lg = np.pad(g_out, ((0, 0), (0, 0), (768, 0)))
            else:
                g_pooled = np.zeros((1, 1280), F32)
            if lg is not None:
                lg = np.pad(lg, ((0, 0), (0, 0), (0, 4096 - lg.shape[-1])))
            pooled = np.concatenate([l_pooled, g_pooled], axis=-1)
        out = lg
        if "t5xxl" in self.towers:
            t5, _ = self._run("t5xxl", texts.get("t5xxl"))
            out = t5 if lg is None else np.concatenate([lg, t5], axis=-2)
        if out is None:
            out = np.zeros((1, 77, 4096), F32)
        if pooled is None:
            pooled = np.zeros((1, 768 + 1280), F32)
        return out.astype(F32), pooled.astype(F32)


def encode_sd3(clip: FlowClip, clip_l: str, clip_g: str, t5xxl: str, empty_padding: str) -> list:
    """CLIPTextEncodeSD3: with ``empty_padding="none"`` an empty text gives its tower no tokens."""
    if not isinstance(clip, FlowClip) or clip.type != "sd3":
        raise ValueError(f"clip: received {_describe(clip)}, expected an SD3 CLIP (TripleCLIPLoader, DualCLIPLoader "
                         "type sd3, or an SD3 checkpoint)")
    drop = empty_padding == "none"
    texts = {name: (None if drop and text == "" else text)
             for name, text in (("l", clip_l), ("g", clip_g), ("t5xxl", t5xxl))}
    return clip.encode_parts(texts)


def encode_flux(clip: FlowClip, clip_l: str, t5xxl: str, guidance: float) -> list:
    """CLIPTextEncodeFlux: clip_l's and T5's own texts, and the guidance on the conditioning."""
    if not isinstance(clip, FlowClip) or clip.type != "flux":
        raise ValueError(f"clip: received {_describe(clip)}, expected a FLUX CLIP (DualCLIPLoader type flux, or a "
                         "FLUX checkpoint)")
    return clip.encode_parts({"l": clip_l, "t5xxl": t5xxl}, {"guidance": float(guidance)})


def _describe(clip) -> str:
    kind = getattr(clip, "type", None) or getattr(clip, "family", None)
    return f"a {kind} CLIP" if kind else type(clip).__name__
