"""ComfyUI's prompt-weight parsing, checked against hand-worked cases (comfy/sd1_clip.py)."""

from ksampler_rt.workflow.tokenizer import escape_important, parse_parentheses, token_weights, unescape_important


def weights(text):
    return [(unescape_important(t), round(w, 6)) for t, w in token_weights(escape_important(text), 1.0)]


def test_plain_text_has_weight_one():
    assert weights("a red apple") == [("a red apple", 1.0)]


def test_parentheses_multiply_by_1_1_and_nest():
    assert weights("a (red) apple") == [("a ", 1.0), ("red", 1.1), (" apple", 1.0)]
    assert weights("((red))") == [("red", 1.21)]


def test_explicit_weight_and_nested_explicit():
    assert weights("(red apple:1.3), table") == [("red apple", 1.3), (", table", 1.0)]
    assert weights("(a (b:0.5) c:2)") == [("a ", 2.0), ("b", 0.5), (" c", 2.0)]


def test_not_a_number_after_colon_keeps_text_and_multiplies():
    assert weights("(time: noon)") == [("time: noon", 1.1)]


def test_escaped_parentheses_are_literal():
    assert weights(r"a \(red\) apple") == [("a (red) apple", 1.0)]


def test_unbalanced_parentheses_follow_comfyui():
    assert parse_parentheses("a (b") == ["a ", "(b"]
    assert weights("a (b") == [("a ", 1.0), ("(b", 1.0)]
    assert parse_parentheses("a) b") == ["a) b"]  # depth goes negative: no split (traced by hand)
