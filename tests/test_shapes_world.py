"""The shapes world: reproducible scenes, dense captions, DPG-schema questions and a pixel oracle that scores them."""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict

import pytest
from PIL import Image

from ella.bench.data import git_blob_sha1, read_questions
from ella.bench.dpg import aggregate, score_items
from ella.errors import EllaError
from ella.shapes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    Obj,
    Scene,
    ShapesOracle,
    caption,
    caption_for,
    questions,
    render,
    sample_scene,
    scene_for,
    shapes_benchmark,
    write_csv,
)
from ella.shapes.captions import describe
from ella.shapes.language import TRAIN, estimate_tokens
from ella.shapes.world import PLURALS

SEED = 1234


@pytest.fixture(scope="module")
def oracle() -> ShapesOracle:
    return ShapesOracle()


def test_scenes_captions_questions_and_renders_are_reproducible():
    for i in range(20):
        assert scene_for(SEED, i) == scene_for(SEED, i)
        assert caption_for(SEED, i) == caption_for(SEED, i)
        assert questions(scene_for(SEED, i)) == questions(scene_for(SEED, i))
        scene = scene_for(SEED, i)
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
        assert render(scene).tobytes() == render(scene_for(SEED, i)).tobytes()  # pure
    # a fixed scene, so a change of sampler (or of Python's random) can't slip by unnoticed
    assert scene_for(0, 0) == Scene("black", (Obj("circle", "red", "large", 0, 1), Obj("circle", "red", "large", 2, 0)))
    assert len({scene_for(SEED, i) for i in range(100)}) >= 95
    assert scene_for(SEED, 0) != scene_for(SEED + 1, 0)
    for size in (32, 64, 128, 96):
        image = render(scene_for(SEED, 3), size)
        assert image.size == (size, size) and image.mode == "RGB"
    with pytest.raises(EllaError, match="size >= 32"):
        render(scene_for(SEED, 0), 16)


def test_sampling_invariants():
    scenes = [scene_for(SEED, i) for i in range(500)]
    sizes = Counter(len(s.objects) for s in scenes)
    assert set(sizes) == {1, 2, 3, 4, 5} and min(sizes.values()) >= 60, sizes
    counts = Counter()
    for s in scenes:
        cells = [(o.row, o.col) for o in s.objects]
        assert len(set(cells)) == len(cells)
        groups = s.groups()
        assert len({g.shape for g in groups}) == len(groups)
        assert sum(g.count for g in groups) == len(s.objects)
        counts.update(g.count for g in groups)
    assert counts[2] >= 30 and counts[3] >= 10, counts
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {o.colour for s in scenes for o in s.objects} == set(COLOURS)
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert len(sample_scene(random.Random(0), 9).objects) == 9
    assert all(len(scene_for(SEED, i, 4).objects) == 4 for i in range(20))


def test_bad_scenes_are_refused_with_one_line():
    with pytest.raises(EllaError, match="n_objects=0"):
        sample_scene(random.Random(0), 0)
    with pytest.raises(EllaError, match="unknown shape 'hexagon'"):
        Obj("hexagon", "red", "small", 0, 0)
    with pytest.raises(EllaError, match="share a grid cell"):
        Scene("white", (Obj("circle", "red", "small", 0, 0), Obj("square", "red", "small", 0, 0)))
    with pytest.raises(EllaError, match="share colour and size"):
        Scene("white", (Obj("circle", "red", "small", 0, 0), Obj("circle", "blue", "small", 0, 1)))
    with pytest.raises(EllaError, match="not a shapes scene"):
        Scene.from_dict({"objects": []})


def test_captions_state_every_fact_at_length():
    """Full captions name every group's colour, shape, size and count and the background; the few that
    leave facts out say so in their record. (``test_shapes_language`` reads every fact back exactly.)"""
    tokens, partial = defaultdict(list), 0
    for i in range(400):
        scene, cap = scene_for(SEED, i), describe(scene_for(SEED, i), random.Random(i))
        assert cap.text == caption(scene, random.Random(i))  # caption() is describe()'s text
        low = cap.text.lower()
        partial += not cap.specified.full
        assert (scene.background in low) == cap.specified.background, cap.text
        for g, said in zip(scene.groups(), cap.specified.groups):
            assert g.colour in low and (PLURALS[g.shape] if g.count > 1 else g.shape) in low, (g, cap.text)
            if said.size:
                assert any(w in low for w in TRAIN.sizes[g.size]), (g, cap.text)
        for a, _, b in cap.specified.relations:
            assert a in low and b in low
        tokens[len(scene.objects)].append(estimate_tokens(cap.text))
    assert 40 <= partial <= 130, partial  # UNDERSPECIFIED_RATE of them
    assert max(tokens[5]) <= 120 and sum(tokens[5]) / len(tokens[5]) > 50, tokens[5]
    rng = random.Random(0)
    variants = {caption(scene_for(SEED, 7), rng) for _ in range(20)}
    assert len(variants) >= 18  # wording varies; the facts don't


