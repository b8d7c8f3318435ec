"""The shapes world: scenes of coloured shapes on a 3x3 grid, sampled reproducibly and rendered exactly.

Why a toy world: ELLA's claim is about *dense* prompts — many objects, each with attributes and a
place — and judging that needs a VQA model. Here every fact of an image is known (the scene), a
pixel-level oracle answers questions about it exactly (``oracle.py``), and a 64x64 image is cheap
enough to train a connector end to end on a CPU. The vocabulary is chosen so that facts stay
readable at that size: five shapes whose silhouettes differ at ~10 pixels, six saturated object
colours at least ~90 RGB units apart, and neutral backgrounds at least ~100 units from every
object colour.

A scene is a set of *groups*: 1-3 identical objects (same shape, colour and size), each shape in
at most one group, every object in its own grid cell. So "the circle" always names one thing (or
one group: "the two yellow triangles") and counts are meaningful.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

from ..errors import EllaError

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}
#: Object colours (RGB); nearest pair (orange-yellow, red-orange) ~90 apart.
COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 215, 35),
    "purple": (140, 60, 190),
    "orange": (240, 120, 20),
}
#: Background colours (the "global" attribute); each >= ~100 RGB units from every object colour.
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "gray": (160, 160, 160)}
SIZES = ("small", "large")
#: Object extent as a fraction of a grid cell (the bounding square of the shape).
SIZE_FRACTION = {"small": 0.44, "large": 0.78}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
MAX_GROUP = 3
#: Probability that a group has 2-3 members (when there is room for them).
GROUP_PROBABILITY = 0.25
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CROSS_ARM = 0.40  # arm width of the cross, as a fraction of its extent


def cell_name(row: int, col: int) -> str:
    """ "top left", "center", "middle right" … — the grid cell's name in questions and tuples."""
    if (row, col) == (1, 1):
        return "center"
    return f"{ROWS[row]} {COLS[col]}"


@dataclass(frozen=True)
class Obj:
    """One shape in one grid cell (``row``, ``col`` in 0-2, top left is (0, 0))."""

    shape: str
    colour: str
    size: str
    row: int
    col: int

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.shape, SHAPES, "shape"),
            (self.colour, COLOURS, "colour"),
            (self.size, SIZES, "size"),
        ):
            if value not in allowed:
                raise EllaError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
        if not (0 <= self.row < 3 and 0 <= self.col < 3):
            raise EllaError(f"grid cell ({self.row}, {self.col}) is outside the 3x3 grid (rows and cols are 0-2)")


@dataclass(frozen=True)
class Group:
    """Identical objects of one shape; ``cells`` in reading order."""

    shape: str
    colour: str
    size: str
    cells: tuple[tuple[int, int], ...]

    @property
    def count(self) -> int:
        return len(self.cells)


