"""The text towers of SD3 / SD3.5 and FLUX.1 on engines: CLIP-L / CLIP-G and T5-XXL, as the
:class:`~ksampler_rt.workflow.flow_text.TextTower` s that :class:`~ksampler_rt.workflow.flow_text.FlowClip`
assembles into CONDITIONING.

ComfyUI 0.3.64 behaviour reproduced here:

* CLIP (``comfy/sd1_clip.py`` ``SDTokenizer`` / ``ClipTokenWeightEncoder``; ``sd3_clip.py``, ``flux.py``):
  77-token chunks with prompt weighting, exactly as :class:`~ksampler_rt.workflow.text_encoding.ClipTower`;
  SD3 reads layer -2 without the final layer norm from both towers (``layer="hidden", layer_idx=-2,
  layer_norm_hidden_state=False``), FLUX.1 only clip_l's pooled output. ``CLIPTextEncodeSD3`` pads the
  shorter of clip_l / clip_g with the chunks of an empty prompt.
* T5-XXL (``sd3_clip.T5XXLTokenizer``, ``flux.T5XXLTokenizer``: ``has_start_token=False``,
  ``pad_with_end=False``, no maximum length): one sequence -- the ids of each weighted segment without the
  tokenizer's closing ``</s>``, then ``</s>``, then ``<pad>`` up to at least 77 tokens (SD3) / 256 (FLUX.1).
  Weights as for CLIP, against the encoding of ``[</s>, <pad>...]`` of the same length; an SD3 prompt part
  dropped by ``empty_padding="none"`` encodes ``[</s>]`` alone (``gen_empty_tokens`` of length 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .text_encoding import ClipTower
from .tokenizer import WeightedToken, embedding_split, escape_important, token_weights, unescape_important

#: ComfyUI's T5 minimum lengths (``min_length``) per family.
T5_MIN_LENGTH = {"sd3": 77, "flux": 256, "flux-schnell": 256}

#: FlowClip's tower names for the exported text encoders.
TOWER_NAMES = {"clip_l": "l", "clip_g": "g", "t5xxl": "t5xxl"}


@dataclass(frozen=True)
class ClipTextTower:
    """clip_l or clip_g of a flow family: a :class:`ClipTower` in FlowClip's tower protocol."""

    name: str            # "l" or "g"
    tower: ClipTower
    width: int           # hidden width (768 / 1280 in the real models)
    pooled_width: int

    def chunks(self, text: str) -> int:
        return len(self.tower.tokenizer.tokenize_with_weights(text))

    def encode(self, text: str | None, chunks: int | None = None, layer: int | None = None):
        tok = self.tower.tokenizer
        batch = tok.tokenize_with_weights("" if text is None else text)
        if chunks is not None and chunks > len(batch):  # CLIPTextEncodeSD3: pad with empty-prompt chunks
            batch += tok.tokenize_with_weights("") * (chunks - len(batch))
        return self.tower.encode_chunks(batch, layer if layer is not None else self.tower.default_layer)


class T5Tokenizer:
    """ComfyUI's T5-XXL tokenisation over a ``tokenizer.json`` (the ``tokenizers`` library; what
    ``T5TokenizerFast`` reads), with its prompt-weighting syntax."""

    def __init__(self, folder: str | Path, *, min_length: int, end_token: int = 1, pad_token: int = 0):
        from tokenizers import Tokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: {path} is missing; expected a T5 tokenizer folder with "
                                    "tokenizer.json (ComfyUI's comfy/text_encoders/t5_tokenizer has one)")
        self._tok = Tokenizer.from_file(str(path))
        self.min_length, self.end_token, self.pad_token = int(min_length), int(end_token), int(pad_token)

    def _ids(self, words: str) -> list[int]:
        ids = self._tok.encode(words).ids  # the post-processor appends </s>, which ComfyUI drops
        return ids[:-1] if ids and ids[-1] == self.end_token else ids

    def tokenize_with_weights(self, text: str) -> list[WeightedToken]:
        tokens = [WeightedToken(i, weight)
                  for segment, weight in token_weights(escape_important(text), 1.0)
                  for words in embedding_split(unescape_important(segment))
                  for i in self._ids(words)]
        tokens.append(WeightedToken(self.end_token, 1.0))
        tokens += [WeightedToken(self.pad_token, 1.0)] * max(0, self.min_length - len(tokens))
        return tokens


@dataclass(frozen=True)
class T5TextTower:
    """T5-XXL: ``forward(input_ids [B, T]) -> {"last_hidden_state": [B, T, D]}``."""

    tokenizer: T5Tokenizer
    forward: Callable[[np.ndarray], dict]
    width: int
    name: str = "t5xxl"

    def chunks(self, text: str) -> int:
        return 1  # T5 is not chunked

    def encode(self, text: str | None, chunks: int | None = None, layer: int | None = None):
        if layer is not None:
            raise ValueError(f"stop_at_clip_layer: received {layer} for T5-XXL, expected the last layer (this "
                             "export gives T5's last hidden state only)")
        tok = self.tokenizer
        tokens = [WeightedToken(tok.end_token, 1.0)] if text is None else tok.tokenize_with_weights(text)
        ids = [[t.id for t in tokens]]
        weighted = any(t.weight != 1.0 for t in tokens)
        if weighted:  # ClipTokenWeightEncoder: weights pull away from the empty sequence of the same length
            ids.append([tok.end_token] + [tok.pad_token] * (len(tokens) - 1))
        z = np.array(self.forward(np.asarray(ids, dtype=np.int64))["last_hidden_state"], dtype=np.float32)
        if weighted:
            w = np.array([t.weight for t in tokens], dtype=np.float32)[:, None]
            rows = w[:, 0] != 1.0
            z[0, rows] = ((z[0] - z[1]) * w + z[1])[rows]
        return z[:1], None
