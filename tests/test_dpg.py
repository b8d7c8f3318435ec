"""DPG-Bench scoring protocol, the official-compat defects, data files, generation resume + sharding."""

from __future__ import annotations

import csv
import warnings
from collections import Counter

import pytest
import torch
from PIL import Image

from ella.bench.data import BenchmarkDataWarning, dpg_prompts, git_blob_sha1, load_benchmark
from ella.bench.dpg import score, split_grid
from ella.bench.generate import generate_grids, make_grid, shard_items
from ella.errors import EllaError

HEADER = [
    "item_id",
    "text",
    "keywords",
    "proposition_id",
    "dependency",
    "category_broad",
    "category_detailed",
    "tuple",
    "question_natural_language",
]
ROWS = [  # item a: entity <- attribute <- relation(1,2); global. item b: entity <- color, count
    ("a", "1", "0", "entity - whole (cat)", "Is there a cat?"),
    ("a", "2", "1", "attribute - color (cat, red)", "Is the cat red?"),
    ("a", "3", "1,2", "relation - spatial (cat, chair, on)", "Is the red cat on the chair?"),
    ("a", "4", "0", "global - (photo)", "Is this a photo?"),
    ("b", "1", "0", "entity - whole (lamp)", "Is there a lamp?"),
    ("b", "2", "1", "attribute - color (lamp, green)", "Is the lamp green?"),
    ("b", "3", "1", "other - count (lamp, ==2)", "Are there two lamps?"),
    ("c", "1", "0", "entity - whole (dog)", "Is there a dog?"),  # no image: an error, not a silent drop
    ("d", "1", "0", "entity - whole (cup)", "Is there a cup?"),  # corrupt image
]
# Answers other than "yes", per (item, tile, question); tiles are told apart by colour.
NOT_YES = {
    ("a", 1, "Is there a cat?"): "no",
    ("a", 2, "Is the cat red?"): "no",
    ("b", 0, "Are there two lamps?"): "No",
    ("b", 2, "Is the lamp green?"): "Yes ",  # yes to us (normalised), not to the official exact match
}


def write_csv(path):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for item, pid, dep, tup, q in ROWS:
            w.writerow([item, f"prompt {item}", "", pid, dep, tup.split(" - ")[0], "", tup, q])
    return path


class TileFakeVQA:
    """Deterministic: reads the tile index from the tile's colour, the item from its green channel."""

    name = "fake"

    def __init__(self):
        self.calls = 0

    def __call__(self, image, question):
        self.calls += 1
        r, g, _ = image.getpixel((0, 0))
        item, tile = "abcd"[g // 60], r // 60
        return NOT_YES.get((item, tile, question), "yes")


@pytest.fixture()
def bench_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for n, item in enumerate("ab"):
        make_grid([Image.new("RGB", (16, 16), (60 * k, 60 * n, 0)) for k in range(4)]).save(images / f"{item}.png")
    (images / "d.png").write_bytes(b"\x89PNG broken")
    return images, write_csv(tmp_path / "q.csv")


def test_protocol_scores_by_hand(bench_dir):
    images, csv_path = bench_dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BenchmarkDataWarning)
        result = score(images, csv_path, TileFakeVQA())
    # a: tile0 4/4; tile1 q1 no -> q2, q3 zeroed: 1/4; tile2 q2 no -> q3 zeroed: 2/4; tile3 4/4
    assert result["items"]["a"]["tiles"] == [1.0, 0.25, 0.5, 1.0]
    # b: tile0 count "No": 2/3; tiles 1-3 all yes ("Yes " normalised)
    assert result["items"]["b"]["tiles"] == pytest.approx([2 / 3, 1, 1, 1])
    assert result["overall"] == pytest.approx(100 * (0.6875 + 11 / 12) / 2)
    # categories: every tile, answers *before* the dependency rule
    assert result["categories"] == pytest.approx(
        {"entity": 87.5, "attribute": 87.5, "relation": 100.0, "global": 100.0, "other": 75.0}
    )
    assert result["subcategories"]["other - count"] == 75.0
    assert result["num_items"] == 2 and result["num_items_expected"] == 4
    errors = {e["item_id"]: e["error"] for e in result["errors"]}
    assert set(errors) == {"c", "d"} and "no image c.png" in errors["c"]


def test_official_compat_reproduces_the_three_defects(bench_dir):
    images, csv_path = bench_dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BenchmarkDataWarning)
        result = score(images, csv_path, TileFakeVQA(), official_compat=True)
    # 1. first data row skipped: a's questions now reference the missing proposition 1 -> a is dropped
    assert "a" not in result["items"]
    assert "missing proposition 1" in {e["item_id"]: e["error"] for e in result["errors"]}["a"]
    assert result["settings"]["skipped_csv_rows"] == [0]
    # exact "yes" match: b's tile 2 answer "Yes " is a no -> [1, 0, 1]; mean over 4 tiles
    assert result["items"]["b"]["tiles"] == pytest.approx([2 / 3, 1, 2 / 3, 1])
    assert result["overall"] == pytest.approx(100 * (2 / 3 + 1 + 2 / 3 + 1) / 4)
    # 2. categories from the last tile only (b's tile 3: all yes), so "other" is 100, not 75
    assert result["categories"] == {"entity": 100.0, "attribute": 100.0, "other": 100.0}
    # 3. failing images are out of the mean in both modes; we still list them
    assert result["num_items"] == 1 and {e["item_id"] for e in result["errors"]} == {"a", "c", "d"}


