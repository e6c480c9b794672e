"""CLIP BPE tokenisation and ComfyUI's prompt-weighting syntax, without torch or transformers.

The BPE pipeline is CLIP's (NFC, whitespace collapse, lowercase, CLIP's word split, byte-level
BPE with a ``</w>`` end-of-word suffix), built with the ``tokenizers`` library from a checkpoint's
``vocab.json`` + ``merges.txt`` -- the same construction transformers uses for ``CLIPTokenizerFast``.

Weighting and chunking follow ComfyUI 0.3.64 ``comfy/sd1_clip.py`` (``parse_parentheses``,
``token_weights``, ``escape_important``, ``SDTokenizer.tokenize_with_weights``):

* ``(text)`` multiplies the weight by 1.1 (nested: 1.21 ...), ``(text:1.3)`` sets it, ``\\(`` and
  ``\\)`` are literal parentheses;
* each weighted segment is tokenised on its own, then packed into 77-token chunks
  ``[BOS, tokens..., EOS, PAD...]``; a segment that does not fit the current chunk moves to the
  next one whole, unless it is 8 tokens or longer, in which case it is split across chunks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
_CLIP_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
MAX_WORD_LENGTH = 8  # ComfyUI splits a weighted segment across chunks only from this length on


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#version"):
            continue
        a, b = line.split()
        merges.append((a, b))
    return merges


@dataclass(frozen=True)
class WeightedToken:
    id: int
    weight: float


class ClipTokenizer:
    """A checkpoint's CLIP tokenizer folder (``vocab.json``, ``merges.txt``)."""

    def __init__(self, folder: str | Path, *, max_length: int = 77, pad_with_end: bool = True):
        folder = Path(folder)
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise FileNotFoundError(f"tokenizer: {f} is missing; expected a CLIP tokenizer folder with "
                                        "vocab.json and merges.txt")
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        bpe = models.BPE(vocab=vocab, merges=_read_merges(merges_file), continuing_subword_prefix="",
                         end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS_TOKEN)
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self.vocab = vocab
        self.max_length = max_length
        try:
            self.start_token, self.end_token = vocab[BOS_TOKEN], vocab[EOS_TOKEN]
        except KeyError as missing:
            raise ValueError(f"tokenizer: {vocab_file} has no {missing} token; expected CLIP's special tokens") from None
        # SD1.x / clip_l pad with the end token; SDXL's clip_g pads with id 0 (ComfyUI pad_with_end=False)
        self.pad_token = self.end_token if pad_with_end else 0

    def encode_words(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    # -- ComfyUI's weighted chunking --------------------------------------------------------
    def tokenize_with_weights(self, text: str) -> list[list[WeightedToken]]:
        """Chunks of exactly ``max_length`` (id, weight) pairs, as ComfyUI's SDTokenizer."""
        groups = []
        for segment, weight in token_weights(escape_important(text), 1.0):
            segment = unescape_important(segment)
            if segment:
                ids = self.encode_words(segment)
                groups.append([WeightedToken(i, weight) for i in ids])

        start, end, pad, limit = self.start_token, self.end_token, self.pad_token, self.max_length
        chunk: list[WeightedToken] = [WeightedToken(start, 1.0)]
        chunks = [chunk]
        for group in groups:
            is_large = len(group) >= MAX_WORD_LENGTH
            while group:
                if len(group) + len(chunk) > limit - 1:
                    room = limit - len(chunk) - 1
                    if is_large:
                        chunk.extend(group[:room])
                        chunk.append(WeightedToken(end, 1.0))
                        group = group[room:]
                    else:
                        chunk.append(WeightedToken(end, 1.0))
                        chunk.extend([WeightedToken(pad, 1.0)] * room)
                    chunk = [WeightedToken(start, 1.0)]
                    chunks.append(chunk)
                else:
                    chunk.extend(group)
                    group = []
        chunk.append(WeightedToken(end, 1.0))
        chunk.extend([WeightedToken(pad, 1.0)] * (limit - len(chunk)))
        return chunks


def parse_parentheses(text: str) -> list[str]:
    """Split into top-level ``(...)`` groups and plain runs (ComfyUI's parse_parentheses)."""
    parts, current, depth = [], "", 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    parts.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                parts.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        parts.append(current)
    return parts


def token_weights(text: str, weight: float) -> list[tuple[str, float]]:
    """(segment, weight) pairs: ``(x)`` is x at weight*1.1, ``(x:w)`` is x at w, recursively."""
    out = []
    for part in parse_parentheses(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner, inner_weight = part[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += token_weights(inner, inner_weight)
        else:
            out.append((part, weight))
    return out


def escape_important(text: str) -> str:
    return text.replace("\\)", "\0\1").replace("\\(", "\0\2")


def unescape_important(text: str) -> str:
    return text.replace("\0\1", ")").replace("\0\2", "(")
