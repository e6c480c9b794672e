"""CLIPTextEncode as ComfyUI computes it, on CLIP engines.

ComfyUI 0.3.64 ``comfy/sd1_clip.py`` (``ClipTokenWeightEncoder.encode_token_weights``,
``SDClipModel``) and ``comfy/sdxl_clip.py``:

* every 77-token chunk of the prompt is encoded in one batch; when any token has a weight other
  than 1, an "empty" chunk ``[BOS, EOS, PAD...]`` is encoded alongside and each weighted token's
  vector becomes ``(z - z_empty) * weight + z_empty``;
* the chunks are concatenated along the token axis, ``[1, 77*k, D]``; the pooled output is the
  first chunk's;
* the layer used is the last one by default; ``CLIPSetLastLayer(n)`` picks hidden layer ``n``
  (negative, from the end); SD1.x/SD2.x apply the final layer norm to an intermediate layer,
  SDXL's towers do not (``layer_norm_hidden_state``);
* SDXL concatenates clip_l's and clip_g's hidden layer -2 (1280 + 768 = 2048 wide, cut to the
  shorter token count) and pools with clip_g (projected).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .tokenizer import ClipTokenizer, WeightedToken

# A tower's forward pass: input_ids int64 [B, 77] -> the exported outputs by name:
# last_hidden_state (after the final layer norm), penultimate_hidden_state (raw),
# penultimate_hidden_state_norm (with the final layer norm), pooled_output, and (exports from
# this version on) hidden_states / hidden_states_norm [B, L, 77, D] with every layer.
TowerForward = Callable[[np.ndarray], dict]


@dataclass(frozen=True)
class ClipTower:
    """One text encoder: its tokenizer, its forward pass and ComfyUI's layer options for it.

    Layers are ComfyUI's indices (-1 = last layer of ComfyUI's model). ``layer_offset`` maps them
    onto the exported model: diffusers' SD2 text encoder drops OpenCLIP-H's last layer, so
    ComfyUI's layer -2 is that model's last one (offset +1).
    """

    name: str
    tokenizer: ClipTokenizer
    forward: TowerForward
    num_layers: int                            # in ComfyUI's model (for its out-of-range fallback)
    default_layer: int | None = None           # None = last layer; -2 = penultimate
    layer_norm_hidden_state: bool = True
    layer_offset: int = 0
    all_hidden_states: bool = False            # the export has hidden_states[_norm] for every layer

    def empty_chunk(self) -> list[int]:
        t = self.tokenizer
        return [t.start_token, t.end_token] + [t.pad_token] * (t.max_length - 2)

    def source(self, layer: int | None) -> tuple[str, int | None]:
        """(output name, layer index in it or None) that ComfyUI's ``layer`` reads, or ValueError."""
        found = self._source(layer)
        if found is None:
            raise ValueError(f"stop_at_clip_layer: received {layer}, expected one of the layers this export "
                             f"provides for {self.name}: {self.supported_layers()} (or below -{self.num_layers}, "
                             "which ComfyUI treats as the last layer)")
        return found

    def _source(self, layer: int | None) -> tuple[str, int | None] | None:
        if layer is None or abs(layer) > self.num_layers:  # ComfyUI falls back to the last layer
            return "last_hidden_state", None
        index = layer + self.layer_offset  # onto the exported model, negative from its end
        exported = self.num_layers - self.layer_offset
        if index == -1 and self.layer_norm_hidden_state:
            return "last_hidden_state", None
        if index == -2:
            return ("penultimate_hidden_state_norm" if self.layer_norm_hidden_state else "penultimate_hidden_state"), None
        if self.all_hidden_states and -exported <= index < 0:
            return ("hidden_states_norm" if self.layer_norm_hidden_state else "hidden_states"), exported + index
        return None

    def _hidden(self, outputs: dict, layer: int | None) -> np.ndarray:
        name, index = self.source(layer)
        return outputs[name] if index is None else outputs[name][:, index]

    def supported_layers(self) -> list[int]:
        """The CLIPSetLastLayer values the exported outputs can serve (in ComfyUI's numbering)."""
        return [layer for layer in range(-self.num_layers, 0) if self._source(layer) is not None]

    def encode_chunks(self, chunks: list[list[WeightedToken]], layer: int | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(z [1, 77*k, D], pooled [1, P] or None) with ComfyUI's weighting."""
        weighted = any(tok.weight != 1.0 for chunk in chunks for tok in chunk)
        ids = [[tok.id for tok in chunk] for chunk in chunks]
        if weighted:
            ids.append(self.empty_chunk())
        outputs = self.forward(np.asarray(ids, dtype=np.int64))
        z = np.array(self._hidden(outputs, layer), dtype=np.float32)
        pooled = outputs.get("pooled_output")
        if weighted:
            z_empty = z[-1]
            for k, chunk in enumerate(chunks):
                w = np.array([tok.weight for tok in chunk], dtype=np.float32)[:, None]
                rows = w[:, 0] != 1.0
                z[k, rows] = ((z[k] - z_empty) * w + z_empty)[rows]
        out = z[:len(chunks)].reshape(1, -1, z.shape[-1])
        first_pooled = None if pooled is None else np.asarray(pooled[0:1], dtype=np.float32)
        return out, first_pooled


@dataclass(frozen=True)
class Clip:
    """ComfyUI's CLIP object: one tower (SD1.x/SD2.x) or clip_l + clip_g (SDXL)."""

    towers: tuple[ClipTower, ...]
    family: str
    layer_idx: int | None = None   # set by CLIPSetLastLayer

    def clip_layer(self, layer_idx: int) -> "Clip":
        return replace(self, layer_idx=layer_idx)

    def tokenize(self, text: str) -> list[list[list[WeightedToken]]]:
        return [tower.tokenizer.tokenize_with_weights(text) for tower in self.towers]

    def _layer(self, tower: ClipTower) -> int | None:
        return self.layer_idx if self.layer_idx is not None else tower.default_layer

    def encode(self, text: str) -> list:
        """CONDITIONING ``[[cond [1, 77k, D], {"pooled_output": pooled}]]``."""
        if not isinstance(text, str):
            raise ValueError(f"text: received {type(text).__name__}, expected a string")
        if len(self.towers) == 1:
            tower = self.towers[0]
            cond, pooled = tower.encode_chunks(tower.tokenizer.tokenize_with_weights(text), self._layer(tower))
            return [[cond, {"pooled_output": pooled}]]
        clip_l, clip_g = self.towers
        l_out, _ = clip_l.encode_chunks(clip_l.tokenizer.tokenize_with_weights(text), self._layer(clip_l))
        g_out, g_pooled = clip_g.encode_chunks(clip_g.tokenizer.tokenize_with_weights(text), self._layer(clip_g))
        cut = min(l_out.shape[1], g_out.shape[1])
        cond = np.concatenate([l_out[:, :cut], g_out[:, :cut]], axis=-1)
        return [[cond, {"pooled_output": g_pooled}]]