def test_split_grid_order_and_bad_grid():
    tiles = split_grid(make_grid([Image.new("RGB", (8, 8), (k, 0, 0)) for k in range(4)]))
    assert [t.getpixel((0, 0))[0] for t in tiles] == [0, 1, 2, 3] and tiles[0].size == (8, 8)
    with pytest.raises(ValueError, match="2x2 grid"):
        split_grid(Image.new("RGB", (9, 8)))


def test_dsg1k_is_packaged_and_parsed():
    with pytest.warns(BenchmarkDataWarning) as record:
        bench = load_benchmark("dsg1k")
    # the packaged copy is the official file; its only issue is 10 non-id dependency entries
    assert [str(w.message) for w in record if "not the official" in str(w.message)] == []
    assert len(bench.ignored_parents) == 10 and "posescript_69 proposition 9: 'right'" in bench.ignored_parents
    assert bench.questions["posescript_69"][8].parents == (5,)
    assert len(bench.questions) == 1060 and len(bench.prompts) == 1060
    assert sum(len(q) for q in bench.questions.values()) == 8182
    counts = Counter(q.category for qs in bench.questions.values() for q in qs)
    assert counts == {"entity": 3395, "relation": 2069, "attribute": 1950, "global": 475, "other": 293}
    assert (
        bench.questions["whoops_5"][1].parents == (1,)
        and bench.questions["whoops_5"][1].subcategory == "attribute - color"
    )


def test_dpg_data_and_csv_errors(tmp_path):
    prompts = dpg_prompts()
    assert len(prompts) == 1065 and all(p == p.strip() and p for p in prompts.values())
    with pytest.raises(EllaError, match="download dpg_bench.csv .* 98457fc9901943f51ff9a30367250fc292533bed"):
        load_benchmark("dpg")
    custom = write_csv(tmp_path / "q.csv")
    with pytest.warns(BenchmarkDataWarning, match=f"git blob {git_blob_sha1(custom)}"):
        load_benchmark("dpg", custom)
    (tmp_path / "bad.csv").write_text("item_id,text\nx,y\n")
    with pytest.raises(EllaError, match="missing columns proposition_id"):
        load_benchmark("dpg", tmp_path / "bad.csv")
    with pytest.raises(EllaError, match="unknown benchmark 'geneval'"):
        load_benchmark("geneval")


def test_git_blob_hash_matches_git(tmp_path):
    import subprocess

    (tmp_path / "f").write_bytes(b"hello\n")
    out = subprocess.run(["git", "hash-object", str(tmp_path / "f")], capture_output=True, text=True)
    assert git_blob_sha1(tmp_path / "f") == out.stdout.strip()


PROMPTS = {"1": "a red cat", "2": "a green lamp", "10": "two blue squares", "x": "a dog"}


def test_generation_resumes_and_two_shards_equal_one_run(pipe, tmp_path):
    kw = dict(
        settings={"model": "tiny"}, base_seed=5, tile_size=32, call_kwargs={"num_inference_steps": 2}, progress=False
    )
    full = generate_grids(pipe, PROMPTS, tmp_path / "full", **kw)
    assert sorted(p.name for p in full) == ["1.png", "10.png", "2.png", "x.png"]
    assert Image.open(full[0]).size == (64, 64)
    assert shard_items(list(PROMPTS), 0, 2) == ["1", "10"] and shard_items(list(PROMPTS), 1, 2) == ["2", "x"]
    for i in range(2):
        generate_grids(pipe, PROMPTS, tmp_path / "sharded", shard=(i, 2), is_main=i == 0, **kw)
    for name in ("1.png", "2.png", "10.png", "x.png"):
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()

    # resume: nothing to do; a missing item is regenerated identically; other settings are refused
    assert generate_grids(pipe, PROMPTS, tmp_path / "full", **kw) == []
    before = (tmp_path / "full" / "2.png").read_bytes()
    (tmp_path / "full" / "2.png").unlink()
    assert [p.name for p in generate_grids(pipe, PROMPTS, tmp_path / "full", **kw)] == ["2.png"]
    assert (tmp_path / "full" / "2.png").read_bytes() == before
    with pytest.raises(EllaError, match="generated with other settings .*base_seed|seeds"):
        generate_grids(pipe, PROMPTS, tmp_path / "full", **{**kw, "base_seed": 6})


def test_tile_k_is_seed_plus_k(pipe, tmp_path):
    generate_grids(
        pipe,
        {"1": "a red cat"},
        tmp_path,
        settings={},
        base_seed=5,
        tile_size=32,
        call_kwargs={"num_inference_steps": 2},
        progress=False,
    )
    grid = Image.open(tmp_path / "1.png").convert("RGB")
    alone = pipe(
        "a red cat", generator=torch.Generator().manual_seed(5 + 3), height=32, width=32, num_inference_steps=2
    ).images[0]
    import numpy as np

    diff = np.abs(np.asarray(split_grid(grid)[3], dtype=int) - np.asarray(alone, dtype=int)).max()
    assert diff <= 1  # bottom-right tile is seed + 3 (batch-size rounding: one 8-bit level)
