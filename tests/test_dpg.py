"""DPG-Bench scoring protocol, the official-compat defects, data files, generation resume + sharding."""

from __future__ import annotations

import csv
import subprocess
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from ella.bench import data
from ella.bench.data import BenchmarkDataWarning, categories, dpg_prompts, git_blob_sha1, load_benchmark
from ella.bench.dpg import score, split_grid
from ella.bench.generate import generate_grids, make_grid, shard_items
from ella.bench.vqa import FakeVQA
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


def write_csv(path, rows=ROWS, encoding="utf-8"):
    with path.open("w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for item, pid, dep, tup, q in rows:
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
    (tmp_path / "f").write_bytes(b"hello\n")
    out = subprocess.run(["git", "hash-object", str(tmp_path / "f")], capture_output=True, text=True)
    assert git_blob_sha1(tmp_path / "f") == out.stdout.strip()


# ------------------------------------------------------------------------- category rule


def test_categories_follow_the_official_rule():
    """compute_dpg_bench.py: level 2 = tuple before "("; level 1 = level 2 before "-"."""
    assert categories("attribute - color (book, red)") == ("attribute", "attribute - color")
    assert categories("global (t-shirt)") == ("global", "global")  # no " - ": level 1 is level 2
    assert categories("global (thing)") == ("global", "global")
    assert categories("entity - whole (t-shirt)") == ("entity", "entity - whole")  # "-" in the arguments
    assert categories("global - - (military diagram)") == ("global", "global - -")  # as in DSG-1k
    assert categories("  relation - spatial(x-ray, desk, on)") == ("relation", "relation - spatial")


# Item "first" soaks up the official-compat skip of data row 0 (it has no grid either way);
# item "g" has tuples with no " - " before "(" and a "-" inside the parentheses.
ODD_ROWS = [
    ("first", "1", "0", "entity - whole (cup)", "Is there a cup?"),
    ("g", "1", "0", "global (t-shirt)", "Is this a t-shirt photo?"),
    ("g", "2", "0", "entity - whole (t-shirt)", "Is there a t-shirt?"),
    ("g", "3", "2", "attribute - color (t-shirt, blue-green)", "Is the t-shirt blue-green?"),
    ("g", "4", "0", 'other - text (sign, "x-ray")', 'Does the sign say "x-ray"?'),
]


def odd_answer(image, question):
    """No to the photo question on tiles 0 and 1, no to the colour on tile 3 (tile = red // 60)."""
    tile = image.getpixel((0, 0))[0] // 60
    if (question, tile) in {("Is this a t-shirt photo?", 0), ("Is this a t-shirt photo?", 1)}:
        return "no"
    if (question, tile) == ("Is the t-shirt blue-green?", 3):
        return "no"
    return "yes"


@pytest.mark.parametrize("official_compat", [False, True])
def test_category_scores_use_the_official_rule(tmp_path, official_compat):
    csv_path = write_csv(tmp_path / "q.csv", ODD_ROWS)
    images = tmp_path / "images"
    images.mkdir()
    make_grid([Image.new("RGB", (16, 16), (60 * k, 0, 0)) for k in range(4)]).save(images / "g.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BenchmarkDataWarning)
        result = score(images, csv_path, FakeVQA(odd_answer), official_compat=official_compat)
    # tiles: q1 no on 0, 1; q3 no on 3 (q3's parent q2 is yes everywhere) -> 3/4, 3/4, 4/4, 3/4
    assert result["items"]["g"]["tiles"] == [0.75, 0.75, 1.0, 0.75]
    if official_compat:  # categories from the last tile only
        expected = {"global": 100.0, "entity": 100.0, "attribute": 0.0, "other": 100.0}
    else:  # every tile: photo yes 2/4, colour yes 3/4
        expected = {"global": 50.0, "entity": 100.0, "attribute": 75.0, "other": 100.0}
    assert result["categories"] == expected
    assert result["subcategories"] == {
        "global": expected["global"],
        "entity - whole": expected["entity"],
        "attribute - color": expected["attribute"],
        "other - text": expected["other"],
    }


# ------------------------------------------------------------------------- hostile CSVs


def test_duplicate_propositions_are_refused(tmp_path):
    rows = [*ROWS[:4], ("a", "2", "1", "attribute - shape (cat, round)", "Is the cat round?")]
    path = write_csv(tmp_path / "dup.csv", rows)
    with pytest.raises(EllaError) as err:
        load_benchmark("dpg", path)
    message = str(err.value)
    assert "\n" not in message and "1 duplicate (item_id, proposition_id) rows" in message
    assert "a proposition 2 (data row 5)" in message


def test_duplicates_in_the_official_file_warn_once_and_keep_what_the_official_keeps(tmp_path, monkeypatch):
    """The official scorer keys questions by id: the last row's question, in the first row's place."""
    rows = [*ROWS[:4], ("a", "2", "1", "attribute - shape (cat, round)", "Is the cat round?"), *ROWS[4:6]]
    rows.append(("b", "1", "0", "entity - whole (lamp)", "Is there a lamp at all?"))
    path = write_csv(tmp_path / "dpg_bench.csv", rows)
    monkeypatch.setattr(data, "DPG_CSV_BLOB", git_blob_sha1(path))  # as if this were the official file
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bench = load_benchmark("dpg", path)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "2 duplicate (item_id, proposition_id) rows" in messages[0]
    assert "kept the last row" in messages[0]
    assert [(q.proposition_id, q.question) for q in bench.questions["a"]] == [
        (1, "Is there a cat?"),
        (2, "Is the cat round?"),
        (3, "Is the red cat on the chair?"),
        (4, "Is this a photo?"),
    ]
    assert [q.question for q in bench.questions["b"]] == ["Is there a lamp at all?", "Is the lamp green?"]


def test_a_latin1_csv_is_one_clear_line(tmp_path):
    rows = [("a", "1", "0", "entity - whole (café)", "Is there a café?")]
    path = write_csv(tmp_path / "latin1.csv", rows, encoding="latin-1")
    with pytest.raises(EllaError) as err:
        load_benchmark("dpg", path)
    message = str(err.value)
    assert str(path) in message and "not UTF-8" in message and "line 2: byte 0xe9" in message and "\n" not in message
    # the same file as UTF-8, even with a spreadsheet's byte-order mark, reads
    utf8 = tmp_path / "utf8.csv"
    utf8.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().decode("latin-1").encode("utf-8"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BenchmarkDataWarning)
        assert load_benchmark("dpg", utf8).questions["a"][0].question == "Is there a café?"


def test_a_short_row_is_one_clear_line(tmp_path):
    path = write_csv(tmp_path / "q.csv", ROWS[:2])
    path.write_text(path.read_text() + "a,prompt a,,3\n")
    with pytest.raises(EllaError, match=r"data row 3 has fewer fields than the header \(no dependency, tuple"):
        load_benchmark("dpg", path)


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
    diff = np.abs(np.asarray(split_grid(grid)[3], dtype=int) - np.asarray(alone, dtype=int)).max()
    assert diff <= 1  # bottom-right tile is seed + 3 (batch-size rounding: one 8-bit level)
