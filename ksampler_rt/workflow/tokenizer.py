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
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
_CLIP_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
MAX_WORD_LENGTH = 8  # ComfyUI splits a weighted segment across chunks only from this length on


# CJK ideograph blocks that transformers' BasicTokenizer surrounds with spaces (kana and hangul are not)
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def basic_clean(text: str) -> str:
    """The text clean-up ComfyUI's CLIP tokenizer applies before BPE.

    ComfyUI 0.3.64 loads ``transformers.CLIPTokenizer`` (transformers 4.x: the pure-Python one),
    which without ``ftfy`` installed (ComfyUI does not require it) pre-processes with
    ``BasicTokenizer(strip_accents=False, do_split_on_punc=False)``: drop NUL, U+FFFD and control /
    format characters (Unicode category C*, e.g. soft hyphen and zero-width joiner; tab, newline
    and CR become spaces), map space separators (Zs) to a space, put spaces around CJK ideographs
    (so each is its own word), NFC-normalise, split on whitespace and lowercase. The ``tokenizers``
    pipeline alone (CLIPTokenizerFast / transformers 5) does none of the dropping or CJK spacing.
    """
    out = []
    for ch in text:
        cp = ord(ch)
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif cp == 0 or cp == 0xFFFD or unicodedata.category(ch).startswith("C"):
            continue
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    text = unicodedata.normalize("NFC", "".join(out))
    return " ".join(word.lower() for word in text.split())


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
        # the special tokens written in a prompt are matched as themselves, as transformers does
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS_TOKEN, EOS_TOKEN)
                                if t in vocab])
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
        """Token ids of ``text`` without BOS/EOS, as ComfyUI's tokenizer gives them (see :func:`basic_clean`)."""
        pieces, rest = [], text
        while True:  # keep special tokens whole, clean the text between them (transformers' added-token split)
            hits = [(rest.find(t), t) for t in (BOS_TOKEN, EOS_TOKEN) if t in rest]
            if not hits:
                pieces.append(basic_clean(rest))
                break
            at, special = min(hits)
            pieces += [basic_clean(rest[:at]), special]
            rest = rest[at + len(special):]
        return self._tok.encode(" ".join(p for p in pieces if p), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    # -- ComfyUI's weighted chunking --------------------------------------------------------
    def tokenize_with_weights(self, text: str) -> list[list[WeightedToken]]:
        """Chunks of exactly ``max_length`` (id, weight) pairs, as ComfyUI's SDTokenizer."""
        groups = []
        for segment, weight in token_weights(escape_important(text), 1.0):
            for words in embedding_split(unescape_important(segment)):
                groups.append([WeightedToken(i, weight) for i in self.encode_words(words)])

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


EMBEDDING = "embedding:"


def embedding_split(segment: str) -> list[str]:
    """The pieces of a weighted segment ComfyUI tokenises one by one (each is one word group).

    ComfyUI cuts a segment before every ``" embedding:"`` / ``"\\nembedding:"`` and looks the name up
    in its embeddings folder. ksampler-rt has no textual-inversion embeddings, which is ComfyUI's
    "embedding ... does not exist, ignoring" case: the ``embedding:name`` word is dropped and the
    rest of that piece is tokenised (``name,`` keeps the trailing commas, as ComfyUI's retry with
    the commas stripped does).
    """
    parts = re.split(" " + EMBEDDING + "|\n" + EMBEDDING, segment)
    pieces = [parts[0]] + [EMBEDDING + p for p in parts[1:]]
    out = []
    for piece in pieces:
        if not piece:
            continue
        if piece.startswith(EMBEDDING):
            words = piece[len(EMBEDDING):].strip("\n").split()
            name, leftover = (words[0] if words else ""), " ".join(words[1:])
            stripped = name.strip(",")
            if len(stripped) < len(name):
                leftover = f"{name[len(stripped):]} {leftover}"
            if not leftover:
                continue
            piece = leftover
        out.append(piece)
    return out


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
