"""A1111 prompt syntax: emphasis weights (parse_weights) and prompt editing over steps (prompt_schedule)."""

from __future__ import annotations

import pytest

from ella.errors import EllaError
from ella.prompts import (
    BREAK,
    MAX_VARIANTS,
    has_editing,
    has_weights,
    parse_weights,
    plain_text,
    prompt_schedule,
    prompt_variants,
    weight_spans,
)

R, S = 1.1, 1 / 1.1  # A1111's ( ) and [ ] multipliers


def weights(prompt: str) -> list[tuple[str, float | None]]:
    """parse_weights with weights rounded, so that products compare by value."""
    return [(text, None if w is None else round(w, 9)) for text, w in parse_weights(prompt)]


def expect(*segments) -> list:
    return [(text, None if w is None else round(w, 9)) for text, w in segments]


# --------------------------------------------------------------------------------------------------------- emphasis
@pytest.mark.parametrize(
    ("prompt", "segments"),
    [
        ("a (b) c", [("a ", 1), ("b", R), (" c", 1)]),
        ("((b))", [("b", R * R)]),
        ("(((b)))", [("b", R**3)]),
        ("[b]", [("b", S)]),
        ("[[b]]", [("b", S * S)]),
        ("([b])", [("b", 1)]),
        ("(b:1.3)", [("b", 1.3)]),
        ("((b:1.3))", [("b", 1.3 * R)]),
        ("(((b:1.3)))", [("b", 1.3 * R * R)]),
        ("[(b:1.3)]", [("b", 1.3 * S)]),
        ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
        ("(b: 2 )", [("b", 2)]),
        ("(b:+2)", [("b", 2)]),
        ("(b:-0.5)", [("b", -0.5)]),
        ("(b:.5)", [("b", 0.5)]),
        ("(b:3.)", [("b", 3)]),
        ("(a:b)", [("a:b", R)]),  # not a number: the colon is text and the bracket plain emphasis
        ("(a:1.2.3)", [("a:1.2.3", R)]),
        ("a: b, c:d", [("a: b, c:d", 1)]),
        ("(a)(b) (c:1.1)", [("ab", R), (" ", 1), ("c", 1.1)]),  # equal weights merge across brackets
    ],
)
def test_emphasis(prompt, segments):
    assert weights(prompt) == expect(*segments)


def test_weights_are_unrounded_products():
    assert parse_weights("((a))") == [("a", 1.1 * 1.1)]
    assert parse_weights("(((a:1.3)))") == [("a", 1.3 * 1.1 * 1.1)]


def test_weight_one_is_exact_and_merges():
    assert parse_weights("(a:1.0)") == [("a", 1.0)]
    assert parse_weights("a (b:1) c") == [("a b c", 1.0)]
    assert not has_weights("a (b:1) c") and not has_weights("a BREAK b") and has_weights("a [b]")


@pytest.mark.parametrize("text", ["a red cat", "a: b | c, d", "ünïcode ✓  spaces\n", "BREAKING news", "x"])
def test_text_without_markup_is_one_segment(text):
    assert parse_weights(text) == [(text, 1.0)]
    assert plain_text(parse_weights(text)) == text and weight_spans(parse_weights(text)) == []


def test_empty_prompt():
    assert parse_weights("") == [] and plain_text([]) == "" and weight_spans([]) == []


def test_escapes_are_literal_and_lose_their_backslash():
    assert parse_weights(r"\(a\) \[b\] c\\d e\:1.2") == [(r"(a) [b] c\d e:1.2", 1.0)]
    assert weights(r"(a\:1.2)") == expect(("a:1.2", R))
    assert weights(r"(a \) b)") == expect(("a ) b", R))
    assert parse_weights(r"a\nb") == [(r"a\nb", 1.0)]  # not an emphasis escape: the backslash stays


def test_unbalanced_brackets():
    assert weights("a (b c") == expect(("a ", 1), ("b c", R))  # an unclosed bracket weights the rest
    assert weights("a ((b (c:2) d") == expect(("a ", 1), ("b ", R * R), ("c", 2 * R * R), (" d", R * R))
    assert weights("a [b") == expect(("a ", 1), ("b", S))
    assert weights("a) b] c") == expect(("a b c", 1))  # stray closers are dropped
    assert weights("a:1.5) b") == expect(("a:1.5 b", 1))
    assert weights("(a [b:1.5) c]") == expect(("a ", 1.5), ("b", 1.5 * S), (" c", S))  # ":w)" closes the "("