@dataclass(frozen=True)
class Scene:
    """A background and its objects; checked on construction, so a Scene always obeys the group rules."""

    background: str
    objects: tuple[Obj, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise EllaError(f"unknown background {self.background!r}; use one of {', '.join(BACKGROUNDS)}")
        if not self.objects:
            raise EllaError("a scene needs at least one object")
        cells = [(o.row, o.col) for o in self.objects]
        if len(set(cells)) != len(cells):
            raise EllaError(f"two objects share a grid cell in {cells}; each object needs its own cell")
        looks: dict[str, tuple[str, str]] = {}
        for o in self.objects:
            if looks.setdefault(o.shape, (o.colour, o.size)) != (o.colour, o.size):
                raise EllaError(f"the {PLURALS[o.shape]} of a scene must share colour and size (one group per shape)")
        for g in self.groups():
            if g.count > MAX_GROUP:
                raise EllaError(f"{g.count} {PLURALS[g.shape]}: a group has at most {MAX_GROUP} objects")

    def groups(self) -> list[Group]:
        """One group per shape, ordered by the group's first cell (reading order)."""
        by_shape: dict[str, list[Obj]] = {}
        for o in sorted(self.objects, key=lambda o: (o.row, o.col)):
            by_shape.setdefault(o.shape, []).append(o)
        return [
            Group(objs[0].shape, objs[0].colour, objs[0].size, tuple((o.row, o.col) for o in objs))
            for objs in by_shape.values()
        ]

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        try:
            return cls(data["background"], tuple(Obj(**o) for o in data["objects"]))
        except (KeyError, TypeError) as err:
            raise EllaError(
                f"not a shapes scene (need background and objects[shape, colour, size, row, col]): {err}"
            ) from None


def sample_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    """A random scene of ``n_objects`` objects (uniform over 1-5 if None); all randomness from ``rng``."""
    n = rng.randint(1, 5) if n_objects is None else n_objects
    if not 1 <= n <= 9:
        raise EllaError(f"n_objects={n_objects}: a scene holds 1-9 objects (one per cell of the 3x3 grid)")
    shapes = rng.sample(SHAPES, len(SHAPES))
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    objects, left = [], n
    for i, shape in enumerate(shapes):
        if left == 0:
            break
        need = max(1, left - MAX_GROUP * (len(shapes) - i - 1))  # the remaining shapes must still fit the rest
        count = need
        if min(MAX_GROUP, left) > need and rng.random() < GROUP_PROBABILITY:
            count = rng.randint(max(need, 2), min(MAX_GROUP, left))
        colour, size = rng.choice(list(COLOURS)), rng.choice(SIZES)
        objects += [Obj(shape, colour, size, *cells.pop()) for _ in range(count)]
        left -= count
    return Scene(rng.choice(list(BACKGROUNDS)), tuple(sorted(objects, key=lambda o: (o.row, o.col))))


def derived_rng(seed: int, index: int, purpose: str) -> random.Random:
    """An RNG for item ``index`` of dataset ``seed``, the same on every machine and Python (sha256)."""
    digest = hashlib.sha256(f"ella-shapes/{purpose}/{int(seed)}/{int(index)}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def scene_for(seed: int, index: int, n_objects: int | None = None) -> Scene:
    """Scene ``index`` of the dataset ``seed`` — reproducible, and independent of every other index."""
    return sample_scene(derived_rng(seed, index, "scene"), n_objects)


def scene_relations(scene: Scene, limit: int = 2) -> list[tuple[str, str, str]]:
    """Up to ``limit`` true spatial relations ``(shape_a, relation, shape_b)`` between single objects.

    Chosen from the scene itself (so captions state them and questions ask them without sharing
    state): "left of"/"right of" only across different columns, "above"/"below" across rows.
    """
    singles = [g for g in scene.groups() if g.count == 1]
    if len(singles) < 2:
        return []
    rng = random.Random(int.from_bytes(hashlib.sha256(repr(scene.to_dict()).encode()).digest()[:8], "big"))
    pairs = [(a, b) for i, a in enumerate(singles) for b in singles[i + 1 :]]
    rng.shuffle(pairs)
    out = []
    for a, b in pairs[: min(limit, len(singles) - 1)]:
        (ra, ca), (rb, cb) = a.cells[0], b.cells[0]
        options = []
        if ca != cb:
            options.append("left of" if ca < cb else "right of")
        if ra != rb:
            options.append("above" if ra < rb else "below")
        relation = rng.choice(options)
        out.append((b.shape, INVERSE[relation], a.shape) if rng.random() < 0.5 else (a.shape, relation, b.shape))
    return out


def outline(shape: str, cx: float, cy: float, extent: float) -> list[tuple[float, float]]:
    """The shape's polygon, centred in a square of side ``extent`` at ``(cx, cy)`` (y down).

    Shared with the oracle, which fits these same outlines to what it sees."""
    h = extent / 2
    if shape == "circle":
        pts = [(math.cos(2 * math.pi * k / 48), math.sin(2 * math.pi * k / 48)) for k in range(48)]
    elif shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":  # apex up, base as wide as the extent
        pts = [(0, -1), (1, 1), (-1, 1)]
    elif shape == "diamond":
        pts = [(0, -1), (1, 0), (0, 1), (-1, 0)]
    elif shape == "cross":
        a = CROSS_ARM
        pts = [
            (-a, -1),
            (a, -1),
            (a, -a),
            (1, -a),
            (1, a),
            (a, a),
            (a, 1),
            (-a, 1),
            (-a, a),
            (-1, a),
            (-1, -a),
            (-a, -a),
        ]
    else:
        raise EllaError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    return [(cx + x * h, cy + y * h) for x, y in pts]


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """The scene as an RGB image: drawn at ``size * supersample`` and box-filtered down (antialiased).

    A pure function of the scene: no jitter, so a scene has exactly one image at each size."""
    if size < 32 or supersample < 1:
        raise EllaError(f"render size {size} (supersample {supersample}): use size >= 32 and supersample >= 1")
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cell = big / 3
    for o in scene.objects:
        centre = ((o.col + 0.5) * cell, (o.row + 0.5) * cell)
        draw.polygon(outline(o.shape, *centre, SIZE_FRACTION[o.size] * cell), fill=COLOURS[o.colour])
    return image.reduce(supersample) if supersample > 1 else image
