"""Question graphs of shapes scenes, in DPG-Bench's schema — so ``ella.bench.dpg`` scores them unchanged.

Per group (one shape): ``entity - whole`` "Is there a circle?" (no parent), then, depending on
it, ``attribute - color``, ``attribute - size``, ``other - count`` (groups of 2-3),
``relation - position`` per member ("Is the circle in the top left of the image?"; "Is there a
triangle in …?" for groups); then ``relation - spatial`` between two single objects (the ones
the caption states; parents: both entities) and ``global - (background, gray)``. Every question
is answerable from pixels, and ``ShapesOracle`` parses exactly these wordings.
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

from ..bench.data import Benchmark, Question
from ..errors import EllaError
from ..io import atomic_path
from .captions import NUMBERS, caption_for
from .world import PLURALS, Scene, cell_name, scene_for, scene_relations

HEADER = (
    "item_id",
    "text",
    "keywords",
    "proposition_id",
    "dependency",
    "category_broad",
    "category_detailed",
    "tuple",
    "question_natural_language",
)


def questions(scene: Scene) -> list[Question]:
    """The scene's propositions as DPG-style questions, in a fixed order (ids 1..n)."""
    out: list[Question] = []

    def add(tup: str, text: str, parents: tuple[int, ...] = (0,)) -> int:
        out.append(Question(len(out) + 1, parents, tup, text))
        return len(out)

    entity: dict[str, int] = {}
    for g in scene.groups():
        s, many = g.shape, g.count > 1
        the = f"the {PLURALS[s]}" if many else f"the {s}"
        verb = "Are" if many else "Is"
        e = entity[s] = add(f"entity - whole ({s})", f"Is there {'an' if s[0] in 'aeiou' else 'a'} {s}?")
        add(f"attribute - color ({s}, {g.colour})", f"{verb} {the} {g.colour}?", (e,))
        add(f"attribute - size ({s}, {g.size})", f"{verb} {the} {g.size}?", (e,))
        if many:
            add(f"other - count ({s}, =={g.count})", f"Are there {NUMBERS[g.count]} {PLURALS[s]}?", (e,))
        for cell in g.cells:
            name = cell_name(*cell)
            text = f"Is there a {s} in the {name} of the image?" if many else f"Is the {s} in the {name} of the image?"
            add(f"relation - position ({s}, {name})", text, (e,))
    for a, relation, b in scene_relations(scene):
        add(f"relation - spatial ({a}, {b}, {relation})", f"Is the {a} {relation} the {b}?", (entity[a], entity[b]))
    add(f"global - (background, {scene.background})", f"Is the background {scene.background}?")
    return out


def _rows(items: dict[str, tuple[str, Scene]]) -> list[list[str]]:
    rows = []
    for item_id, (text, scene) in items.items():
        for q in questions(scene):
            keywords = q.tuple[q.tuple.index("(") + 1 : -1]
            detailed = q.subcategory.partition("-")[2].strip() or "-"  # "-" for global, as DSG-1k writes it
            rows.append(
                [
                    item_id,
                    text,
                    keywords,
                    str(q.proposition_id),
                    ",".join(map(str, q.parents)),
                    q.category,
                    detailed,
                    q.tuple,
                    q.question,
                ]
            )
    return rows


def csv_text(items: dict[str, tuple[str, Scene]]) -> str:
    """The DPG-schema CSV of ``item_id -> (prompt, scene)`` as text (what ``write_csv`` writes)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(_rows(items))
    return buffer.getvalue()


def write_csv(items: dict[str, tuple[str, Scene]], path: str | Path) -> Path:
    """Write a question file ``ella.bench.data.read_questions`` (and the official scorer) reads."""
    if not items:
        raise EllaError("write_csv needs at least one item (item_id -> (prompt, scene))")
    with atomic_path(path) as tmp:
        tmp.write_text(csv_text(items), encoding="utf-8")
    return Path(path)


def item_id(index: int) -> str:
    return f"shapes-{index:05d}"


def shapes_benchmark(
    n_items: int, seed: int, *, n_objects: int | None = None, csv_path: str | Path | None = None
) -> tuple[Benchmark, dict[str, Scene]]:
    """``n_items`` scenes of dataset ``seed`` as a Benchmark (name "shapes") plus the scenes by item id.

    Items ``shapes-00000`` … are ``scene_for(seed, i)`` with ``caption_for(seed, i)`` as prompt.
    ``csv_path`` also writes the question file; either way ``csv_blob`` is the git blob id of
    that file's content, so two runs can tell whether they scored the same questions.
    """
    if n_items < 1:
        raise EllaError(f"n_items={n_items}: a shapes benchmark needs at least one item")
    scenes = {item_id(i): scene_for(seed, i, n_objects) for i in range(n_items)}
    prompts = {k: caption_for(seed, i, n_objects) for i, k in enumerate(scenes)}
    items = {k: (prompts[k], s) for k, s in scenes.items()}
    data = csv_text(items).encode("utf-8")
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    if csv_path is not None:
        write_csv(items, csv_path)
    path = Path(csv_path) if csv_path is not None else Path(f"shapes-seed{seed}-{n_items}.csv")
    bench = Benchmark("shapes", prompts, {k: questions(s) for k, s in scenes.items()}, path, blob)
    return bench, scenes