def test_break():
    assert parse_weights("a BREAK b") == [("a ", 1.0), (BREAK, None), (" b", 1.0)]
    assert parse_weights("BREAK a") == [(BREAK, None), (" a", 1.0)]
    assert parse_weights("a\nBREAK\t(b)") == [("a\n", 1.0), (BREAK, None), ("\t", 1.0), ("b", 1.1)]
    assert parse_weights("BREAK") == [(BREAK, None)]
    assert weights("(a BREAK b)") == expect(("a ", R), (BREAK, None), (" b", R))
    for not_a_break in ["BREAKING", "aBREAK", "Break", "break", "(BREAK)", "a,BREAK"]:
        assert all(w is not None for _, w in parse_weights(not_a_break)), not_a_break
    segments = parse_weights("(a) BREAK BREAK b")
    assert [w for _, w in segments].count(None) == 2 and plain_text(segments) == "a   b"


@pytest.mark.parametrize(
    "prompt",
    ["a (b) c [d] e", "((a:1.3) b) BREAK [c (d:1)] e", r"\(x\) (y", "[[a]] (b:0) BREAK", "(a)(b:1.2)c", ""],
)
def test_weight_spans_index_plain_text(prompt):
    segments = parse_weights(prompt)
    text = plain_text(segments)
    per_char = [w for t, w in segments if w is not None for _ in t]
    assert len(per_char) == len(text)
    covered = {}
    for start, end, weight in weight_spans(segments):
        assert 0 <= start < end <= len(text) and weight != 1.0
        covered.update(dict.fromkeys(range(start, end), weight))
    assert covered == {i: w for i, w in enumerate(per_char) if w != 1.0}


def test_weight_spans_example():
    segments = parse_weights("a (red:1.5) car BREAK [fast]")
    assert plain_text(segments) == "a red car  fast"
    assert weights_rounded(weight_spans(segments)) == [(2, 5, 1.5), (11, 15, round(S, 9))]


def weights_rounded(spans):
    return [(s, e, round(w, 9)) for s, e, w in spans]


# ---------------------------------------------------------------------------------------------------------- editing
@pytest.mark.parametrize(
    ("prompt", "steps", "texts"),
    [
        ("[a:b:0.5]", 10, "aaaaabbbbb"),
        ("[a:b:0.25]", 10, "aabbbbbbbb"),  # int(2.5) = 2
        ("[a:b:0.25]", 4, "abbb"),
        ("[a:b:3]", 10, "aaabbbbbbb"),
        ("[a:b:2]", 4, "aabb"),
        ("[a:b:2.0]", 4, "aaaa"),  # a "." makes it a fraction: 2.0 * 4 steps, clamped
        ("[a:b:100]", 5, "aaaaa"),
        ("[a:b:1.0]", 3, "aaa"),
        ("[a:b:0]", 3, "bbb"),
        ("[a:b:0.0]", 3, "bbb"),
        ("[a:b:-2]", 3, "bbb"),
        ("[a:b: 1 ]", 3, "abb"),
        ("[b:2]", 4, ["", "", "b", "b"]),
        ("[a::2]", 4, ["a", "a", "", ""]),
        ("[a|b|c]", 7, "abcabca"),
        ("[a|]", 3, ["a", "", "a"]),
        ("[|a]", 2, ["", "a"]),
        ("[a:b:0.5]", 1, "b"),  # int(0.5) = 0
    ],
)
def test_schedule_single_construct(prompt, steps, texts):
    assert prompt_schedule(prompt, steps) == list(texts)


def test_schedule_in_context_and_lockstep():
    assert prompt_schedule("a [red|blue] car, [x:y:1]", 3) == ["a red car, x", "a blue car, y", "a red car, y"]
    assert prompt_schedule("[a|b] [c|d] [e|f|g]", 4) == ["a c e", "b d f", "a c g", "b d e"]


def test_nesting():
    assert prompt_schedule("[[a|b]:c:0.5]", 6) == ["a", "b", "a", "c", "c", "c"]
    assert prompt_schedule("[a:[b|c]:2]", 5) == ["a", "a", "b", "c", "b"]
    assert prompt_schedule("[[x:y:1]:z:3]", 4) == ["x", "y", "y", "z"]
    assert prompt_schedule("[[a:b:1]|c]", 3) == ["a", "c", "b"]
    assert prompt_schedule("[(a:1.2):b:1]", 2) == ["(a:1.2)", "b"]  # a colon inside ( ) is emphasis
    assert prompt_schedule("[[a]:b:1]", 2) == ["[a]", "b"]