def test_questions_follow_the_dpg_schema(tmp_path):
    items = {f"shapes-{i:05d}": (caption_for(SEED, i), scene_for(SEED, i)) for i in range(60)}
    path = write_csv(items, tmp_path / "shapes.csv")
    read, texts, skipped, ignored = read_questions(path)
    assert not skipped and not ignored
    assert read == {k: questions(s) for k, (_, s) in items.items()}
    assert texts == {k: t for k, (t, _) in items.items()}
    categories = Counter()
    for qs in read.values():
        ids = [q.proposition_id for q in qs]
        assert ids == list(range(1, len(qs) + 1))
        for q in qs:
            assert all(p == 0 or p < q.proposition_id for p in q.parents)
            assert (q.parents == (0,)) == (q.category in ("entity", "global"))
            categories[q.subcategory] += 1
    assert set(categories) == {
        "entity - whole",
        "attribute - color",
        "attribute - size",
        "other - count",
        "relation - position",
        "relation - spatial",
        "global -",
    }
    bench, scenes = shapes_benchmark(60, SEED, csv_path=tmp_path / "b.csv")
    assert bench.name == "shapes" and list(bench.questions) == list(items) == list(scenes)
    assert bench.csv_blob == git_blob_sha1(tmp_path / "b.csv")
    assert bench.settings()["official_csv"] is False
    with pytest.raises(EllaError, match="at least one item"):
        shapes_benchmark(0, SEED)


def _accuracy(oracle, size: int, n: int, offset: int = 0) -> tuple[float, dict]:
    """Yes-rate of scene i's questions on the render of scene i + offset, overall and per subcategory."""
    per = defaultdict(list)
    for i in range(n):
        image = render(scene_for(SEED, i + offset), size)
        for q in questions(scene_for(SEED, i)):
            per[q.subcategory].append(oracle(image, q.question) == "yes")
    flat = [y for ys in per.values() for y in ys]
    return sum(flat) / len(flat), {k: round(100 * sum(v) / len(v), 1) for k, v in per.items()}


@pytest.mark.parametrize("size", [64, 128])
def test_oracle_answers_ground_truth_renders(oracle, size):
    rate, per_category = _accuracy(oracle, size, 300)
    print(f"\nGT yes-rate at {size}px: {100 * rate:.2f}% {per_category}")
    assert rate >= 0.97, per_category
    mismatched, per_category = _accuracy(oracle, size, 300, offset=1)
    print(f"mismatched yes-rate at {size}px: {100 * mismatched:.1f}% {per_category}")
    assert 0.05 <= mismatched <= 0.6, per_category


def test_oracle_is_fast_and_refuses_unknown_questions(oracle):
    images = [render(scene_for(SEED, 1000 + i)) for i in range(40)]
    start = time.perf_counter()
    for image in images:
        oracle.analyse(image)
    assert (time.perf_counter() - start) / len(images) < 0.05
    blank = Image.new("RGB", (64, 64), BACKGROUNDS["gray"])
    assert oracle.batch([blank, blank], ["Is there a circle?", "Is the background gray?"]) == ["no", "yes"]
    with pytest.raises(EllaError, match="does not understand the question 'Is this a photo\\?'"):
        oracle(blank, "Is this a photo?")


def _write_grids(directory, scenes: dict[str, Scene], shift: int = 0) -> None:
    """2x2 grids of ground-truth renders; ``shift`` pairs each item with another item's scene."""
    ids = list(scenes)
    for k, item_id in enumerate(ids):
        tile = render(scenes[ids[(k + shift) % len(ids)]], 64)
        grid = Image.new("RGB", (128, 128))
        for x, y in ((0, 0), (64, 0), (0, 64), (64, 64)):
            grid.paste(tile, (x, y))
        grid.save(directory / f"{item_id}.png")


def test_end_to_end_scoring_with_the_dpg_scorer(tmp_path, oracle):
    bench, scenes = shapes_benchmark(20, SEED)
    (tmp_path / "gt").mkdir()
    _write_grids(tmp_path / "gt", scenes)
    items, errors = score_items(bench, tmp_path / "gt", oracle)
    result = aggregate(bench, items, errors, official_compat=False)
    assert not errors and result["num_items"] == 20
    assert result["overall"] >= 97, result["subcategories"]
    (tmp_path / "wrong").mkdir()
    _write_grids(tmp_path / "wrong", scenes, shift=1)
    items, errors = score_items(bench, tmp_path / "wrong", oracle)
    wrong = aggregate(bench, items, errors, official_compat=False)
    print(f"\nshapes DPG score: ground truth {result['overall']:.1f}, mismatched {wrong['overall']:.1f}")
    assert wrong["overall"] < 40
