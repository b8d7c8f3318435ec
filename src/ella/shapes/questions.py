"""Question graphs of shapes scenes, in DPG-Bench's schema — so ``ella.bench.dpg`` scores them unchanged.

Per group (one shape): ``entity - whole`` "Is there a circle?" (no parent), then, depending on
it, ``attribute - color``, ``attribute - size``, ``other - count`` (groups of 2-3),
``relation - position`` per member ("Is the circle in the top left of the image?"; "Is there a
triangle in …?" for groups); then ``relation - spatial`` between two single objects (the ones
the caption states; parents: both entities) and ``global - (background, gray)``. Every question
is answerable from pixels, and ``ShapesOracle`` parses exactly these wordings.

A prompt that leaves facts out (``captions.Specified``) is asked only about what it states: a
model that draws a small circle where the prompt said "a red circle" is not wrong about its size.
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

from ..bench.data import Benchmark, Question
from ..errors import EllaError
from ..io import atomic_path
from .captions import KINDS, NUMBERS, Specified, prompt_for
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


def questions(scene: Scene, specified: Specified | None = None) -> list[Question]:
    """The scene's propositions as DPG-style questions, in a fixed order (ids 1..n).

    With ``specified`` (what a prompt states), only the stated facts: entity and colour always,
    the count, size and each position where stated, the background where stated, and a relation
    where the prompt says it or states both objects' positions (which imply it). ``None``: all.
    """
    out: list[Question] = []

    def add(tup: str, text: str, parents: tuple[int, ...] = (0,)) -> int:
        out.append(Question(len(out) + 1, parents, tup, text))
        return len(out)

    entity: dict[str, int] = {}
    placed: set[str] = set()  # shapes with a stated position (relations are between single objects)
    for g in scene.groups():
        s, many = g.shape, g.count > 1
        said = specified.of(s) if specified is not None else None
        if said is not None and len(said.cells) != g.count:
            raise EllaError(f"the record has {len(said.cells)} places for the {s} but the scene has {g.count}")
        the = f"the {PLURALS[s]}" if many else f"the {s}"
        verb = "Are" if many else "Is"
        e = entity[s] = add(f"entity - whole ({s})", f"Is there {'an' if s[0] in 'aeiou' else 'a'} {s}?")
        add(f"attribute - color ({s}, {g.colour})", f"{verb} {the} {g.colour}?", (e,))
        if said is None or said.size:
            add(f"attribute - size ({s}, {g.size})", f"{verb} {the} {g.size}?", (e,))
        if many and (said is None or said.count):
            add(f"other - count ({s}, =={g.count})", f"Are there {NUMBERS[g.count]} {PLURALS[s]}?", (e,))
        for k, cell in enumerate(g.cells):
            if said is not None and not said.cells[k]:
                continue
            placed.add(s)
            name = cell_name(*cell)
            text = f"Is there a {s} in the {name} of the image?" if many else f"Is the {s} in the {name} of the image?"
            add(f"relation - position ({s}, {name})", text, (e,))
    for a, relation, b in scene_relations(scene):
        if specified is None or {a, b} <= placed or specified.states_relation(a, relation, b):
            add(f"relation - spatial ({a}, {b}, {relation})", f"Is the {a} {relation} the {b}?", (entity[a], entity[b]))
    if specified is None or specified.background:
        add(f"global - (background, {scene.background})", f"Is the background {scene.background}?")
    return out


Items = dict[str, tuple[str, Scene] | tuple[str, Scene, Specified]]


def _rows(items: Items) -> list[list[str]]:
    rows = []
    for item_id, (text, scene, *specified) in items.items():
        for q in questions(scene, *specified):
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


def csv_text(items: Items) -> str:
    """The DPG-schema CSV of ``item_id -> (prompt, scene[, specified])`` as text (what ``write_csv`` writes)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(_rows(items))
    return buffer.getvalue()


def write_csv(items: Items, path: str | Path) -> Path:
    """Write a question file ``ella.bench.data.read_questions`` (and the official scorer) reads.

    ``items``: ``item_id -> (prompt, scene)``, or ``(prompt, scene, specified)`` to ask only what the prompt states.
    """
    if not items:
        raise EllaError("write_csv needs at least one item (item_id -> (prompt, scene))")
    with atomic_path(path) as tmp:
        tmp.write_text(csv_text(items), encoding="utf-8")
    return Path(path)


def item_id(index: int) -> str:
    return f"shapes-{index:05d}"


def shapes_benchmark(
    n_items: int,
    seed: int,
    *,
    n_objects: int | None = None,
    csv_path: str | Path | None = None,
    kind: str = "train",
) -> tuple[Benchmark, dict[str, Scene]]:
    """``n_items`` scenes of dataset ``seed`` as a Benchmark plus the scenes by item id.

    Items ``shapes-00000`` … are ``scene_for(seed, i)`` with ``prompt_for(seed, i, kind)`` as prompt
    and the questions about what that prompt states. Every kind uses the same scenes, so kinds
    compare like for like (``KINDS``: train, heldout, terse, underspecified, …); the benchmark is
    named "shapes" for train-style prompts and "shapes-<kind>" otherwise. ``csv_path`` also writes
    the question file; either way ``csv_blob`` is the git blob id of that file's content, so two
    runs can tell whether they scored the same questions.
    """
    if n_items < 1:
        raise EllaError(f"n_items={n_items}: a shapes benchmark needs at least one item")
    if kind not in KINDS:
        raise EllaError(f"unknown prompt kind {kind!r}; use one of {', '.join(KINDS)}")
    scenes = {item_id(i): scene_for(seed, i, n_objects) for i in range(n_items)}
    captions = {k: prompt_for(seed, i, kind, n_objects) for i, k in enumerate(scenes)}
    items = {k: (captions[k].text, s, captions[k].specified) for k, s in scenes.items()}
    data = csv_text(items).encode("utf-8")
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    if csv_path is not None:
        write_csv(items, csv_path)
    name = "shapes" if kind == "train" else f"shapes-{kind}"
    path = Path(csv_path) if csv_path is not None else Path(f"{name}-seed{seed}-{n_items}.csv")
    prompts = {k: c.text for k, c in captions.items()}
    bench = Benchmark(name, prompts, {k: questions(s, items[k][2]) for k, s in scenes.items()}, path, blob)
    return bench, scenes
