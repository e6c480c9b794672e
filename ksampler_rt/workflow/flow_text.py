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
tower's output with empty-prompt chunks: the engines' towers (:mod:`.flow_towers`) or the analytic stand-ins of
:mod:`ksampler_rt.serve.testing`. :func:`sd3_conditioning` / :func:`flux_conditioning` are the composition
itself over arrays (the export's tests use them against diffusers' pipelines). Widths come from the towers
(``tower.width``; the real models' 768 / 1280 / 4096 otherwise), so the tiny models compose the same way.
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

    def _width(self, name: str) -> int:
        tower = self.towers.get(name)
        return int(getattr(tower, "width", 0) or TOWER_WIDTHS[name])

    def _sd3(self, texts: Mapping[str, str | None]):
        l_text, g_text = texts.get("l"), texts.get("g")
        if (l_text is None) != (g_text is None):  # one dropped: CLIPTextEncodeSD3 refills it with empty prompts
            l_text, g_text = l_text or "", g_text or ""
        runs = {}
        if l_text is not None or g_text is not None:
            # CLIPTextEncodeSD3 pads the shorter of clip_l / clip_g with empty-prompt chunks
            n = max([self.towers[k].chunks(t) for k, t in (("l", l_text), ("g", g_text))
                     if t is not None and k in self.towers] or [1])
            runs = {k: self._run(k, t, n) for k, t in (("l", l_text), ("g", g_text)) if k in self.towers}
        l_hidden, l_pooled = runs.get("l", (None, None))
        g_hidden, g_pooled = runs.get("g", (None, None))
        t5 = self._run("t5xxl", texts.get("t5xxl"))[0] if "t5xxl" in self.towers else None
        return sd3_conditioning(l_hidden, l_pooled, g_hidden, g_pooled, t5, context_dim=self._width("t5xxl"), clip_l_dim=self._width("l"),
                                clip_g_dim=self._width("g"))


def _arr(name: str, a, ndim: int) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if a.ndim != ndim:
        raise ValueError(f"{name}: received shape {a.shape}, expected {ndim} dimensions")
    return a


def sd3_conditioning(clip_l_hidden=None, clip_l_pooled=None, clip_g_hidden=None, clip_g_pooled=None,
                     t5_hidden=None, *, context_dim: int = 4096, clip_l_dim: int = 768,
                     clip_g_dim: int = 1280) -> tuple[np.ndarray, np.ndarray]:
    """(context [B, T, D], pooled [B, P]) for SD3 / SD3.5 from the penultimate CLIP hidden states [B,77*k,w],
    the CLIP pooled vectors [B,w] and T5's last hidden state [B,T5,D]; any encoder may be None (see the module
    docstring). ``clip_l_dim`` / ``clip_g_dim``: the widths a missing CLIP's zeros take (real models' defaults)."""
    lg = None
    pooled = None
    if clip_l_hidden is not None or clip_g_hidden is not None:
        if clip_l_hidden is not None:
            lg = _arr("clip_l_hidden", clip_l_hidden, 3)
            l_pooled = _arr("clip_l_pooled", clip_l_pooled, 2)
        else:
            l_pooled = None
        if clip_g_hidden is not None:
            g = _arr("clip_g_hidden", clip_g_hidden, 3)
            g_pooled = _arr("clip_g_pooled", clip_g_pooled, 2)
            if lg is not None:
                cut = min(lg.shape[1], g.shape[1])
                lg = np.concatenate([lg[:, :cut], g[:, :cut]], axis=-1)
            else:
                width = clip_l_dim
                lg = np.concatenate([np.zeros(g.shape[:2] + (width,), np.float32), g], axis=-1)
        else:
            g_pooled = None
        batch = lg.shape[0]
        if l_pooled is None:
            l_pooled = np.zeros((batch, clip_l_dim), np.float32)
        if g_pooled is None:
            g_pooled = np.zeros((batch, clip_g_dim), np.float32)
        pooled = np.concatenate([l_pooled, g_pooled], axis=-1)
    t5 = _arr("t5_hidden", t5_hidden, 3) if t5_hidden is not None else None
    width = t5.shape[-1] if t5 is not None else context_dim
    out = None
    if lg is not None:
        if lg.shape[-1] > width:
            raise ValueError(f"clip_l_hidden + clip_g_hidden: received {lg.shape[-1]} features, expected at most "
                             f"{width} (the T5 / context width)")
        lg = np.pad(lg, ((0, 0), (0, 0), (0, width - lg.shape[-1])))
        out = lg
    if t5 is not None:
        out = np.concatenate([lg, t5], axis=1) if lg is not None else t5
    if out is None:
        out = np.zeros((1, 77, context_dim), np.float32)
    if pooled is None:
        pooled = np.zeros((out.shape[0], clip_l_dim + clip_g_dim), np.float32)
    return np.ascontiguousarray(out), np.ascontiguousarray(pooled)


def flux_conditioning(t5_hidden, clip_l_pooled) -> tuple[np.ndarray, np.ndarray]:
    """(context, pooled) for FLUX.1: T5's last hidden state and clip_l's un-projected pooled output."""
    return (np.ascontiguousarray(_arr("t5_hidden", t5_hidden, 3)),
            np.ascontiguousarray(_arr("clip_l_pooled", clip_l_pooled, 2)))


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
