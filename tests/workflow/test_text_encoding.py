"""CLIPTextEncode's tokenisation as ComfyUI 0.3.64 does it (comfy/sd1_clip.py SDTokenizer).

Token ids are checked against transformers' CLIPTokenizer on the tiny checkpoint's tokenizer files;
weights and 77-token chunking against hand-worked cases. ComfyUI 0.3.64 ran with transformers 4.x,
whose ``CLIPTokenizer`` is the pure-Python one: without ftfy it cleans text with BasicTokenizer
(control/format characters dropped, CJK ideographs split into words), which transformers 5's
tokenizers-backed CLIPTokenizer does not; those cases are checked by hand.
"""
from __future__ import annotations

import pytest

from ksampler_rt.workflow.tokenizer import ClipTokenizer, basic_clean, embedding_split

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a red apple",
    "A photo of a CAT, sitting on a red chair; highly-detailed!!! (sharp focus)",
    "Hello,   World!!  \t tabs\nand newlines",
    "4k 8k 1920x1080 3.14159 #1 $20 50% 2024-01-31",
    "it's don't we're I'LL you've she'd I'm",
    "café naïve Ünïcödé façade Ærøskøbing straße",
    "emoji 🍎🍏 and symbols ©®™ → ← ★",
    "日本語のテキスト and 中文",
    "quotes \"double\" 'single' `back` [brackets] {braces} <angle>",
    "a <|endoftext|> b <|startoftext|>c",
    "masterpiece, best quality, " * 12,  # > 77 tokens
    "x" * 200,
    "   ",
    "",
]


@pytest.fixture(scope="module")
def tokenizers(tiny_sd15):
    folder = tiny_sd15.export_dir / "tokenizer"
    return ClipTokenizer(folder), transformers.CLIPTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_transformers(tokenizers, prompt):
    ours, ref = tokenizers
    cleaned = basic_clean(prompt)  # a no-op for everything but control characters and CJK ideographs
    assert ours.encode_words(prompt) == ref(cleaned)["input_ids"][1:-1]
    if not any(0x4E00 <= ord(c) <= 0x9FFF for c in prompt):
        assert ours.encode_words(prompt) == ref(prompt)["input_ids"][1:-1]


def test_special_tokens(tokenizers):
    ours, ref = tokenizers
    assert ref("")["input_ids"] == [ours.start_token, ours.end_token]
    assert ours.pad_token == ours.end_token  # SD1.x pads with the end token


def test_comfyui_basic_tokenizer_clean_up(tokenizers):
    ours, ref = tokenizers
    # soft hyphen / zero-width joiner are format characters (Cf): dropped by ComfyUI's tokenizer
    assert basic_clean("soft\u00adhyphen") == "softhyphen"
    assert ours.encode_words("soft\u00adhyphen") == ref("softhyphen")["input_ids"][1:-1]
    assert basic_clean("👩\u200d👩") == "👩👩"
    # CJK ideographs become separate words (kana do not); NBSP is a space
    assert basic_clean("日本語のテキスト") == "日 本 語 のテキスト"
    assert ours.encode_words("日本") == ref("日")["input_ids"][1:-1] + ref("本")["input_ids"][1:-1]
    assert basic_clean("A\u00a0B\x00C\ufffd") == "a bc"


def chunk_ids(tok, text):
    return [[t.id for t in chunk] for chunk in tok.tokenize_with_weights(text)]


def chunk_weights(tok, text):
    return [[round(t.weight, 6) for t in chunk] for chunk in tok.tokenize_with_weights(text)]


def test_plain_prompt_is_one_padded_chunk(tokenizers):
    ours, ref = tokenizers
    body = ref("a red apple")["input_ids"][1:-1]
    (chunk,) = chunk_ids(ours, "a red apple")
    assert chunk == [ours.start_token] + body + [ours.end_token] * (77 - 1 - len(body))
    assert chunk_weights(ours, "a red apple") == [[1.0] * 77]


def words(ref, text):
    return ref(text)["input_ids"][1:-1]


def test_weights_hand_checked(tokenizers):
    ours, ref = tokenizers
    a, red, apple = words(ref, "a"), words(ref, "red"), words(ref, "apple")

    def body(text):
        chunk = ours.tokenize_with_weights(text)[0]
        end = [t.id for t in chunk].index(ours.end_token)
        return [(t.id, round(t.weight, 6)) for t in chunk[1:end]]

    assert body("a (red) apple") == [(i, 1.0) for i in a] + [(i, 1.1) for i in red] + [(i, 1.0) for i in apple]
    assert body("((red))") == [(i, 1.21) for i in red]
    assert body("(red apple:1.3)") == [(i, 1.3) for i in red + apple]
    assert body("(a (red:0.5) apple:2)") == [(i, 2.0) for i in a] + [(i, 0.5) for i in red] + [(i, 2.0) for i in apple]
    assert body("(red:-1)") == [(i, -1.0) for i in red]
    # escaped parentheses are text, weight 1
    assert body(r"\(red\)") == [(i, 1.0) for i in words(ref, "(red)")]
    assert body(r"(\(red\):1.5)") == [(i, 1.5) for i in words(ref, "(red)")]
    # a colon that is not followed by a number keeps the text and the 1.1 factor
    assert body("(red: apple)") == [(i, 1.1) for i in words(ref, "red: apple")]
    # unbalanced parentheses are kept as text
    assert body("red) apple") == [(i, 1.0) for i in words(ref, "red) apple")]
    # the special pad/end tokens after the text always weigh 1
    assert all(t.weight == 1.0 for t in ours.tokenize_with_weights("(red:1.5)")[0][1 + len(red):])


def test_long_prompts_are_concatenated_77_token_chunks(tokenizers):
    ours, ref = tokenizers
    apple = words(ref, "apple")
    assert len(apple) == 1
    # one 80-token segment (>= 8 tokens) is split across chunks: 75 + 5
    chunks = chunk_ids(ours, "apple " * 80)
    assert len(chunks) == 2 and all(len(c) == 77 for c in chunks)
    assert chunks[0] == [ours.start_token] + apple * 75 + [ours.end_token]
    assert chunks[1] == [ours.start_token] + apple * 5 + [ours.end_token] * 71
    # a short weighted segment that does not fit moves to the next chunk whole; the first is padded
    red_apple = words(ref, "red apple")
    chunks = ours.tokenize_with_weights("apple " * 74 + "(red apple:1.2)")
    ids = [[t.id for t in c] for c in chunks]
    assert ids[0] == [ours.start_token] + apple * 74 + [ours.end_token, ours.pad_token]
    assert ids[1] == [ours.start_token] + red_apple + [ours.end_token] * (76 - len(red_apple))
    assert [t.weight for t in chunks[1][1:1 + len(red_apple)]] == [1.2] * len(red_apple)
    # exactly 75 tokens fit in one chunk
    assert len(chunk_ids(ours, "apple " * 75)) == 1 and len(chunk_ids(ours, "apple " * 76)) == 2


def test_empty_prompt(tokenizers):
    ours, _ = tokenizers
    assert chunk_ids(ours, "") == [[ours.start_token] + [ours.end_token] * 76]


def test_unknown_embeddings_are_dropped_like_comfyui():
    assert embedding_split("a photo embedding:style of a cat") == ["a photo", "of a cat"]
    assert embedding_split("embedding:style") == []
    assert embedding_split("a cat embedding:style, red") == ["a cat", ", red"]
    assert embedding_split("no embeddings here") == ["no embeddings here"]
