"""DPG-Bench / DSG-1k scoring: the official protocol, its defects fixed — or reproduced on request.

The protocol (the official ``compute_dpg_bench.py``): each ``<item_id>.png`` is a 2x2 grid of
one prompt's images (top-left, top-right, bottom-left, bottom-right); every question of the item
is asked of every tile; "yes" scores 1, anything else 0; then the dependency rule, in CSV order:
a question any of whose parents scored 0 scores 0 (parents already zeroed count as 0); tile
score = mean over the item's questions, item score = mean over tiles, overall = 100 x mean over
items. Category scores, by the official rule (:func:`ella.bench.data.categories`): level 2 is
the ``tuple`` before "(", level 1 is level 2 before "-".

The official script's defects, fixed by default and reproduced with ``official_compat=True``:

1. it skips the first data row of the CSV (the first item loses its first proposition; an item
   whose questions then reference a missing parent fails and is dropped);
2. its category scores use only the *last* tile's answers (before the dependency rule); ours
   use all tiles (answers before the dependency rule, as the official intends);
3. an image that raises is silently left out of the mean; ours lists it under ``errors`` and
   the result says how many items were scored. (In both modes the numbers exclude such items:
   they have no score.)

Answers: ours compares ``answer.strip().lower() == "yes"``; compat compares ``answer == "yes"``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .data import Benchmark, load_benchmark
from .vqa import ask_batch

TILE_ORDER = "top-left, top-right, bottom-left, bottom-right"


def is_yes(answer: str, official_compat: bool) -> float:
    """1.0 for a yes: exact ``== "yes"`` as the official script, or after strip/lowercase (ours)."""
    return float(answer == "yes" if official_compat else answer.strip().lower() == "yes")


def split_grid(grid: Image.Image, tiles: int = 4) -> list[Image.Image]:
    """The first ``tiles`` of a 2x2 grid, in the official order."""
    w, h = grid.size
    if w % 2 or h % 2:
        raise ValueError(f"grid image is {w}x{h}; expected a 2x2 grid of equal tiles")
    tw, th = w // 2, h // 2
    boxes = [(0, 0, tw, th), (tw, 0, w, th), (0, th, tw, h), (tw, th, w, h)]
    return [grid.crop(box) for box in boxes[:tiles]]


def find_image(images_dir: Path, item_id: str) -> Path | None:
    for ext in (".png", ".jpg", ".jpeg", ".webp"):
        if (images_dir / f"{item_id}{ext}").is_file():
            return images_dir / f"{item_id}{ext}"
    return None


def score_item(
    benchmark: Benchmark,
    item_id: str,
    image_path: Path,
    vqa: Callable,
    *,
    official_compat: bool = False,
    tiles: int = 4,
) -> dict:
    """One item: answers per tile and question, tile scores after the dependency rule."""
    questions = benchmark.questions[item_id]
    with Image.open(image_path) as grid:
        crops = split_grid(grid.convert("RGB"), tiles)
    asked = [(crop, q.question) for crop in crops for q in questions]
    answers = ask_batch(vqa, [a[0] for a in asked], [a[1] for a in asked], normalize=not official_compat)
    per_tile, tile_scores = [], []
    for t in range(len(crops)):
        tile_answers = answers[t * len(questions) : (t + 1) * len(questions)]
        scores = {q.proposition_id: is_yes(a, official_compat) for q, a in zip(questions, tile_answers)}
        for q in questions:  # CSV order; a parent zeroed earlier in this loop counts as 0
            for parent in q.parents:
                if parent == 0:
                    continue
                if parent not in scores:
                    raise KeyError(f"question {q.proposition_id} depends on missing proposition {parent}")
                if scores[parent] == 0:
                    scores[q.proposition_id] = 0.0
                    break
        per_tile.append(tile_answers)
        tile_scores.append(sum(scores.values()) / len(scores))
    return {"score": sum(tile_scores) / len(tile_scores), "tiles": tile_scores, "answers": per_tile}


def aggregate(benchmark: Benchmark, items: dict[str, dict], errors: list[dict], *, official_compat: bool) -> dict:
    """Overall and category scores from per-item records (what sharded runs gather and merge)."""
    l1, l2 = defaultdict(list), defaultdict(list)
    for item_id, record in items.items():
        # defect 2 reproduced: the official counts only the last tile's answers per category
        tiles = record["answers"][-1:] if official_compat else record["answers"]
        for tile_answers in tiles:
            for q, answer in zip(benchmark.questions[item_id], tile_answers):
                l1[q.category].append(is_yes(answer, official_compat))
                l2[q.subcategory].append(is_yes(answer, official_compat))
    mean = lambda xs: 100.0 * sum(xs) / len(xs) if xs else float("nan")
    return {
        "benchmark": benchmark.name,
        "overall": mean([r["score"] for r in items.values()]),
        "categories": {k: mean(v) for k, v in sorted(l1.items())},
        "subcategories": {k: mean(v) for k, v in sorted(l2.items())},
        "items": dict(sorted(items.items())),
        "errors": errors,
        "num_items": len(items),
        "num_items_expected": len(benchmark.questions),
        "settings": {
            **benchmark.settings(),
            "official_compat": official_compat,
            "skipped_csv_rows": benchmark.skipped_rows,
            "tile_order": TILE_ORDER,
        },
    }


def score_items(
    benchmark: Benchmark,
    images_dir: str | Path,
    vqa: Callable,
    *,
    official_compat: bool = False,
    tiles: int = 4,
    item_ids: list[str] | None = None,
    progress: bool = False,
) -> tuple[dict, list]:
    """Per-item records and errors for ``item_ids`` (default: every item of the benchmark)."""
    images_dir = Path(images_dir)
    items, errors = {}, []
    ids = list(benchmark.questions) if item_ids is None else item_ids
    if progress:
        ids = tqdm(ids, desc="scoring", unit="item")
    for item_id in ids:
        path = find_image(images_dir, item_id)
        if path is None:
            errors.append({"item_id": item_id, "error": f"no image {item_id}.png in {images_dir}"})
            continue
        try:
            items[item_id] = score_item(benchmark, item_id, path, vqa, official_compat=official_compat, tiles=tiles)
        except Exception as err:  # defect 3: the official drops these silently; we list them
            errors.append({"item_id": item_id, "error": f"{type(err).__name__}: {err}"})
    return items, errors


def score(
    images_dir: str | os.PathLike,
    csv_path: str | os.PathLike | None,
    vqa: Callable,
    *,
    official_compat: bool = False,
    benchmark: str = "dpg",
    tiles: int = 4,
    progress: bool = False,
) -> dict:
    """Score a folder of ``<item_id>.png`` 2x2 grids; ``vqa(image, question) -> str`` (``.batch`` used if present).

    Returns ``overall``, ``categories`` (L1), ``subcategories`` (L2), ``items``, ``errors``,
    ``num_items`` / ``num_items_expected`` and ``settings``; scores are 0-100 (items 0-1).
    """
    bench = load_benchmark(benchmark, csv_path, official_compat=official_compat)
    items, errors = score_items(bench, images_dir, vqa, official_compat=official_compat, tiles=tiles, progress=progress)
    return aggregate(bench, items, errors, official_compat=official_compat)