def test_emphasis_is_left_for_parse_weights():
    texts = prompt_schedule("(a [red:blue:0.5] car:1.2), [dim] ((x)) [p:q]", 2)
    assert texts == ["(a red car:1.2), [dim] ((x)) [p:q]", "(a blue car:1.2), [dim] ((x)) [p:q]"]
    assert parse_weights(texts[1])[0] == ("a blue car", 1.2)
    assert prompt_schedule("[(a [b|c]:1.3)]", 2) == ["[(a b:1.3)]", "[(a c:1.3)]"]  # editing inside emphasis


def test_escapes_never_start_a_construct():
    for prompt in [r"\[a:b:1]", r"\[a|b]", r"[a:b:1\]", r"(\[a|b\])"]:
        assert not has_editing(prompt)
        assert prompt_schedule(prompt, 3) == [prompt] * 3
    assert prompt_schedule(r"[\]x:b:1]", 2) == [r"\]x", "b"]
    assert prompt_schedule(r"[a\|b|c]", 2) == [r"a\|b", "c"]


@pytest.mark.parametrize(
    "prompt", ["[a]", "[a:b]", "[a:b:x]", "[a:b:c:1]", "[a|b:1]", "[a:b:1", "[a|b", "a | b : 2", "(a:0.5)", ""]
)
def test_not_editing_is_left_as_is(prompt):
    assert not has_editing(prompt)
    assert prompt_schedule(prompt, 4) == [prompt] * 4
    assert prompt_variants(prompt) == [prompt]


def test_has_editing():
    for prompt in ["[a:b:1]", "[b:0.5]", "[a::2]", "[a|b]", "x ([a|b]:1.2)", "[[a|b]]", "[a:b:1] (unclosed"]:
        assert has_editing(prompt), prompt


TRICKY = [
    "[a:b:0.5]",
    "[a:b:0]",
    "[a:b:1.0]",
    "[a:b:7]",
    "[a:b:0.05]",
    "[a:b:0.29]",
    "[to:3]",
    "[from::0.3]",
    "x [a|b] y [c|d]",
    "[a|b|c] [d|e]",
    "[[a|b]:[c|d|e]:0.5]",
    "[a:[b:c:0.7]:2]",
    "[[a:b:3]|[c::0.2]|]",
    "(a [red:blue:0.5] car:1.2) BREAK [x|y]",
    "[[a]:(b:1.3):4] \\[not:edit:1] [p:q]",
    "[a:b:-1] [c:d:1.5] [e|f",
]


@pytest.mark.parametrize("prompt", TRICKY)
def test_variants_cover_every_schedule(prompt):
    variants = prompt_variants(prompt)
    assert len(variants) == len(set(variants))
    seen = {text for steps in range(1, 61) for text in prompt_schedule(prompt, steps)}
    assert seen <= set(variants), seen - set(variants)


def test_variants_exact_cases():
    assert prompt_variants("[a:b:0.5]") == ["a", "b"]
    assert prompt_variants("[a:b:0]") == ["b"]  # "a" is never shown
    assert prompt_variants("[a:b:1.0]") == ["a"]
    assert prompt_variants("x [a|b] y [c|d]") == ["x a y c", "x a y d", "x b y c", "x b y d"]
    assert prompt_variants("[a|a] [b:b:1]") == ["a b"]


def test_too_many_variants():
    assert len(prompt_variants("[a|b] " * 6)) == MAX_VARIANTS
    with pytest.raises(EllaError, match=r"more than 64"):
        prompt_variants("[a|b] " * 7)
    with pytest.raises(EllaError):
        prompt_variants("[" + "|".join(str(i) for i in range(MAX_VARIANTS + 1)) + "]")


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10", None])
def test_bad_steps(steps):
    with pytest.raises(EllaError, match=r"expected a whole number >= 1") as info:
        prompt_schedule("[a:b:0.5]", steps)
    assert "\n" not in str(info.value)


def test_deep_nesting_is_a_one_line_error():
    with pytest.raises(EllaError, match="too deeply"):
        prompt_schedule("[" * 5000, 1)


def test_literal_text_reads_back_unchanged_with_no_weights_and_no_editing():
    from ella.prompts import literal

    for text in ["a School Resource Officer (SRO) Program", "[a:b:0.5] (c:1.2) ((d)) [e|f] a\\b", "plain"]:
        escaped = literal(text)
        assert prompt_variants(escaped) == [escaped]
        assert parse_weights(escaped) == [(text, 1.0)]
